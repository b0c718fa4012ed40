"""A reduced-budget `pmrlhf demo`: schema, files and the direction of the effects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pmrlhf.cli import main
from pmrlhf.evaluate import AnswerDistribution
from pmrlhf.report import DemoResults, format_table, write_report

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
            "--offline-steps", "150", "--eval-samples", "200"]  # fmt: skip
    assert main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_schema(demo_run):
    _, metrics = demo_run
    assert set(metrics["methods"]) == {"sft", "kl", "pm", "cpm", "dpo", "cpm-dpo"}
    for row in metrics["methods"].values():
        assert set(row) >= METRIC_KEYS
        assert all(isinstance(row[k], float) for k in METRIC_KEYS)
        assert 0.0 <= row["invalid_rate"] <= 1.0 and 0.0 <= row["tv_to_target"] <= 1.0
    assert set(metrics["pmd_improvement"]) == {"pm", "cpm", "cpm-dpo over dpo"}
    assert isinstance(metrics["seconds"], float) and metrics["seconds"] > 0
    alpha = metrics["cpm_alpha_check"]
    assert set(alpha) == {"alpha", "lowest_valid_token_probability", "invalid_samples",
                          "invalid_slip_probability_q90", "separated", "summary"}  # fmt: skip
    assert alpha["alpha"] == 0.05 and alpha["summary"].startswith("cpm α=0.05")
    for rows in metrics["per_prompt"].values():
        assert [set(r) for r in rows] == [
            {"prompt", "family", "answers", "distribution", "target", "truth", "exact_distribution"}
        ] * 6


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
    # offline: dpo collapses like kl, cpm-dpo matches the target and stays valid
    assert m["dpo"]["minority_mass"] < 0.5 * m["dpo"]["target_minority_mass"]
    assert m["cpm-dpo"]["tv_to_target"] < min(m["dpo"]["tv_to_target"], m["sft"]["tv_to_target"])
    assert m["cpm-dpo"]["invalid_rate"] < m["dpo"]["invalid_rate"]
    assert metrics["pmd_improvement"]["cpm-dpo over dpo"] > 0.5


def results(**methods) -> DemoResults:
    return DemoResults(
        methods=methods, pmd_improvement={"cpm": 0.5}, seconds=12.0, version="0.0",
        alpha_summary="cpm α=0.05: example", seed=7, rl_algo="rloo", rl_steps=10,
        prompts_per_step=2, samples_per_prompt=4, eval_samples=50, kl_beta=0.1, pm_beta=1.0,
        cpm_beta=1.0, cpm_alpha=0.05,
    )  # fmt: skip


def test_report_is_written_from_results_alone(tmp_path):
    """report.py needs only a DemoResults and per-prompt distributions, not the demo's config."""
    row = {"tv_to_target": 0.25, "pmd": 0.5, "invalid_rate": 0.0, "target_minority_mass": 0.4}
    res = results(kl={**row, "pmd": 1.0}, cpm={**row, "exact": {"tv_to_target": 0.125}})
    table = format_table(res)
    # kl has neither exact probabilities nor tv_valid: nan
    assert table.splitlines()[1].split()[:4] == ["kl", "0.250", "nan", "nan"]
    assert table.splitlines()[2].split()[:3] == ["cpm", "0.250", "0.125"]  # the exact TV
    assert (
        table.splitlines()[2].startswith("cpm")
        and "cpm +50%" in table
        and "wall time: 12 s" in table
    )
    dist = AnswerDistribution("q", "season", ["a", "b"], [0.5, 0.3, 0.2], [0.6, 0.4, 0.0],
                              [0.55, 0.45, 0.0])  # fmt: skip
    written = write_report(res, {"kl": [dist], "cpm": [dist]}, {}, tmp_path)
    assert written == table
    report = (tmp_path / "report.md").read_text()
    assert "seed 7; 10 RL steps" in report and table in report
    assert "**Why α = 0.05**: cpm α=0.05: example." in report
    assert "training_curves" not in report  # no histories, no training-curve plot
    assert (tmp_path / "preference_histograms.png").stat().st_size > 1000


def test_report_does_not_import_the_demo():
    code = "import sys, pmrlhf.report; sys.exit('pmrlhf.demo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_method_of_a_plot_gets_its_own_colour():
    from matplotlib.colors import to_rgb

    from pmrlhf.experiment import METHODS
    from pmrlhf.report import METHOD_COLORS, method_colors

    methods = [*METHODS, "pm", "my-run", "another-run"]
    colors = method_colors(methods)
    assert len({to_rgb(c) for c in colors.values()}) == len(methods)
    # a name not listed never takes a listed method's colour
    assert not {to_rgb(colors["my-run"]), to_rgb(colors["another-run"])} & {
        to_rgb(c) for c in METHOD_COLORS.values()
    }
