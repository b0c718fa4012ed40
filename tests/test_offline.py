"""`pmrlhf dpo`: the offline losses' fixed points, the trainer, resume and its errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training_resume import _assert_same_weights, _crash_and_resume

import pmrlhf.offline
from pmrlhf.cli import main
from pmrlhf.models import build_tiny_model, load_causal_lm, load_tokenizer
from pmrlhf.offline import (
    OFFLINE_LOSSES,
    OfflineConfig,
    preference_loss,
    train_offline,
)
from pmrlhf.theory import (
    cpm_offline_fixed_point,
    dpo_fixed_point,
    kl_optimal_policy,
    pm_offline_fixed_point,
)

ANSWERS = ["red", "green", "blue", "black"]
REWARD = [0.8, 0.4, 0.0, -0.4]  # the annotators' hidden BTL reward
QUESTION = "which colour ?"


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum())


def _btl_pairs(n: int, reward: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n comparisons of two distinct answers drawn uniformly, the winner by BTL(reward)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(reward)
    first = torch.randint(k, (n,), generator=gen)
    second = (first + torch.randint(1, k, (n,), generator=gen)) % k
    r = torch.tensor(reward, dtype=torch.float64)
    first_wins = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(
        r[first] - r[second]
    )
    winner = torch.where(first_wins, first, second)
    loser = torch.where(first_wins, second, first)
    return winner, loser


# --------------------------------------------------------------------------- fixed points
@pytest.mark.parametrize("loss", list(OFFLINE_LOSSES))
def test_each_loss_converges_to_its_closed_form_on_one_token_answers(loss):
    """One token over K answers: the logits that minimise each loss on BTL pairs are the
    closed form, the reference-tilted KL optimum, softmax(r/β) or the g-tilted optimum."""
    reward = torch.tensor(REWARD, dtype=torch.float64)
    ref = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    alpha = 0.2  # answers 2 and 3 lie below it, so g tilts them
    beta = {"dpo": 0.5, "pm": 1.0, "cpm": 1.0}[loss]
    winner, loser = _btl_pairs(60_000, REWARD, seed=0)
    responses = torch.stack([winner, loser], -1)  # (N, 2), best first
    mask = torch.ones_like(responses, dtype=torch.bool)
    ref_logps = ref.log()[responses].unsqueeze(-1)  # one token per response
    token_mask = torch.ones_like(ref_logps)
    logits = torch.zeros(len(ANSWERS), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    spec = OFFLINE_LOSSES[loss]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        token_logps = torch.log_softmax(logits, -1)[responses].unsqueeze(-1)
        ref_arg = ref_logps if spec.needs_reference else None
        scores = spec.implied_reward(token_logps, ref_arg, token_mask, beta, alpha)
        value = preference_loss(scores, mask)
        value.backward()
        return value

    for _ in range(3):
        optimizer.step(closure)
    policy = torch.softmax(logits.detach(), -1)
    expected = {
        "dpo": dpo_fixed_point(reward, ref, beta),
        "pm": pm_offline_fixed_point(reward, beta),
        "cpm": cpm_offline_fixed_point(
            reward, ref.unsqueeze(-1), torch.ones(len(ANSWERS), 1), alpha, beta
        ),
    }[loss]
    assert _tv(policy, expected) <= 0.02
    # the three closed forms differ, so each test tells the losses apart
    others = {"dpo": pm_offline_fixed_point(reward, beta), "pm": kl_optimal_policy(reward, ref, 1),
              "cpm": pm_offline_fixed_point(reward, beta)}  # fmt: skip
    assert _tv(policy, others[loss]) > 0.05


def test_listwise_loss_has_the_same_fixed_point():
    """Rankings of three answers by Plackett–Luce(r): the PL form of the pm loss also lands on
    softmax(r/β)."""
    gen = torch.Generator().manual_seed(1)
    reward = torch.tensor(REWARD, dtype=torch.float64)
    n = 20_000
    picks = torch.stack([torch.randperm(4, generator=gen)[:3] for _ in range(n)])
    # order each draw by PL(r): Gumbel-perturbed rewards, sorted
    gumbel = -torch.log(-torch.log(torch.rand(picks.shape, generator=gen, dtype=torch.float64)))
    order = torch.argsort(reward[picks] + gumbel, dim=-1, descending=True)
    ranked = picks.gather(-1, order)
    mask = torch.ones_like(ranked, dtype=torch.bool)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        token_logps = torch.log_softmax(logits, -1)[ranked].unsqueeze(-1)
        scores = OFFLINE_LOSSES["pm"].implied_reward(
            token_logps, None, torch.ones_like(token_logps), 0.5, 0.05
        )
        value = preference_loss(scores, mask)
        value.backward()
        return value

    for _ in range(3):
        optimizer.step(closure)
    assert _tv(torch.softmax(logits.detach(), -1), pm_offline_fixed_point(reward, 0.5)) <= 0.02


# --------------------------------------------------------------------------- the trainer
def _write_pairs(path: Path, n: int) -> Path:
    winner, loser = _btl_pairs(n, REWARD, seed=2)
    with path.open("w") as f:
        for w, lo in zip(winner.tolist(), loser.tolist()):
            row = {"prompt": QUESTION, "chosen": ANSWERS[w], "rejected": ANSWERS[lo]}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def colour_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model whose answers are one word each, and 200 BTL pairs over them."""
    folder = tmp_path_factory.mktemp("offline")
    base = build_tiny_model(folder / "base", [QUESTION, *ANSWERS], seed=0, hidden_size=32)
    return base, _write_pairs(folder / "pairs.jsonl", 200)


def _config(base: Path, data: Path, out: Path, **overrides: Any) -> OfflineConfig:
    values: dict[str, Any] = dict(
        model=str(base), data=str(data), output_dir=str(out), lr=3e-3, batch_size=8,
        eval_fraction=0.1, quiet=True, max_steps=4,
    )  # fmt: skip
    values.update(overrides)
    return OfflineConfig(**values)


def _answer_probs(model_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced probabilities of each answer and of the EOS after it, (K, 2)."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir)).eval()
    prompt = tokenizer(QUESTION)["input_ids"]
    rows = []
    with torch.no_grad():
        for answer in ANSWERS:
            ids = prompt + tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            ids = [*ids, tokenizer.eos_token_id]
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            picked = logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            rows.append(picked[len(prompt) - 1 :].exp())
    return torch.stack(rows), torch.stack(rows).prod(-1)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(OFFLINE_LOSSES))
def test_trainer_reaches_the_closed_form_on_one_token_answers(loss, colour_setup, tmp_path):
    """The real trainer on a tiny LM: the answers' sequence probabilities, renormalised over
    the K answers, reach each loss's closed form (the loss only fixes their ratios)."""
    base, _ = colour_setup
    data = _write_pairs(tmp_path / "pairs.jsonl", 20_000)  # enough for 0.02 in TV
    beta = 1.0
    ref_tokens, ref_seq = _answer_probs(base)
    alpha = float(ref_tokens[:, 0].sort().values[1:3].mean())  # some answers below it
    result = train_offline(
        _config(base, data, tmp_path / loss, loss=loss, beta=beta, alpha=alpha, max_steps=None,
                epochs=3, batch_size=256, lr=1.5e-2, lr_schedule="linear", eval_fraction=0.0)
    )  # fmt: skip
    _, seq = _answer_probs(result["model_dir"])
    policy = seq / seq.sum()
    reward = torch.tensor(REWARD, dtype=torch.float64)
    expected = {
        "dpo": dpo_fixed_point(reward, ref_seq / ref_seq.sum(), beta),
        "pm": pm_offline_fixed_point(reward, beta),
        "cpm": cpm_offline_fixed_point(reward, ref_tokens, torch.ones_like(ref_tokens), alpha,
                                       beta),
    }[loss]  # fmt: skip
    assert _tv(policy, expected) <= 0.02, (policy, expected)


def test_offline_run_writes_model_metrics_and_eval(colour_setup, tmp_path):
    base, data = colour_setup
    result = train_offline(_config(base, data, tmp_path / "run", loss="cpm", beta=1.0,
                                   sft_weight=0.5, max_steps=3))  # fmt: skip
    assert result["steps"] == 3 and Path(result["model_dir"], "config.json").is_file()
    rows = [json.loads(line) for line in Path(result["metrics_file"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["sft_nll"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    after = result["eval"]
    assert after["pairs"] == after["rankings"] == result["n_eval"] > 0
    assert 0 <= after["pairwise_accuracy"] <= 1 and after["best_response_nll"] > 0


def test_pm_loads_no_reference_model(colour_setup, tmp_path, monkeypatch):
    base, data = colour_setup
    calls: list[str] = []
    original = pmrlhf.offline.reference_token_logps

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("ref")
        return original(*args, **kwargs)

    monkeypatch.setattr(pmrlhf.offline, "reference_token_logps", counting)
    train_offline(_config(base, data, tmp_path / "pm", loss="pm", beta=1.0, max_steps=1))
    assert calls == []
    train_offline(_config(base, data, tmp_path / "dpo", loss="dpo", max_steps=1))
    assert calls == ["ref", "ref"]  # one pass over the training and one over the eval rows


def test_reference_log_probs_are_cached_and_match_the_model(colour_setup):
    """The cached per-token log-probabilities are the reference model's own."""
    from pmrlhf.data import read_records
    from pmrlhf.offline import offline_collate, reference_token_logps, tokenize_offline

    base, data = colour_setup
    tokenizer = load_tokenizer(str(base))
    model = load_causal_lm(str(base)).eval()
    records = list(read_records(str(data), "ranking", tokenizer))[:5]
    examples, dropped = tokenize_offline(tokenizer, records, 64)
    assert dropped == 0
    cached = reference_token_logps(model, examples, tokenizer.pad_token_id, 2, "cpu")
    ref_tokens, _ = _answer_probs(base)
    for record, example in zip(records, cached):
        assert example.ref_logps is not None
        for response, values in zip(record.responses, example.ref_logps):
            expected = ref_tokens[ANSWERS.index(response)].log()
            torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected,
                                       atol=1e-5, rtol=0)  # fmt: skip
    batch = offline_collate(cached, tokenizer.pad_token_id)
    labelled = batch["labels"][:, 1:] != -100
    assert torch.equal(batch["ref_logps"] != 0, labelled)


def test_resume_after_crash_matches_uninterrupted_run(colour_setup, tmp_path, monkeypatch):
    base, data = colour_setup

    def make(out: Path) -> OfflineConfig:
        return _config(base, data, out, loss="dpo", max_steps=2, save_every=1, batch_size=4)

    _crash_and_resume(
        monkeypatch, pmrlhf.offline, "preference_loss", train_offline, make, tmp_path,
        crash_call=2, resumed_step=1,
    )  # fmt: skip


def test_lora_listwise_resume_through_the_cli(colour_setup, tmp_path, monkeypatch):
    """Rankings of three, LoRA, the command line: a run resumed from its step-1 checkpoint ends
    with the weights of the uninterrupted one."""
    base, _ = colour_setup
    rng = random.Random(0)
    data = tmp_path / "rankings.jsonl"
    with data.open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": QUESTION, "responses": rng.sample(ANSWERS, 3)}) + "\n")
    common = ["dpo", "--model", str(base), "--data", str(data), "--loss", "cpm", "--beta", "1",
              "--max-steps", "2", "--batch-size", "4", "--lora", "true", "--lora-r", "2",
              "--lr", "1e-2", "--quiet", "true"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "b"), "--save-every", "1"]) == 0
    checkpoint = tmp_path / "b" / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
    resumed = [*common, "--output-dir", str(tmp_path / "c"), "--resume", str(checkpoint)]
    assert main(resumed) == 0
    _assert_same_weights(tmp_path / "a" / "model", tmp_path / "c" / "model")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_run_resumes_exactly(colour_setup, tmp_path):
    """Two processes (gloo on the CPU), dpo with its cached reference: a run resumed from the
    step-2 checkpoint of another ends with the weights of the uninterrupted one."""
    import subprocess

    from conftest import two_process_launch

    base, data = colour_setup

    def launch(out: Path, *extra: str) -> None:
        command, env = two_process_launch(
            "-m", "pmrlhf", "dpo", "--model", str(base), "--data", str(data), "--loss", "dpo",
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--lr", "3e-3",
            "--eval-fraction", "0.1", "--quiet", "true", *extra,
        )  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "a")
    launch(tmp_path / "b", "--save-every", "2")
    checkpoint = tmp_path / "b" / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["processes"]) == (2, 2)
    launch(tmp_path / "c", "--resume", str(checkpoint))
    _assert_same_weights(tmp_path / "a" / "model", tmp_path / "c" / "model")


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "ipo"], "'loss' must be one of ['dpo', 'pm', 'cpm']"),
        (["--beta", "0"], "beta must be a finite number > 0"),
        (["--alpha", "1.5"], "alpha must lie in (0, 1)"),
        (["--sft-weight", "-1"], "sft_weight must be a finite number >= 0"),
        (["--max-steps", "0"], "max_steps must be an integer >= 1"),
    ],
)
def test_cli_refuses_bad_options_naming_them(args, message, colour_setup, tmp_path, capsys):
    base, data = colour_setup
    argv = ["dpo", "--model", str(base), "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--quiet", "true", *args]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_names_bad_data_and_wrong_checkpoints(colour_setup, tmp_path, capsys):
    base, data = colour_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": QUESTION, "chosen": "red"}) + "\n")
    common = ["dpo", "--model", str(base), "--quiet", "true", "--max-steps", "1"]
    for argv, message in [
        ([*common, "--data", str(bad), "--output-dir", str(tmp_path / "x")], "bad.jsonl"),
        ([*common, "--data", str(data), "--output-dir", str(tmp_path / "y"),
          "--resume", str(tmp_path / "missing")], "--resume"),
        ([*common, "--data", str(data), "--loss", "cpm", "--ref-model", str(tmp_path / "none"),
          "--output-dir", str(tmp_path / "z")], "none"),
    ]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # a checkpoint of another loss is refused, naming the changed setting
    run = [*common, "--data", str(data), "--output-dir", str(tmp_path / "ok"), "--max-steps", "2"]
    assert main([*run, "--save-every", "1"]) == 0
    assert main([*run, "--loss", "pm", "--resume", str(tmp_path / "ok" / "checkpoint")]) == 2
    err = capsys.readouterr().err
    assert "loss" in err and "Traceback" not in err, err


def test_sft_term_changes_the_fixed_point_towards_the_winners():
    """With sft_weight > 0 the minimiser is no longer the closed form: the NLL on preferred
    responses pulls mass towards the answers that win most often."""
    reward = torch.tensor(REWARD, dtype=torch.float64)
    winner, loser = _btl_pairs(20_000, REWARD, seed=3)
    responses = torch.stack([winner, loser], -1)
    mask = torch.ones_like(responses, dtype=torch.bool)
    wins = torch.bincount(winner, minlength=4).double() / len(winner)

    def fit(weight: float) -> torch.Tensor:
        logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logps = torch.log_softmax(logits, -1)
            scores = logps[responses]  # pm, β = 1
            value = preference_loss(scores, mask) - weight * logps[winner].mean()
            value.backward()
            return value

        for _ in range(3):
            optimizer.step(closure)
        return torch.softmax(logits.detach(), -1)

    plain, mixed = fit(0.0), fit(1.0)
    target = pm_offline_fixed_point(reward, 1.0)
    assert _tv(plain, target) <= 0.02
    assert _tv(mixed, wins) < _tv(plain, wins) and _tv(mixed, target) > 0.02


def test_cpm_reward_uses_the_strict_threshold_of_the_closed_form():
    """log g in the cpm loss is theory's: only tokens the reference gives at most α count, and
    a token exactly at α counts (π_ref > α is meaningful)."""
    from pmrlhf.theory import cpm_log_g

    ref = torch.tensor([[0.5, 0.25, 0.01], [0.25, 0.9, 0.3]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    policy = torch.zeros_like(ref)
    reward = OFFLINE_LOSSES["cpm"].implied_reward(policy, ref.log(), mask, 2.0, 0.25)
    expected = -2.0 * cpm_log_g(ref, mask, 0.25)
    torch.testing.assert_close(reward, expected)
    torch.testing.assert_close(expected, -2.0 * torch.tensor([math.log(0.25 * 0.01),
                                                              math.log(0.25)], dtype=torch.float64))  # fmt: skip


def test_demo_table_and_report_show_the_offline_rows(tmp_path):
    from pmrlhf.evaluate import AnswerDistribution
    from pmrlhf.report import DemoResults, format_table, write_report

    row = {"tv_to_target": 0.25, "pmd": 0.5, "invalid_rate": 0.0, "target_minority_mass": 0.4,
           "minority_mass": 0.3}  # fmt: skip
    results = DemoResults(
        methods={"kl": row, "cpm": row, "dpo": {**row, "invalid_rate": 0.7}, "cpm-dpo": row},
        pmd_improvement={"cpm": 0.5, "cpm-dpo over dpo": 0.9}, seconds=3.0, version="0.0",
        alpha_summary="cpm α=0.05: example", seed=0, rl_algo="rloo", rl_steps=10,
        prompts_per_step=2, samples_per_prompt=4, eval_samples=50, kl_beta=0.1, pm_beta=1.0,
        cpm_beta=1.0, cpm_alpha=0.05, dpo_beta=0.1, offline_beta=1.0, offline_steps=30,
        offline_sft_weight=0.5,
    )  # fmt: skip
    table = format_table(results)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["kl", "cpm", "dpo", "cpm-dpo"]
    assert "PMD improvement over kl: cpm +50%" in table
    assert "PMD improvement over dpo: cpm-dpo +90%" in table
    dist = AnswerDistribution("q", "season", ["a", "b"], [0.5, 0.3, 0.2], [0.6, 0.4, 0.0],
                              [0.55, 0.45, 0.0])  # fmt: skip
    write_report(results, {m: [dist] for m in results.methods}, {}, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "**dpo (β=0.1, offline)** trains `pmrlhf dpo` for 30" in report
    assert (
        "invalid rate 0.700" in report and "**cpm-dpo (β=1.0, sft_weight=0.5, offline)**" in report
    )


def test_example_config_is_valid():
    import yaml

    from pmrlhf.config import load_config

    path = Path(__file__).parents[1] / "configs" / "dpo_example.yaml"
    config = load_config(OfflineConfig, yaml.safe_load(path.read_text()), source=str(path))
    assert config.loss == "cpm" and config.beta == 1.0 and config.subset == "rm"
