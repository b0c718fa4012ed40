"""SFT and reward-model runs: exact resume after a crash, non-finite guards, option ranges."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import pmrlhf.reward
import pmrlhf.sft
from pmrlhf.cli import main
from pmrlhf.models import build_tiny_model, load_causal_lm, load_reward_model, load_tokenizer
from pmrlhf.reward import RMConfig, train_reward_model
from pmrlhf.runtime import read_jsonl
from pmrlhf.sft import SFTConfig, train_sft
from pmrlhf.training import NonFiniteError, make_accelerator, save_model

COLOURS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black"}
SNACKS = ["a crisp apple", "a sweet pear", "a ripe banana", "some sour grapes", "a rotten egg"]
QUESTION = "which snack is best ?"


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sft")
    words = ["Q : what colour is the ? A : the is ."] + [f"{k} {v}" for k, v in COLOURS.items()]
    base = build_tiny_model(folder / "base", words, seed=0)
    rng = random.Random(0)
    with (folder / "demos.jsonl").open("w") as f:
        for _ in range(40):
            thing = rng.choice(list(COLOURS))
            row = {
                "prompt": f"Q : what colour is the {thing} ? A :",
                "completion": f"the {thing} is {COLOURS[thing]} .",
            }
            f.write(json.dumps(row) + "\n")
    return base, folder / "demos.jsonl"


@pytest.fixture(scope="module")
def rm_setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("rm")
    base = build_tiny_model(folder / "base", [QUESTION, *SNACKS], seed=0)
    rng = random.Random(0)
    with (folder / "rankings.jsonl").open("w") as f:
        for _ in range(64):
            order = rng.sample(range(len(SNACKS)), 3)
            row = {"prompt": QUESTION, "responses": [SNACKS[i] for i in sorted(order)]}
            f.write(json.dumps(row) + "\n")
    return base, folder / "rankings.jsonl"


@pytest.fixture(scope="module")
def grouped_rm_setup(tmp_path_factory) -> tuple[Path, Path]:
    """Rankings of the snacks under three wordings of the question."""
    folder = tmp_path_factory.mktemp("rm_grouped")
    questions = [QUESTION, "which snack is the best ?", "which snack do you like ?"]
    base = build_tiny_model(folder / "base", [*questions, *SNACKS], seed=0)
    rng = random.Random(1)
    with (folder / "rankings.jsonl").open("w") as f:
        for i in range(60):
            order = rng.sample(range(len(SNACKS)), 3)
            row = {"prompt": questions[i % 3], "responses": [SNACKS[i] for i in sorted(order)]}
            f.write(json.dumps(row) + "\n")
    return base, folder / "rankings.jsonl"


def _sft_config(base: Path, data: Path, out: Path, **overrides: Any) -> SFTConfig:
    values: dict[str, Any] = dict(
        model=str(base), data=str(data), output_dir=str(out), lr=3e-3, batch_size=8,
        eval_fraction=0.1, quiet=True,
    )  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def _rm_config(base: Path, data: Path, out: Path, **overrides: Any) -> RMConfig:
    values: dict[str, Any] = dict(
        model=str(base), data=str(data), output_dir=str(out), lr=3e-3, batch_size=8,
        eval_fraction=0.1, quiet=True,
    )  # fmt: skip
    values.update(overrides)
    return RMConfig(**values)


class _CrashOnCall:
    """Wraps a loss function and raises on its ``n``-th call (0: never), like a killed run."""

    def __init__(self, fn: Any, n: int):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.fn(*args, **kwargs)


def _saved_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    assert weights, f"no weights in {model_dir}"
    return weights


def _assert_same_weights(a: str | Path, b: str | Path) -> None:
    wa, wb = _saved_weights(a), _saved_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0, msg=key)


def _crash_and_resume(
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    loss_name: str,
    train: Any,
    make_config: Any,
    tmp_path: Path,
    crash_call: int,
    resumed_step: int,
) -> None:
    """An uninterrupted run, and a run that crashes on the ``crash_call``-th loss evaluation and
    then resumes from its checkpoint: same final weights, metrics and evaluations."""
    loss_fn = getattr(module, loss_name)
    straight = train(make_config(tmp_path / "a"))

    monkeypatch.setattr(module, loss_name, _CrashOnCall(loss_fn, crash_call))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_config(tmp_path / "b"))
    checkpoint = tmp_path / "b" / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == resumed_step
    assert not (tmp_path / "b" / "model").exists()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')  # a line cut short by the crash

    monkeypatch.setattr(module, loss_name, loss_fn)
    resumed = train(make_config(tmp_path / "b"), resume=checkpoint)
    assert resumed["steps"] == straight["steps"]
    _assert_same_weights(resumed["model_dir"], straight["model_dir"])
    # each step is logged once, the ones trained again after the crash with the same values
    rows_a, rows_b = (
        read_jsonl(tmp_path / "a" / "metrics.jsonl"),
        read_jsonl(tmp_path / "b" / "metrics.jsonl"),
    )
    assert [r["step"] for r in rows_b] == list(range(1, straight["steps"] + 1))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    eval_a = json.loads((tmp_path / "a" / "eval.json").read_text())
    eval_b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert eval_b["before"] == eval_a["before"]
    numbers = {k: v for k, v in eval_a["after"].items() if isinstance(v, (int, float))}
    assert {k: eval_b["after"][k] for k in numbers} == pytest.approx(numbers, abs=1e-6)


# --------------------------------------------------------------------------- exact resume
def test_sft_resume_after_crash_matches_uninterrupted_run(sft_setup, tmp_path, monkeypatch):
    base, data = sft_setup
    # 36 training rows in 5 micro-batches, 2 per update: 3 updates per epoch, 9 in all.
    # The step-4 checkpoint lies 2 micro-batches into the second epoch; the crash hits step 6.
    overrides = dict(
        epochs=3, gradient_accumulation_steps=2, save_every=4, warmup_steps=2,
        lr_schedule="cosine",
    )  # fmt: skip
    _crash_and_resume(
        monkeypatch,
        pmrlhf.sft,
        "sft_loss",
        train_sft,
        lambda out: _sft_config(base, data, out, **overrides),
        tmp_path,
        crash_call=10,
        resumed_step=4,
    )


# lora: 58 training rankings in 8 batches per epoch, 16 steps; LoRA dropout draws from the RNG.
# The step-9 checkpoint lies 1 batch into the second epoch; the crash hits step 12.
# grouped: 54 training rankings of 3 prompts in batches of 12, 5 per epoch, 10 steps, in the
# grouped sampler's order; the step-7 checkpoint lies 2 batches into epoch 2.
@pytest.mark.parametrize(
    ("setup", "overrides", "crash_call", "resumed_step"),
    [
        ("rm_setup", dict(epochs=2, save_every=9, lora=True, lora_r=4, lora_dropout=0.2,
                          weight_decay=0.1), 12, 9),
        ("grouped_rm_setup", dict(epochs=2, batch_size=12, save_every=7, group_by_prompt=True),
         9, 7),
    ],
    ids=["lora", "grouped-by-prompt"],
)  # fmt: skip
def test_rm_resume_after_crash_matches_uninterrupted_run(
    setup, overrides, crash_call, resumed_step, request, tmp_path, monkeypatch
):
    base, data = request.getfixturevalue(setup)
    _crash_and_resume(
        monkeypatch,
        pmrlhf.reward,
        "ranking_loss",
        train_reward_model,
        lambda out: _rm_config(base, data, out, **overrides),
        tmp_path,
        crash_call=crash_call,
        resumed_step=resumed_step,
    )


def test_resume_needs_a_matching_checkpoint(sft_setup, rm_setup, tmp_path, capsys):
    base, data = sft_setup
    out = tmp_path / "sft"
    train_sft(_sft_config(base, data, out, max_steps=2, save_every=1))
    checkpoint = out / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1

    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        train_sft(_sft_config(base, data, out, max_steps=2), resume=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no trainer_state\.json\); did you mean .*checkpoint"):
        train_sft(_sft_config(base, data, out, max_steps=2), resume=out)
    with pytest.raises(ValueError, match=r"settings \(lr 0\.003 -> 0\.001\)"):
        train_sft(_sft_config(base, data, out, max_steps=2, lr=1e-3), resume=checkpoint)
    rm_base, rm_data = rm_setup
    with pytest.raises(ValueError, match="a pmrlhf sft checkpoint, not a pmrlhf rm checkpoint"):
        train_reward_model(_rm_config(rm_base, rm_data, tmp_path / "rm"), resume=checkpoint)

    args = ["sft", "--model", str(base), "--data", str(data), "--output-dir", str(out),
            "--resume", str(tmp_path / "missing")]  # fmt: skip
    assert main(args) == 2
    assert "pmrlhf sft: error: --resume" in capsys.readouterr().err

    # the right folder and settings resume (save_every may change): step 2 is trained again
    args = ["sft", "--model", str(base), "--data", str(data), "--output-dir", str(out),
            "--lr", "3e-3", "--batch-size", "8", "--eval-fraction", "0.1", "--max-steps", "2",
            "--save-every", "5", "--quiet", "true", "--resume", str(checkpoint)]  # fmt: skip
    assert main(args) == 0
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "eval.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------- non-finite guards
def test_diverging_reward_model_stops_and_keeps_the_last_good_checkpoint(
    rm_setup, tmp_path, capsys
):
    base, data = rm_setup
    out = tmp_path / "run"
    args = ["rm", "--model", str(base), "--data", str(data), "--output-dir", str(out),
            "--lr", "1e6", "--max-steps", "20", "--batch-size", "8", "--save-every", "1",
            "--quiet", "true"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    match = re.search(r"training stopped at step (\d+): the (training loss|gradient norm) is", err)
    assert match is not None, err
    stopped = int(match.group(1))
    assert "try a lower lr" in err
    assert stopped > 1  # the first steps were finite: there is a checkpoint to keep
    assert not (out / "model").exists() and not (out / "eval.json").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, stopped))
    assert all(math.isfinite(row["loss"]) for row in rows)
    checkpoint = out / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == stopped - 1
    model = load_reward_model(str(checkpoint / "model"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_diverging_sft_raises_non_finite_error(sft_setup, tmp_path):
    base, data = sft_setup
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"at step \d+: the .* is (nan|inf)"):
        train_sft(_sft_config(base, data, out, lr=1e20, max_steps=20))
    assert not (out / "model").exists() and not (out / "eval.json").exists()
    assert all(math.isfinite(row["loss"]) for row in read_jsonl(out / "metrics.jsonl"))


def test_non_finite_weights_are_never_saved(sft_setup, tmp_path):
    base, data = sft_setup
    model = load_causal_lm(str(base))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    accelerator = make_accelerator(_sft_config(base, data, tmp_path, dtype="fp32"))
    tokenizer = load_tokenizer(str(base))
    with pytest.raises(NonFiniteError, match=r"not finite \(model\.norm\.weight\)"):
        save_model(accelerator, model, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------- option ranges
BAD_OPTIONS = [
    ("lr", 0.0), ("lr", -1e-5), ("lr", float("nan")), ("lr", float("inf")),
    ("max_grad_norm", float("inf")), ("max_grad_norm", -1.0), ("weight_decay", -0.1),
    ("warmup_steps", -1), ("save_every", -1), ("eval_fraction", 1.0), ("eval_fraction", -0.1),
    ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.0), ("lora_dropout", -0.5),
    ("max_length", 1), ("max_prompt_tokens", 0), ("batch_size", 0),
    ("gradient_accumulation_steps", 0), ("epochs", 0), ("max_steps", 0), ("eval_batch_size", 0),
    ("split_fractions", [0.5, 0.5]), ("split_fractions", [0.2, -0.4, 0.4]),
    ("lr_schedule", "exponential"), ("dtype", "fp8"), ("subset", "ppo"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), BAD_OPTIONS)
@pytest.mark.parametrize("cls", [SFTConfig, RMConfig])
def test_out_of_range_options_are_refused_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        cls(model="m", data="d.jsonl", **{field: value})


@pytest.mark.parametrize(("field", "value"), [("calibration_bins", 0), ("loss", "hinge")])
def test_out_of_range_reward_model_options(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        RMConfig(model="m", data="d.jsonl", **{field: value})


def test_defaults_are_valid_and_the_cli_names_the_field(capsys):
    SFTConfig(model="m", data="d.jsonl")
    RMConfig(model="m", data="d.jsonl", max_steps=5, epochs=0)  # max_steps overrides epochs
    assert main(["rm", "--model", "m", "--data", "d.jsonl", "--max-grad-norm", "inf"]) == 2
    assert "max_grad_norm must be a finite number >= 0" in capsys.readouterr().err


def test_shared_optimisation_fields_and_sft_rm_defaults():
    from pmrlhf.optim import OptimConfig

    config = SFTConfig(model="m", data="d.jsonl")
    assert isinstance(config, OptimConfig)
    assert (config.lr_schedule, config.seed, config.warmup_steps) == ("linear", 1234, 0)
    assert RMConfig(model="m", data="d.jsonl").weight_decay == 0.1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_sft_resume_after_crash_matches_uninterrupted_run(sft_setup, tmp_path):
    import subprocess

    from conftest import two_process_launch

    base, data = sft_setup
    script = str(Path(__file__).parent / "scripts" / "crash_on_loss.py")

    def launch(crash_call: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
        # 36 training rows: 3 micro-batches of 8 per process and epoch, 6 steps in 2 epochs;
        # the step-4 checkpoint lies 1 micro-batch into the second epoch
        command, env = two_process_launch(
            script, str(crash_call), "sft", "--model", str(base), "--data", str(data),
            "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3",
            "--eval-fraction", "0.1", "--save-every", "4", "--quiet", "true", *extra,
        )  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=env)

    done = launch(0, tmp_path / "a")
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = launch(6, tmp_path / "b")  # step 6's micro-batch
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    checkpoint = tmp_path / "b" / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["epoch_batches"], state["processes"]) == (4, 1, 2)
    resumed = launch(0, tmp_path / "b", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / "b" / "model", tmp_path / "a" / "model")
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_rerun_into_a_used_folder_needs_overwrite(command, sft_setup, rm_setup, tmp_path):
    base, data = sft_setup if command == "sft" else rm_setup
    make, train = (_sft_config, train_sft) if command == "sft" else (_rm_config, train_reward_model)
    out = tmp_path / "run"
    train(make(base, data, out, max_steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(make(base, data, out, max_steps=2))
    stale = out / "checkpoint" / "stale-marker"
    stale.parent.mkdir(exist_ok=True)
    stale.write_text("from the earlier run")
    train(make(base, data, out, max_steps=2, overwrite=True))
    assert not stale.exists()  # the earlier run's checkpoint went before the new run wrote
    assert (out / "model").is_dir() and len(read_jsonl(out / "metrics.jsonl")) == 2
