"""The GPU path: bf16 rollouts, RL steps, the bandit and static-cache decoding on CUDA.

Every CUDA case is marked ``cuda`` and skipped where torch sees no GPU;
``pytest -m cuda tests/test_cuda.py`` runs exactly those (``benchmarks/gpu_check.sh`` does). Where
the same check means something on a CPU, the test body is shared and a ``cpu`` case runs in the
default suite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pmrlhf.models import load_causal_lm, load_tokenizer
from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.decoding import bucket_length, pad_to_bucket
from pmrlhf.rl.rollout import response_mask_from_ids, token_logprobs
from pmrlhf.rl.trainer import RLTrainer
from pmrlhf.runtime import read_jsonl

HAS_CUDA = torch.cuda.is_available()
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
CUDA = pytest.param("cuda", marks=ON_CUDA)
DEVICES = ["cpu", CUDA]

REWARD_SPEC = f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea"
PROMPTS = ["Which drink do you prefer ?", "I like summer best . Which season do you like best ?"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each case here picks its own device/precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def make_trainer(
    policy: Path, out: Path, device: str, prompts: list[str] = PROMPTS, **overrides
) -> RLTrainer:
    from accelerate import Accelerator

    values = dict(
        policy=str(policy), reward=REWARD_SPEC, max_steps=2, prompts_per_step=2, samples_per_prompt=4,
        max_new_tokens=8, lr=1e-2, beta=0.1, alpha=0.2, dtype="bf16", output_dir=str(out),
        quiet=True,
    )  # fmt: skip
    values.update(overrides)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16")
    return RLTrainer(RLConfig(**values), prompts=prompts, accelerator=accelerator)


# ------------------------------------------------------------------ (i) sampling vs scoring
@pytest.mark.parametrize("device", DEVICES)
def test_sampled_and_scored_logprobs_agree_under_the_bf16_rollout_copy(
    tiny_model_dir, tmp_path, device
):
    """The log-prob of each sampled token, from the logits ``generate`` sampled it with (bf16
    rollout copy, static cache on CUDA), equals the one scoring computes from the fp32 weights
    under bf16 autocast, within bf16 precision."""
    from transformers import GenerationConfig

    trainer = make_trainer(tiny_model_dir, tmp_path, device)
    trainer.train_step()  # the fp32 weights move; the copy must follow them
    model = trainer._generation_model()
    assert model is not trainer.accelerator.unwrap_model(trainer.policy)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == device

    tokenizer = trainer.tokenizer
    encoded = tokenizer(PROMPTS * 4, return_tensors="pt", padding=True).to(trainer.device)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        cache_implementation="static" if device == "cuda" else None,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**encoded, generation_config=config)
    P = encoded.input_ids.shape[1]
    response = out.sequences[:, P:]
    mask = response_mask_from_ids(response, [eos])
    logits = torch.stack(out.logits, dim=1).float()
    sampled = torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)

    response = torch.where(mask.bool(), response, tokenizer.pad_token_id)
    sequences = torch.cat([encoded.input_ids, response], dim=1)
    attention = torch.cat([encoded.attention_mask, mask], dim=1)
    with torch.no_grad():
        scored, _ = token_logprobs(trainer.policy, sequences, attention, P)
    real = mask.bool()
    assert real.sum() >= 16
    diff = (scored - sampled)[real].abs()
    # bf16 keeps 8 significant bits: log-probs of a few nats agree to a few hundredths
    # (measured on a CPU: max 0.006, mean 0.0012 nats over 82 tokens)
    assert float(diff.max()) <= 0.06, diff
    assert float(diff.mean()) <= 0.015, diff
    assert scored.dtype == torch.float32
    # the tolerance is tight enough to catch a copy that missed the step: the weights before it
    # (measured on a CPU: mean 0.25 nats away) are far outside it
    with torch.no_grad():
        stale, _ = token_logprobs(
            load_causal_lm(str(tiny_model_dir), device=device), sequences, attention, P
        )
    assert float((stale - sampled)[real].abs().mean()) > 0.05


# ------------------------------------------------------------------ (iii) the bandit
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize(("algo", "regularizer"), [("rloo", "kl"), ("rloo", "pm"), ("rloo", "cpm")])
def test_bandit_reaches_its_closed_form_on_cuda(algo, regularizer):
    """Same problem, budget and tolerance as tests/test_bandit.py, on the GPU (dtype auto: bf16)."""
    from pmrlhf.rl.bandit import make_problem, run_bandit

    problem = make_problem("2,0,-1;0,1,0.5", "0.1,0.3,0.6")
    result = run_bandit(problem, regularizer=regularizer, algo=algo, beta=0.7, alpha=0.25)
    torch.testing.assert_close(result.reference, problem.ref, atol=2e-3, rtol=0)
    assert float(result.tv.max()) <= 0.03, result.to_json()
    assert float((result.learned - result.reference).abs().sum(-1).max()) > 0.3


# ------------------------------------------------------------------ (iv) bounded recompiles
def prompt_of(length: int, words: list[str]) -> str:
    return " ".join(words[i % len(words)] for i in range(length))


def count_decode_compiles(model, tokenizer, lengths: list[int], bucket: bool) -> list[int]:
    """Graphs compiled so far for static-cache decoding, after each batch; the batches' longest
    prompts have ``lengths`` words. Static-shape compilation (``dynamic=False``) compiles once per
    distinct shape, so this also counts the CUDA graphs that ``reduce-overhead`` would record."""
    # transformers keeps the longest static cache seen on the model; start from none
    model.__dict__.pop("_previous_max_cache_length", None)
    from transformers import CompileConfig, GenerationConfig

    graphs: list[int] = []

    def counting_backend(gm, example_inputs, **kwargs):
        graphs.append(len(example_inputs))
        return gm.forward

    compile_config = CompileConfig(backend=counting_backend, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # HF compiles on CUDA only unless told so
    config = GenerationConfig(
        do_sample=True, max_new_tokens=3, min_new_tokens=3, top_k=0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        cache_implementation="static", compile_config=compile_config,
    )  # fmt: skip
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    device = next(model.parameters()).device
    counts = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
        for n in lengths:
            prompts = [prompt_of(n, words), prompt_of(max(1, n // 2), words)]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True)
            ids, mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
            if bucket:
                ids, mask, _ = pad_to_bucket(ids, mask, tokenizer.pad_token_id)
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            counts.append(len(graphs))
    torch._dynamo.reset()
    return counts


# 10 prompt lengths in two buckets (16 and 32 tokens), increasing: every one is longer than all
# before it, so transformers' reuse of the longest cache seen does not hide a single new shape
LENGTHS = list(range(3, 31, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_bucketed_static_cache_decoding_compiles_once_per_bucket(tiny_model_dir, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_causal_lm(str(tiny_model_dir), dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    token_lengths = {
        tokenizer([prompt_of(n, ["tea"])], return_tensors="pt").input_ids.shape[1] for n in LENGTHS
    }
    buckets = {bucket_length(n) for n in token_lengths}
    assert len(token_lengths) == len(LENGTHS) and len(buckets) == 2
    counts = count_decode_compiles(model, tokenizer, LENGTHS, bucket=True)
    per_shape = counts[0]
    assert per_shape >= 1  # decoding was compiled at all
    assert counts[-1] <= per_shape * len(buckets) < len(LENGTHS), counts


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_unbucketed_static_cache_decoding_compiles_for_every_prompt_length(tiny_model_dir, device):
    """Why the buckets exist: without them, every new prompt length is a new compile."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_causal_lm(str(tiny_model_dir), dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    counts = count_decode_compiles(model, tokenizer, LENGTHS[:6], bucket=False)
    assert counts == [counts[0] * (i + 1) for i in range(6)], counts


# ------------------------------------------------------------------ (ii) RL steps per algorithm
# Last in the file: on CUDA each trainer decodes through the compiled static cache. Prompts of
# one length keep that to one shape.
RL_PROMPTS = ["Which drink do you prefer ?", "Which season do you like ?"]


@pytest.mark.parametrize("regularizer", ["kl", "cpm"])
@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "reinforce_pp"])
@pytest.mark.parametrize("device", DEVICES)
def test_rl_steps_on_device(tiny_model_dir, tmp_path, device, algo, regularizer):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, device, RL_PROMPTS, algo=algo, regularizer=regularizer
    )
    assert trainer.device.type == device
    before = torch.cat([p.detach().flatten().float().cpu() for p in trainer.policy.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten().float().cpu() for p in trainer.policy.parameters()])
    assert not torch.equal(before, after)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("policy_loss", "reward_mean", "penalty_mean", "kl_to_ref", "entropy"):
            assert math.isfinite(row[key]), (key, row)
        assert row["response_length"] >= 1
        assert ("value_loss" in row) == (algo == "ppo")
        if algo == "ppo":
            assert math.isfinite(row["value_loss"])
