"""A reduced-budget `pmrlhf demo`: schema, files and the direction of the effects."""

from __future__ import annotations

import json

import pytest

from pmrlhf.cli import main

METRIC_KEYS = {
    "tv_to_target",
    "tv_to_truth",
    "tv_valid",
    "minority_mass",
    "invalid_rate",
    "pmd",
    "mean_reward",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(out), "--quiet", "true", "--n-sft", "800", "--n-rankings", "1200",
            "--sft-steps", "200", "--rm-steps", "150", "--rl-steps", "150", "--rl-lr", "2e-3",
            "--eval-samples", "200"]  # fmt: skip
    assert main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_schema(demo_run):
    _, metrics = demo_run
    assert set(metrics["methods"]) == {"sft", "kl", "pm", "cpm"}
    for row in metrics["methods"].values():
        assert set(row) >= METRIC_KEYS
        assert all(isinstance(row[k], float) for k in METRIC_KEYS)
        assert 0.0 <= row["invalid_rate"] <= 1.0 and 0.0 <= row["tv_to_target"] <= 1.0
    assert set(metrics["pmd_improvement"]) == {"pm", "cpm"}
    assert isinstance(metrics["seconds"], float) and metrics["seconds"] > 0


def test_files_written(demo_run):
    out, _ = demo_run
    for name in ("answer_distributions.png", "preference_histograms.png", "training_curves.png"):
        assert (out / name).stat().st_size > 10_000, name
    report = (out / "report.md").read_text()
    assert "answer_distributions.png" in report and "PMD" in report
    for name in (
        "sft.jsonl",
        "rankings.jsonl",
        "prompts_train.jsonl",
        "prompts_eval.jsonl",
        "world.json",
    ):
        assert (out / "data" / name).is_file()
    for method in ("kl", "pm", "cpm"):
        assert len((out / method / "metrics.jsonl").read_text().splitlines()) == 150


def test_direction_of_effects(demo_run):
    _, metrics = demo_run
    m = metrics["methods"]
    # kl collapses onto the majority: its minority share is far below the target's and pm's
    assert m["kl"]["minority_mass"] < 0.5 * m["kl"]["target_minority_mass"]
    assert m["kl"]["minority_share_valid"] < m["pm"]["minority_share_valid"]
    assert m["kl"]["minority_mass"] < m["cpm"]["minority_mass"]
    # over the valid answers, pm is closer to the reward model's target than kl
    assert m["pm"]["tv_valid"] < m["kl"]["tv_valid"]
    # cpm matches the target best and keeps the SFT model's validity
    assert m["cpm"]["tv_to_target"] < min(
        m["kl"]["tv_to_target"], m["pm"]["tv_to_target"], m["sft"]["tv_to_target"]
    )
    assert m["cpm"]["invalid_rate"] <= m["sft"]["invalid_rate"] + 0.02
    assert metrics["pmd_improvement"]["cpm"] > 0
