"""Rollouts: the sampled distribution is exactly the scored one, and masked positions stay finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXTS

from pmrlhf.models import build_tiny_model, load_causal_lm, load_tokenizer
from pmrlhf.rl.losses import clipped_policy_loss
from pmrlhf.rl.rollout import DECODERS, generate, token_logprobs

PROMPT = "Which drink do you prefer ?"
EOS = 2


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose next-token distribution after ``PROMPT`` is far from uniform.

    Doubling the tied embedding doubles the logits' spread, so that every sampling tweak a
    checkpoint can carry (``min_p``, typical, ε/η cut-offs, penalties …) visibly moves it; EOS
    gets the most likely word's output row, so that settings acting on EOS show as well.
    """
    out = build_tiny_model(tmp_path_factory.mktemp("peaked"), TINY_TEXTS, seed=0)
    model = load_causal_lm(str(out))
    tokenizer = load_tokenizer(str(out))
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.mul_(2.0)
        top = int(torch.argmax(next_token_probs(model, tokenizer, [])))
        weight[EOS] = weight[top]
    model.save_pretrained(out)
    return out


def with_generation_config(model_dir: Path, tmp_path: Path, settings: dict) -> Path:
    """A copy of ``model_dir`` whose ``generation_config.json`` also carries ``settings``."""
    out = tmp_path / "model"
    out.mkdir()
    for item in model_dir.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    config = json.loads((out / "generation_config.json").read_text())
    config.update(settings)
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@torch.no_grad()
def next_token_probs(model, tokenizer, prefix: list[int], allowed: list[int] | None = None):
    """The model's own softmax after ``PROMPT`` + ``prefix`` (optionally over ``allowed`` only)."""
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.tensor([prefix], dtype=torch.long)], dim=1)
    logits = model(input_ids=ids).logits[0, -1].double()
    if allowed is not None:
        keep = torch.full_like(logits, float("-inf"))
        keep[allowed] = 0.0
        logits = logits + keep
    return torch.softmax(logits, -1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; a sample outside the support is infinite."""
    n = counts.sum()
    expected = n * probs
    support = expected > 0
    if bool((counts[~support] > 0).any()):
        return math.inf, int(support.sum()) - 1
    stat = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    return float(stat), int(support.sum()) - 1


def assert_same_distribution(counts: torch.Tensor, probs: torch.Tensor) -> None:
    stat, df = chi_square(counts.double(), probs.double())
    tv = 0.5 * float((counts.double() / counts.sum() - probs).abs().sum())
    # mean + 6 standard deviations of a χ²(df): a fixed seed never comes near it by chance.
    assert stat < df + 6 * math.sqrt(2 * df), f"χ² {stat:.1f} on {df} df (TV {tv:.3f})"
    assert tv < 0.05, f"TV {tv:.3f}"


# Each of these changes what transformers' generate samples when it is left to apply it from the
# checkpoint. (temperature, top_k, top_p, do_sample and min_length were always passed explicitly;
# they stay here so that they remain so.)
CHECKPOINT_SETTINGS = {
    "repetition_penalty": 3.0,
    "no_repeat_ngram_size": 1,
    "min_p": 0.3,
    "typical_p": 0.2,
    "epsilon_cutoff": 0.05,
    "eta_cutoff": 0.05,
    "top_k": 1,
    "top_p": 0.1,
    "temperature": 0.1,
    "suppress_tokens": "TOP",
    "begin_suppress_tokens": "TOP",
    "bad_words_ids": "TOP_WORDS",
    "sequence_bias": "TOP_BIAS",
    "forced_eos_token_id": EOS,
    "exponential_decay_length_penalty": [-1, 10.0],
    "min_length": 64,
    "num_beams": 3,
    "num_return_sequences": 2,
    "guidance_scale": 3.0,
    "do_sample": False,
    "top_h": 0.3,
    "watermarking_config": {"greenlist_ratio": 0.25, "bias": 5.0, "context_width": 1},
}


def _resolve(value, top: int):
    if not isinstance(value, str):
        return value
    return {"TOP": [top], "TOP_WORDS": [[top]], "TOP_BIAS": [[[top], 5.0]]}[value]


def _sample_first_tokens(
    model_dir: Path, n: int = 4000, decoder: str = "hf"
) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_causal_lm(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    probs = next_token_probs(model, tokenizer, [])
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, [PROMPT] * n, max_new_tokens=1, decoder=decoder)
    assert rollout.sequences.shape[0] == n
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=probs.numel())
    return counts, probs


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("field", sorted(CHECKPOINT_SETTINGS))
def test_rollouts_ignore_each_checkpoint_generation_setting(
    peaked_model_dir, tmp_path, field, decoder
):
    probs = _sample_first_tokens(peaked_model_dir, n=1)[1]
    top = int(torch.argmax(probs.index_fill(0, torch.tensor([EOS]), 0.0)))  # a word, not EOS
    settings = {field: _resolve(CHECKPOINT_SETTINGS[field], top)}
    if field in ("num_return_sequences", "guidance_scale"):
        settings["num_beams"] = settings.get("num_beams", 3)
    model_dir = with_generation_config(peaked_model_dir, tmp_path, settings)
    model = load_causal_lm(str(model_dir))
    loaded = model.generation_config.to_dict()
    assert loaded[field] is not None, "the checkpoint's setting did not load"
    counts, probs = _sample_first_tokens(model_dir, decoder=decoder)
    assert_same_distribution(counts, probs)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_rollouts_ignore_all_checkpoint_settings_at_once_over_two_tokens(
    peaked_model_dir, tmp_path, decoder
):
    """Two-token responses over four allowed tokens: the 16 joint frequencies match π."""
    tokenizer = load_tokenizer(str(peaked_model_dir))
    # two of the prompt's own words (penalised by repetition settings) and two others
    allowed = tokenizer.convert_tokens_to_ids(["drink", "prefer", "tea", "coffee"])
    settings = {
        "repetition_penalty": 3.0,
        "no_repeat_ngram_size": 1,
        "min_p": 0.3,
        "suppress_tokens": [allowed[3]],
        "top_k": 1,
        "temperature": 0.1,
        "do_sample": False,
    }
    model_dir = with_generation_config(peaked_model_dir, tmp_path, settings)
    model = load_causal_lm(str(model_dir))
    assert model.generation_config.repetition_penalty == 3.0
    first = next_token_probs(model, tokenizer, [], allowed)
    joint = torch.zeros(len(allowed), len(allowed), dtype=torch.float64)
    for i, a in enumerate(allowed):
        second = next_token_probs(model, tokenizer, [a], allowed)
        joint[i] = first[a] * second[allowed]
    n = 4000
    torch.manual_seed(1)
    rollout = generate(
        model, tokenizer, [PROMPT] * n, max_new_tokens=2, stop_at_eos=False,
        allowed_token_ids=allowed, decoder=decoder,
    )  # fmt: skip
    index = {tok: k for k, tok in enumerate(allowed)}
    pairs = rollout.response_ids.tolist()
    counts = torch.zeros_like(joint)
    for a, b in pairs:
        counts[index[a], index[b]] += 1
    assert_same_distribution(counts.flatten(), joint.flatten())


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_a_lora_wrapped_policy_ignores_its_base_checkpoint_settings(
    peaked_model_dir, tmp_path, decoder
):
    from pmrlhf.lora import apply_lora

    settings = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_p": 0.3}
    model_dir = with_generation_config(peaked_model_dir, tmp_path, settings)
    model = apply_lora(load_causal_lm(str(model_dir)), "causal_lm", r=4).eval()
    tokenizer = load_tokenizer(str(model_dir))
    probs = next_token_probs(model, tokenizer, [])
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, [PROMPT] * 4000, max_new_tokens=1, decoder=decoder)
    assert_same_distribution(
        torch.bincount(rollout.response_ids[:, 0], minlength=probs.numel()), probs
    )
    assert model.get_base_model().generation_config.repetition_penalty == 3.0  # restored after


def test_evaluation_samples_through_the_same_rollout_function():
    """PMD, the demo and the trainer sample only through :func:`pmrlhf.rl.rollout.generate`."""
    import pmrlhf
    from pmrlhf import evaluate
    from pmrlhf.rl import rollout

    assert evaluate.generate is rollout.generate
    package = Path(pmrlhf.__file__).parent
    callers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if ".generate(" in path.read_text() and path != Path(rollout.__file__)
    ]
    assert callers == [], f"these modules call HF generate directly: {callers}"


# ----------------------------------------------------------------------------- masked positions


def padded_batch(tokenizer, responses: list[list[int]]):
    """``[prompt | response + pads]`` rows laid out exactly as a rollout lays them out."""
    prompt = tokenizer([PROMPT], return_tensors="pt").input_ids[0].tolist()
    width = max(len(r) for r in responses)
    rows, masks = [], []
    for response in responses:
        pads = width - len(response)
        rows.append(prompt + response + [tokenizer.pad_token_id] * pads)
        masks.append([1] * (len(prompt) + len(response)) + [0] * pads)
    return torch.tensor(rows), torch.tensor(masks), len(prompt)


def test_padding_positions_score_zero_and_every_loss_stays_finite(tiny_model_dir):
    """Allowed tokens exclude the pad token; responses of different lengths are padded."""
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tea, coffee, water = tokenizer.convert_tokens_to_ids(["tea", "coffee", "water"])
    allowed = [tea, coffee, water, EOS]
    assert tokenizer.pad_token_id not in allowed
    seq, attn, p_len = padded_batch(tokenizer, [[tea, EOS], [coffee, water, tea, EOS]])
    mask = attn[:, p_len:].float()

    logp, entropy = token_logprobs(model, seq, attn, p_len, True, allowed)
    assert entropy is not None
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.equal(logp[0, 2:], torch.zeros(2)) and torch.equal(entropy[0, 2:], torch.zeros(2))
    # the short row's real tokens score as they do without any padding
    alone, _ = token_logprobs(
        model, seq[:1, : p_len + 2], attn[:1, : p_len + 2], p_len, False, allowed
    )
    torch.testing.assert_close(logp[0, :2], alone[0], rtol=0, atol=1e-5)

    with torch.no_grad():
        ref_logp, _ = token_logprobs(model, seq, attn, p_len, False, allowed)
    advantages = torch.tensor([[1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    for aggregation in ("seq-mean-token-sum", "token-mean"):
        loss, clip_fraction = clipped_policy_loss(
            logp, ref_logp - 0.1, advantages, mask, 0.2, aggregation
        )
        assert torch.isfinite(loss) and torch.isfinite(clip_fraction)
    kl_to_ref = ((logp - ref_logp) * mask).sum(-1).mean()
    assert torch.isfinite(kl_to_ref)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("restricted", [False, True])
def test_entropy_equals_the_categorical_entropy(tiny_model_dir, restricted):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tea, coffee, water = tokenizer.convert_tokens_to_ids(["tea", "coffee", "water"])
    allowed = [tea, coffee, water, EOS] if restricted else None
    seq, attn, p_len = padded_batch(tokenizer, [[tea, EOS], [coffee, water, tea, EOS]])
    _, entropy = token_logprobs(model, seq, attn, p_len, True, allowed)
    assert entropy is not None
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn).logits[:, p_len - 1 : -1].double()
    if allowed is not None:
        keep = torch.full((logits.shape[-1],), float("-inf"), dtype=logits.dtype)
        keep[allowed] = 0.0
        logits = logits + keep
    expected = torch.distributions.Categorical(logits=logits).entropy().float()
    valid = attn[:, p_len:].bool()
    torch.testing.assert_close(entropy[valid], expected[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_rl_with_allowed_tokens_and_responses_of_different_lengths_stays_finite(
    tiny_model_dir, tmp_path, algo
):
    from pmrlhf.rl.config import RLConfig
    from pmrlhf.rl.trainer import RLTrainer
    from pmrlhf.runtime import read_jsonl

    tokenizer = load_tokenizer(str(tiny_model_dir))
    allowed = [*tokenizer.convert_tokens_to_ids(["tea", "coffee", "water"]), EOS]
    config = RLConfig(
        policy=str(tiny_model_dir), reward=f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea",
        algo=algo, regularizer="kl", max_steps=2, prompts_per_step=2, samples_per_prompt=4,
        max_new_tokens=6, lr=1e-2, beta=0.1, output_dir=str(tmp_path), quiet=True,
    )  # fmt: skip

    lengths: list[set[int]] = []

    class Recording(RLTrainer):
        def _rollout(self, prompts):
            rollout = super()._rollout(prompts)
            lengths.append(set(rollout.response_mask.sum(-1).tolist()))
            return rollout

    torch.manual_seed(0)
    trainer = Recording(config, prompts=[PROMPT], allowed_token_ids=allowed)
    trainer.train()
    assert all(len(step) > 1 for step in lengths), f"responses all had one length: {lengths}"
    for row in read_jsonl(tmp_path / "metrics.jsonl"):
        for key in ("policy_loss", "kl_to_ref", "penalty_mean", "entropy", "logp_mean"):
            assert math.isfinite(row[key]), (key, row)
    for param in trainer.policy.parameters():
        assert torch.isfinite(param).all()


def test_distinct_rows_keep_first_appearances_in_order():
    from pmrlhf.rl.rollout import distinct_rows

    seq = torch.tensor([[5, 7, 2], [5, 8, 2], [5, 7, 2], [0, 7, 2], [5, 8, 2], [0, 7, 2]])
    attn = torch.ones_like(seq)
    attn[3, 0] = 0  # row 3 starts with padding that has a real token's id in row 5
    rows = distinct_rows(seq, attn)
    assert rows.index.tolist() == [0, 1, 3, 5]
    assert rows.inverse.tolist() == [0, 1, 0, 2, 1, 3]
    assert rows.count == 4
    assert torch.equal(rows.take(seq[rows.index]), seq)
    assert torch.equal(rows.take(attn[rows.index]), attn)
    # nothing repeated: every row is its own
    unique = distinct_rows(seq[:2], attn[:2])
    assert unique.index.tolist() == [0, 1] and unique.inverse.tolist() == [0, 1]
