"""The compute floor of ``benchmarks/bench_rloo.py``: the analytic matmul count of a pmrlhf step
(``benchmarks/flops.py``) against ``torch.utils.flop_counter``, and the floor fields of a real
(tiny) benchmark run.

On a CPU the flop counter has no formula for the fused SDPA kernel, so with SDPA it sees only
the linear layers and the LM head (``attention=False``); with eager attention the ``q·kᵀ`` and
``p·v`` products are plain batched matmuls and it sees everything.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

# min_new_tokens forbids EOS, which the RL config warns about: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*min_new_tokens")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench_rloo  # noqa: E402
from flops import (  # noqa: E402
    ModelShape,
    forward_flops,
    generation_flops,
    measure_peak_matmul,
    rl_step_flops,
)

# (B, P, T): completions, prompt tokens, new tokens
B, P, T = 3, 5, 4

SHAPES = {
    # what pmrlhf.models.build_tiny_model writes: MLP 2 × hidden, one KV head per head, tied
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4),
    # grouped KV heads, a wider MLP, separate LM head
    "gqa-untied": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=False,
    ),
}


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def tiny_llama(shape: str, attention: str):
    from transformers import LlamaForCausalLM

    from pmrlhf.models import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(50, **SHAPES[shape])
    config.pad_token_id = config.eos_token_id = None  # generate samples exactly T tokens
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 50, (B, P + T), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_forward_and_backward_match_flop_counter(shape, attention):
    """The scoring forward (``logits_to_keep = T + 1``) and its backward, as counted."""
    from pmrlhf.rl.rollout import response_logits

    model = tiny_llama(shape, attention)
    model_shape = ModelShape.from_config(model.config)
    with_attention = attention == "eager"
    ids, mask = batch()
    outputs: list[torch.Tensor] = []
    forward = counted(lambda: outputs.append(response_logits(model, ids, mask, P)))
    assert outputs[0].shape == (B, T, 50)
    expected = forward_flops(model_shape, B, P + T, T + 1, attention=with_attention)
    assert forward == expected
    backward = counted(lambda: outputs[0].logsumexp(-1).sum().backward())
    assert backward == 2 * expected
    # the policy forward and backward of a step are these two, with the same batch
    step = rl_step_flops(model_shape, B, P, T, reference=True, attention=with_attention)
    assert step["policy_forward"] == step["reference"] == forward
    assert step["backward"] == backward


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_generation_matches_flop_counter(shape, attention):
    """Prefill (LM head at the last position) + T − 1 KV-cache decoding steps, as counted."""
    from pmrlhf.rl.rollout import sampling_config

    model = tiny_llama(shape, attention).eval()
    ids, mask = batch()
    config = sampling_config(max_new_tokens=T, min_new_tokens=T)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        flops = counted(
            lambda: out.append(
                model.generate(
                    input_ids=ids[:, :P], attention_mask=mask[:, :P], generation_config=config
                )
            )
        )
    assert out[0].shape == (B, P + T)
    shape_ = ModelShape.from_config(model.config)
    assert flops == generation_flops(shape_, B, P, T, attention=attention == "eager")
    # one more decoding step: the per-token cost plus 4 · layers · heads · head_dim FLOPs for
    # each of its P + T cached keys (both shapes: 2 layers, 4 heads of 16 dims)
    one_more = generation_flops(shape_, B, P, T + 1) - generation_flops(shape_, B, P, T)
    attention = 4 * 2 * 4 * 16 * B * (P + T)
    assert one_more == forward_flops(shape_, B, 1, 1, attention=False) + attention


@pytest.fixture(scope="module")
def bench_args(tmp_path_factory):
    args = bench_rloo.parse_args(
        ["--preset", "cpu-tiny", "--sides", "kl,pm", "--steps", "2", "--warmup", "1",
         "--prompts-per-step", "2", "--samples-per-prompt", "2", "--prompt-tokens", "5",
         "--new-tokens", "4", "--vocab", "64", "--num-prompts", "4"]
    )  # fmt: skip
    model_dir = bench_rloo.build_model(args, tmp_path_factory.mktemp("bench") / "model")
    return args, model_dir


@pytest.mark.parametrize("regularizer", ["kl", "pm"])
def test_whole_step_matches_flop_counter(bench_args, regularizer, tmp_path):
    """One real ``RLTrainer.train_step()`` of the benchmark, counted, equals the analytic total:
    no matmul of the step is missed or counted twice (pm has no reference forward). The lean
    decoder attends to every slot of its static cache, more than the floor's real keys, so the
    comparison leaves attention out (the counter sees none in the fused CPU kernel); the
    prefill runs once per distinct prompt of the step."""
    args, model_dir = bench_args
    trainer = bench_rloo.make_pmrlhf(args, model_dir, regularizer, tmp_path / regularizer)
    assert trainer.decoder == "lean"
    side = bench_rloo.PmrlhfSide(f"pmrlhf_{regularizer}", trainer, args)
    distinct = len(set(trainer._step_prompts()))
    flops = counted(trainer.train_step)
    expected = bench_rloo.side_flops(side, args, prompts=distinct, attention=False)
    assert flops == expected["total"]
    assert ("reference" in expected) == (regularizer == "kl")
    assert expected["total"] == sum(v for k, v in expected.items() if k != "total")


def test_peak_matmul_rate_is_a_rate():
    result = measure_peak_matmul("cpu", torch.float32, [(64, 32, 48), (128, 128, 128)], repeats=2)
    assert math.isfinite(result["peak_gflops"]) and result["peak_gflops"] > 0
    assert result["peak_shape"] in ([64, 32, 48], [128, 128, 128])
    key = "x".join(str(n) for n in result["peak_shape"])
    assert result["gflops_by_shape"][key] == pytest.approx(result["peak_gflops"], abs=0.01)
    assert set(result["gflops_by_shape"]) == {"64x32x48", "128x128x128"}


def test_benchmark_reports_its_floor(bench_args, tmp_path, capsys):
    """A tiny kl + pm run: the floor fields are there and agree with each other."""
    model_dir = bench_args[1]
    out = tmp_path / "result.json"
    argv = ["--preset", "cpu-tiny", "--sides", "kl,pm", "--steps", "2", "--warmup", "1",
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--prompt-tokens", "5",
            "--new-tokens", "4", "--vocab", "64", "--num-prompts", "4", "--threads", "1",
            "--model-dir", str(model_dir), "--json", str(out)]  # fmt: skip
    assert bench_rloo.main(argv) == 0
    result = json.loads(out.read_text())
    floor = result["floor"]
    peak = floor["peak_matmul_gflops"]
    assert math.isfinite(peak) and peak > 0
    assert floor["peak_matmul_threads"] == 1 and floor["peak_matmul_dtype"] == "fp32"
    assert len(floor["peak_matmul_shape"]) == 3
    assert "trl_over_floor" not in floor  # TRL did not run
    shape = ModelShape(64, 2, 4, 4, 128, 64)
    for name, reference in (("pmrlhf_kl", True), ("pmrlhf_pm", False)):
        side = result[name]
        flops = side["flops_per_step"]
        assert flops == rl_step_flops(shape, 4, 5, 4, reference=reference, prompts=2)
        assert side["floor_seconds"] == pytest.approx(flops["total"] / (peak * 1e9), rel=1e-3)
        assert side["step_over_floor"] == pytest.approx(
            side["seconds_per_step"] / side["floor_seconds"], rel=1e-2
        )
        assert side["step_over_floor"] > 0
        phases = side["phase_floor_seconds"]
        assert set(phases) == {k for k in flops if k != "total"}
        assert sum(phases.values()) == pytest.approx(side["floor_seconds"], rel=1e-3)
        for phase, ratio in side["phase_over_floor"].items():
            assert ratio == pytest.approx(
                side["phase_seconds"][phase] / phases[phase], rel=1e-2, abs=1e-3
            )
    err = capsys.readouterr().err
    assert "peak matmul" in err and "pmrlhf_kl:" in err and "its floor" in err


def test_benchmark_floor_against_trl(bench_args, tmp_path):
    """With TRL in the run, ``trl_over_floor`` is TRL's step time over each side's floor."""
    pytest.importorskip("trl")
    out = tmp_path / "result.json"
    argv = ["--preset", "cpu-tiny", "--sides", "trl,kl,pm", "--steps", "2", "--warmup", "1",
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--prompt-tokens", "5",
            "--new-tokens", "4", "--vocab", "64", "--num-prompts", "4", "--threads", "1",
            "--model-dir", str(bench_args[1]), "--json", str(out)]  # fmt: skip
    assert bench_rloo.main(argv) == 0
    result = json.loads(out.read_text())
    trl_over = result["floor"]["trl_over_floor"]
    assert set(trl_over) == {"pmrlhf_kl", "pmrlhf_pm"}
    for name, ratio in trl_over.items():
        expected = result["trl"]["seconds_per_step"] / result[name]["floor_seconds"]
        assert ratio == pytest.approx(expected, rel=1e-2)
    # the kl side does a reference forward that the pm side does not: a higher floor
    assert result["pmrlhf_kl"]["floor_seconds"] > result["pmrlhf_pm"]["floor_seconds"]
    assert trl_over["pmrlhf_kl"] < trl_over["pmrlhf_pm"]
