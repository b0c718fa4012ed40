"""`pmrlhf alpha`: choosing cpm's threshold α from the reference's token probabilities."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pmrlhf import models
from pmrlhf.alpha import (
    ALPHA_GRID,
    alpha_report,
    plot_alpha_report,
    separating_alpha,
    separation_score,
)
from pmrlhf.cli import main
from pmrlhf.evaluate import valid_sequence_logprobs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model that answers one prompt validly most of the time; its slips are unlikely
    tokens (conftest.fit_tiny_world_model). Saved to disk too."""
    from conftest import fit_tiny_world_model

    return fit_tiny_world_model(tmp_path_factory.mktemp("m"))


def test_separating_alpha_lies_in_the_gap_between_slips_and_valid_tokens():
    valid = np.array([0.05, 0.3, 0.9, 0.99])
    slips = np.array([5e-5, 3e-4, 2e-3])
    alpha = separating_alpha(valid, slips)
    assert 2e-3 < alpha < 0.05
    assert separation_score(valid, slips, alpha) == 2.0
    # ties: the geometric middle of the grid values inside the gap
    inside = [a for a in ALPHA_GRID if 2e-3 <= a < 0.05]
    assert alpha == pytest.approx(math.sqrt(inside[0] * inside[-1]))
    # a different gap moves α with it
    assert 0.3 < separating_alpha(np.array([0.4, 0.9]), np.array([0.01, 0.3])) < 0.4


def test_separating_alpha_on_overlapping_groups_is_the_best_grid_threshold():
    valid = np.array([0.002, 0.2, 0.5, 0.8])  # one valid token lies among the slips
    slips = np.array([1e-4, 5e-4, 0.01, 0.02])
    alpha = separating_alpha(valid, slips)
    best = max(separation_score(valid, slips, a) for a in ALPHA_GRID)
    assert separation_score(valid, slips, alpha) == pytest.approx(best)
    assert best < 2.0  # the groups overlap: no threshold is clean
    assert best == 1.75  # 3 of 4 valid tokens above, every slip at or below
    assert 0.02 <= alpha < 0.2


def test_separating_alpha_keeps_the_valid_responses_whole_before_catching_likely_slips():
    # 5% of the valid responses have a token at 0.03; half of the slips are likely (0.1)
    valid = np.array([0.5] * 95 + [0.03] * 5)
    slips = np.array([1e-3] * 10 + [0.1] * 10)
    # unbounded, catching the likely slips wins: α ≥ 0.1 puts the 5% of valid responses under it
    assert separating_alpha(valid, slips) >= 0.1
    # bounded at 1% of the valid responses, α stays below them and leaves the likely slips
    alpha = separating_alpha(valid, slips, max_valid_below=0.01)
    assert 1e-3 <= alpha < 0.03
    assert separation_score(valid, slips, alpha) == pytest.approx(1.5)
    assert 0.03 <= separating_alpha(valid, slips, max_valid_below=0.05) < 0.5
    # no grid value keeps them whole: the smallest one, where the fewest are lost
    assert separating_alpha(np.array([1e-5, 0.5]), slips, max_valid_below=0.0) == ALPHA_GRID[0]


def test_report_with_a_world_separates_valid_answers_from_slips(fitted, tmp_path):
    world, tokenizer, policy, prompt, _ = fitted
    report = alpha_report(policy, tokenizer, [prompt], world=world, max_new_tokens=12,
                          samples_per_prompt=200, seed=0, batch_size=64)  # fmt: skip
    assert report.method == "separation" and report.samples == 200
    assert report.valid_samples + report.invalid_samples == 200
    assert report.invalid_samples > 0 and report.valid_samples > 100
    assert len(report.slip_probabilities) == report.invalid_samples
    # every invalid sample is kept as text, e.g. for annotators to rank below the answers
    assert len(report.slip_responses) == report.invalid_samples
    assert all(row["prompt"] == prompt and world.classify(prompt, row["response"]) is None
               for row in report.slip_responses)  # fmt: skip
    assert repr(report.slip_responses[0]["response"].strip()) in report.summary
    # valid-answer tokens include every teacher-forced token of every valid answer
    logp, mask = valid_sequence_logprobs(policy, tokenizer, world, prompt)
    forced = logp.double().exp()[mask.bool()]
    assert report.valid_tokens > int(mask.sum())
    assert min(report.valid_probabilities) <= float(forced.min()) + 1e-12
    # this reference's slips are all less likely than any valid-answer token: α separates them
    highest_slip, lowest_valid = max(report.slip_probabilities), min(report.valid_probabilities)
    assert highest_slip < report.recommended_alpha < lowest_valid
    assert report.separated and report.valid_at_or_below == 0.0 and report.slips_above == 0.0
    assert "separation: clean" in report.summary
    # the grid table agrees with the raw probabilities
    for row in report.grid:
        a = row["alpha"]
        assert row["slips_above"] == np.mean(np.array(report.slip_probabilities) > a)
        assert row["valid_at_or_below"] == np.mean(np.array(report.valid_probabilities) <= a)
    # seeded: the same seed and batches give the same report
    again = alpha_report(policy, tokenizer, [prompt], world=world, max_new_tokens=12,
                         samples_per_prompt=200, seed=0, batch_size=64)  # fmt: skip
    assert again.to_dict() == report.to_dict()
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["recommended_alpha"] == report.recommended_alpha
    assert sum(saved["histogram_log10"]["slips"]) == report.invalid_samples
    assert "valid_probabilities" not in saved and saved["summary"] == report.summary
    assert saved["slip_responses"] == report.slip_responses
    assert plot_alpha_report(report, tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_a_world_flags_an_overlap(fitted, tmp_path):
    """Before fine-tuning, slips and valid-answer tokens overlap: no clean threshold exists."""
    world, tokenizer, _, prompt, _ = fitted
    base = models.build_tiny_model(tmp_path / "base", world.vocabulary(), seed=3)  # not fitted
    ref = models.load_causal_lm(str(base)).eval()
    report = alpha_report(ref, tokenizer, [prompt], world=world, max_new_tokens=12,
                          samples_per_prompt=40)  # fmt: skip
    assert not report.separated
    assert report.valid_at_or_below + report.slips_above > 0

    # α is chosen on responses: no grid value keeps more valid responses whole (every token
    # above α) while putting more slips at or below it
    def score(valid_responses_at_or_below, slips_above):
        return (1 - valid_responses_at_or_below) + (1 - slips_above)

    eligible = [r for r in report.grid if r["valid_responses_at_or_below"] <= 0.01]
    best = max(score(r["valid_responses_at_or_below"], r["slips_above"]) for r in eligible)
    assert report.max_valid_below == 0.01 and report.valid_responses_at_or_below <= 0.01
    assert score(report.valid_responses_at_or_below, report.slips_above) >= best - 1e-12
    assert (
        report.valid_responses_at_or_below >= report.valid_at_or_below
    )  # a response fails on any token
    assert "imperfect" in report.summary or "no grid value" in report.summary


@pytest.mark.parametrize("tail", [0.05, 0.25])
def test_report_without_a_world_is_the_tail_quantile(fitted, tail):
    _, tokenizer, policy, prompt, _ = fitted
    report = alpha_report(policy, tokenizer, [prompt, prompt], max_new_tokens=12,
                          samples_per_prompt=30, tail=tail)  # fmt: skip
    assert report.method == "tail" and report.tail == tail and report.valid_samples is None
    tokens = np.array(report.token_probabilities)
    alpha = report.recommended_alpha
    assert report.sampled_tokens == tokens.size > 60
    # α is a sampled probability: at least `tail` of the tokens lie at or below it, fewer below
    assert alpha in tokens
    assert np.mean(tokens <= alpha) >= tail > np.mean(tokens < alpha)
    assert report.tokens_at_or_below == np.mean(tokens <= alpha)
    assert f"{tail:.0%} quantile" in report.summary and "KL term" in report.summary


def test_report_refuses_prompts_outside_the_world_and_bad_settings(fitted):
    world, tokenizer, policy, prompt, _ = fitted
    with pytest.raises(ValueError, match="not wordings of the world"):
        alpha_report(policy, tokenizer, [prompt, "Tell me a joke ."], world=world)
    with pytest.raises(ValueError, match="tail"):
        alpha_report(policy, tokenizer, [prompt], tail=1.0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        alpha_report(policy, tokenizer, [prompt], samples_per_prompt=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        alpha_report(policy, tokenizer, [])


def test_cli_with_a_world_file_writes_json_and_plot(fitted, tmp_path, capsys):
    world, _, _, prompt, model_dir = fitted
    files = world.write_files(tmp_path / "data", n_pairs=0, n_rankings=0, n_sft=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    out = tmp_path / "alpha"
    args = ["alpha", "--ref", str(model_dir), "--prompts", str(prompts), "--world", str(files["world"]),
            "--samples-per-prompt", "100", "--max-new-tokens", "12", "--device", "cpu",
            "--max-valid-below", "0.05", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "alpha.json").read_text())
    assert saved["method"] == "separation" and saved["samples"] == 100
    assert saved["max_valid_below"] == 0.05 and "at most 5% of the valid" in printed
    assert printed.startswith(f"recommended α = {saved['recommended_alpha']:.3g}")
    assert saved["summary"] in printed
    assert len(saved["grid"]) == len(ALPHA_GRID)
    assert (out / "alpha.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_without_a_world(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Which drink do you prefer ?"}\n{"prompt": "tea"}\n')
    out = tmp_path / "alpha"
    args = ["alpha", "--ref", str(tiny_model_dir), "--prompts", str(prompts), "--tail", "0.1",
            "--samples-per-prompt", "4", "--max-new-tokens", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((out / "alpha.json").read_text())
    assert saved["method"] == "tail" and saved["tail"] == 0.1 and saved["samples"] == 8
    assert saved["valid_samples"] is None and "valid" not in saved["histogram_log10"]
    assert "10% quantile" in capsys.readouterr().out
    assert (out / "alpha.png").is_file()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--tail": "1.5"}, "--tail must lie strictly between 0 and 1"),
        ({"--max-valid-below": "-0.1"}, "--max-valid-below must lie in [0, 1]"),
        ({"--samples-per-prompt": "0"}, "--samples-per-prompt must be at least 1"),
        ({"--prompts": "MISSING"}, "missing.jsonl"),
        ({"--world": "default"}, "1 of the 1 prompts"),
        ({"--world": "MISSING_WORLD"}, "world.json"),
        ({"--out": "FILE"}, "is a file; give a folder"),
        ({"--ref": "./no-such-model"}, "--ref"),
    ],
)
def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys, change, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me a joke ."}\n')
    (tmp_path / "file").write_text("")
    values = {"--ref": str(tiny_model_dir), "--prompts": str(prompts),
              "--samples-per-prompt": "2", "--max-new-tokens": "3", "--out": str(tmp_path / "o")}  # fmt: skip
    values.update(change)
    replace = {"MISSING": str(tmp_path / "missing.jsonl"), "FILE": str(tmp_path / "file"),
               "MISSING_WORLD": str(tmp_path / "world.json")}  # fmt: skip
    args = ["alpha"] + [x for k, v in values.items() for x in (k, replace.get(v, v))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cli_device_without_cuda_is_a_user_error(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tea"}\n')
    args = ["alpha", "--ref", str(tiny_model_dir), "--prompts", str(prompts), "--device", "cuda"]
    assert main(args) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
