"""`pmrlhf experiment`: the chat world, the stages, the targets and the report, on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pmrlhf.experiment import (
    TARGETS,
    ExperimentConfig,
    _seed_failure,
    _Stages,
    cached_base_model,
    chat_world,
    check_targets,
    reward_model_vs_truth,
    run_experiment,
)

# A plain-words chat template, so the word-level tokenizer of the tiny model covers it.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
SYSTEM = "Answer in a few words."


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template and covers the packaged chat world."""
    from pmrlhf.models import build_tiny_model, load_tokenizer

    world, _ = chat_world("", None, "")
    texts = [*world.vocabulary(), "system user assistant :", SYSTEM]
    out = build_tiny_model(tmp_path_factory.mktemp("chat-llama"), texts, seed=0)
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def test_chat_world_renders_every_wording_with_the_chat_template(chat_model_dir):
    from pmrlhf.models import load_tokenizer

    tokenizer = load_tokenizer(str(chat_model_dir))
    world, questions = chat_world("", tokenizer, SYSTEM)
    plain, _ = chat_world("", None, "")
    assert len(world.train_prompts()) == len(plain.train_prompts()) == 36  # 6 families × 6
    assert len(world.eval_prompts()) == 6
    prompt = world.eval_prompts()[0]
    assert prompt == f"system : {SYSTEM} user : Which season is your favourite? assistant :"
    assert questions[prompt] == "Which season is your favourite?"
    # the rendered prompt is a key of the world: answers and classification work on it
    assert world.classify(prompt, "I like summer best.") == 0
    assert world.classify(prompt, "Coffee, please.") is None
    assert world.valid_sequences(prompt) == plain.valid_sequences(plain.eval_prompts()[0])


def test_a_model_folder_is_used_as_it_is(chat_model_dir, tmp_path):
    assert cached_base_model(str(chat_model_dir), str(tmp_path / "cache")) == str(chat_model_dir)
    assert not (tmp_path / "cache").exists()


def _metrics(kl_minority=0.05, target_minority=0.45, kl_pmd=2.0, cpm_pmd=0.5, cpm_tv=0.08,
             cpm_invalid=0.05, sft_invalid=0.04):  # fmt: skip
    def row(pmd, tv, minority, invalid):
        return {"sampled": {"pmd": pmd},
                "exact": {"tv_to_target": tv, "minority_mass": minority,
                          "target_minority_mass": target_minority, "invalid_rate": invalid}}  # fmt: skip

    return {"methods": {"sft": row(1.0, 0.2, 0.6, sft_invalid),
                        "kl": row(kl_pmd, 0.4, kl_minority, 0.01),
                        "cpm": row(cpm_pmd, cpm_tv, 0.44, cpm_invalid)}}  # fmt: skip


def test_targets_are_the_issue_thresholds():
    rows = check_targets(_metrics())
    assert [r["met"] for r in rows] == [True, True, True, True]
    assert rows[0]["value"] == pytest.approx(0.75)  # (2.0 - 0.5) / 2.0
    assert rows[2]["value"] == pytest.approx(0.05 / 0.45)
    assert rows[3]["value"] == pytest.approx(0.01)
    failing = check_targets(_metrics(kl_minority=0.2, cpm_pmd=1.5, cpm_tv=0.11, cpm_invalid=0.07))
    assert [r["met"] for r in failing] == [False, False, False, False]
    # a method left out gives no verdict rather than a made-up one
    partial = _metrics()
    del partial["methods"]["kl"]
    assert [r["met"] for r in check_targets(partial)] == [None, True, None, True]
    assert len(TARGETS) == 4


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="methods: unknown 'ppo'"):
        ExperimentConfig(methods=["sft", "ppo"])
    with pytest.raises(ValueError, match=r"seeds: .* repeats"):
        ExperimentConfig(seeds=[0, 0])
    with pytest.raises(ValueError, match="cpm_alpha"):
        ExperimentConfig(cpm_alpha=1.0)
    with pytest.raises(ValueError, match=r"off_world_share must be in \[0, 1\], got 1.5"):
        ExperimentConfig(off_world_share=1.5)
    with pytest.raises(ValueError, match="rl_steps must be at least 1"):
        ExperimentConfig(rl_steps=0)
    with pytest.raises(ValueError, match=r"rl_lr_schedule must be one of .*'step'"):
        ExperimentConfig(rl_lr_schedule="step")
    with pytest.raises(ValueError, match=r"rl_algo must be one of .*'dpo'"):
        ExperimentConfig(rl_algo="dpo")
    with pytest.raises(ValueError, match=r"rm_lr_schedule must be one of .*'step'"):
        ExperimentConfig(rm_lr_schedule="step")
    with pytest.raises(ValueError, match="methods: give at least one"):
        ExperimentConfig(methods=[])


def test_reward_model_against_the_hidden_shares():
    rows = [
        {"target": [0.5, 0.3, 0.2, 0.0], "truth": [0.55, 0.3, 0.15, 0.0]},  # TV 0.05, same top
        {"target": [0.2, 0.5, 0.3, 0.0], "truth": [0.55, 0.3, 0.15, 0.0]},  # TV 0.35, wrong top
    ]
    summary = reward_model_vs_truth(rows)
    assert summary["tv_mean"] == pytest.approx(0.2)
    assert summary["tv_max"] == pytest.approx(0.35)
    assert (summary["wrong_top_answers"], summary["prompts"]) == (1, 2)


def test_two_seeds_end_to_end_in_parallel_then_resume(chat_model_dir, tmp_path):
    """Every stage runs on a tiny model for two seeds at once; a rerun reuses every stage."""
    out = tmp_path / "exp"
    config = ExperimentConfig(
        out=str(out), base=str(chat_model_dir), system_prompt=SYSTEM, seeds=[3, 4], parallel=2,
        n_sft=64, n_rankings=64, sft_steps=3, sft_lr=1e-3, rm_steps=2, rl_steps=2,
        prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, eval_samples=2,
        alpha_samples_per_prompt=1, quiet=True, rm_group_by_prompt=True, rm_batch_size=24,
        rm_lr_schedule="linear",
    )  # fmt: skip
    summary = run_experiment(config)
    assert set(summary["seeds"]) == {3, 4}
    for seed in (3, 4):
        folder = out / f"seed-{seed}"
        stages = json.loads((folder / "stages.json").read_text())
        assert {"data", "sft", "rm", "alpha", "rl-kl", "rl-kl-strong", "rl-cpm"} <= set(stages)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"sft", "kl", "kl-strong", "cpm"}
        assert metrics["cpm_alpha"] == stages["alpha"]["recommended_alpha"]
        # the reward model trains after α's samples, on rankings holding half of them, ranked last
        assert list(stages["_seconds"])[:4] == ["data", "sft", "alpha", "rm"]
        slips = json.loads((folder / "alpha.json").read_text())["slip_responses"]
        assert slips, "the barely trained SFT model slips"
        ranked = [json.loads(line) for line in (folder / "data" / "rankings.jsonl").open()]
        with_slips = [json.loads(line) for line in
                      (folder / "data" / "rankings_off_world.jsonl").open()]  # fmt: skip
        assert [r["responses"][:3] for r in with_slips] == [r["responses"] for r in ranked]
        added = [r["responses"][3] for r in with_slips if len(r["responses"]) == 4]
        assert 0 < len(added) < len(ranked) and set(added) <= {s["response"] for s in slips}
        for method, row in metrics["methods"].items():
            dist = [r["exact_distribution"] for r in metrics["per_prompt"][method]]
            assert all(abs(sum(d) - 1) < 1e-6 for d in dist), method
            assert 0 <= row["exact"]["invalid_rate"] <= 1
            assert row["exact"]["pmd_valid_pairs"] >= 0
        # the three RL runs trained with their own regulariser and β, and kept their policy
        # and settings but not their final checkpoint
        for method, beta in (("kl", 0.1), ("kl-strong", 0.5), ("cpm", 1.0)):
            kept = sorted(p.name for p in (folder / method).iterdir() if p.name != ".lock")
            assert kept == ["config.yaml", "metrics.jsonl", "policy"]
            saved = yaml.safe_load((folder / method / "config.yaml").read_text())
            assert (saved["regularizer"], saved["beta"]) == (method.split("-")[0], beta)
            assert saved["lr_schedule"] == config.rl_lr_schedule == "linear"
            assert {"mean_reward_valid", "mean_reward_invalid"} <= set(
                metrics["methods"][method]["sampled"]
            )
        # the reward model trained with the settings given: whole prompts' rankings, decaying rate
        rm_config = yaml.safe_load((folder / "rm" / "config.yaml").read_text())
        assert (rm_config["group_by_prompt"], rm_config["lr_schedule"]) == (True, "linear")
        assert rm_config["batch_size"] == config.rm_batch_size == 24
        against_truth = reward_model_vs_truth(metrics["per_prompt"]["cpm"])
        assert metrics["reward_model_vs_truth"] == pytest.approx(against_truth)
        assert against_truth["prompts"] == 6
        report = (folder / "report.md").read_text()
        assert (
            f"from the hidden shares on the held-out prompts (at most {against_truth['tv_max']:.3f})"
            in report
        )
        assert "reward, invalid − valid samples" in report
        assert "Which season is your favourite?" in report  # samples show the question
        assert (folder / "answer_distributions.png").stat().st_size > 0
    overall = (out / "report.md").read_text()
    assert "| seed 3 | seed 4 |" in overall and "min per seed at most" in overall
    assert len(summary["targets"]) == len(TARGETS)
    # a rerun, here of the folder moved elsewhere, finds every stage finished and trains nothing
    before = {s: (out / f"seed-{s}" / "stages.json").read_text() for s in (3, 4)}
    moved = tmp_path / "moved"
    out.rename(moved)
    (moved / "report.md").unlink()
    run_experiment(replace(config, out=str(moved)))
    assert before == {s: (moved / f"seed-{s}" / "stages.json").read_text() for s in (3, 4)}
    assert "| seed 3 | seed 4 |" in (moved / "report.md").read_text()
    # a changed setting reruns its stage and every stage after it, and reuses those before it
    folder = moved / "seed-3"
    earlier = json.loads(before[3])
    sft_config = folder / earlier["sft"] / "config.json"
    sft_written = sft_config.stat().st_mtime_ns
    run_experiment(replace(config, out=str(moved), seeds=[3], rm_steps=3))
    later = json.loads((folder / "stages.json").read_text())
    for name in ("data", "sft", "alpha"):
        assert later[name] == earlier[name]
        assert later["_seconds"][name] == earlier["_seconds"][name]
        assert later["_settings"][name] == earlier["_settings"][name]
    assert sft_config.stat().st_mtime_ns == sft_written
    assert earlier["_settings"]["rm"]["settings"]["rm_steps"] == 2
    assert later["_settings"]["rm"]["settings"]["rm_steps"] == 3
    for name in ("rm", "rl-kl", "rl-cpm", "eval-sft", "eval-cpm"):
        assert later["_settings"][name]["fingerprint"] != earlier["_settings"][name]["fingerprint"]
    log = (folder / "log.txt").read_text()
    assert "rm: settings changed since it ran: rm_steps 2 → 3; running it again" in log
    assert "rl-cpm: an earlier stage it reads ran again; running it again" in log
    assert not any(f"seed-3: {name}:" in log for name in ("data", "sft", "alpha"))
    # a folder without records (written before they were kept) is reused as it is
    unrecorded = {k: v for k, v in later.items() if k != "_settings"}
    (folder / "stages.json").write_text(json.dumps(unrecorded))
    run_experiment(replace(config, out=str(moved), seeds=[3], rm_steps=4))
    assert json.loads((folder / "stages.json").read_text()) == unrecorded


def test_a_stage_run_again_counts_only_the_stages_kept_as_finished(tmp_path):
    """While a stage whose settings changed runs again, progress counts the stages before it
    as finished, not the stale ones after it still in stages.json."""
    names = ["a", "b", "c"]
    first = _Stages(tmp_path, names)
    first.run("a", lambda: 1, {"steps": 1})
    first.run("b", lambda: 1, {"steps": 1}, after=("a",))
    first.run("c", lambda: 1, {"steps": 1}, after=("b",))
    seen = {}

    def progress_now(name):
        seen[name] = json.loads((tmp_path / "progress.json").read_text())
        return 2

    again = _Stages(tmp_path, names)
    again.run("a", lambda: progress_now("a"), {"steps": 1})
    again.run("b", lambda: progress_now("b"), {"steps": 2}, after=("a",))
    again.run("c", lambda: progress_now("c"), {"steps": 1}, after=("b",))
    assert "a" not in seen
    assert seen["b"] == {"stage": "b", "finished": 1, "total": 3}
    assert seen["c"] == {"stage": "c", "finished": 2, "total": 3}


def test_cli_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "pmrlhf", "experiment", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for flag in ("--seeds", "--cpm-alpha", "--kl-strong-beta", "--rl-steps", "--rl-lr-schedule",
                 "--system-prompt"):  # fmt: skip
        assert flag in result.stdout


def _children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has ended; only its exit status waits to be read


def _is_seed_process(pid: int) -> bool:
    """A process that multiprocessing spawned to run a function (not its resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and not _ended(pid)
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads children from Linux /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_experiment_stops_its_seed_processes(stop, chat_model_dir, tmp_path):
    """`kill` (SIGTERM) or SIGKILL of `pmrlhf experiment` ends every seed process with it, so
    that none goes on training and writing into the run's folders."""
    out = tmp_path / "exp"
    config = {"out": str(out), "base": str(chat_model_dir), "system_prompt": SYSTEM,
              "seeds": [3, 4], "parallel": 2, "n_sft": 64, "n_rankings": 64, "sft_steps": 100000,
              "quiet": True}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    parent = subprocess.Popen(
        [sys.executable, "-m", "pmrlhf", "experiment", "--config", str(tmp_path / "config.yaml")],
        env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # both seeds are inside the (endless) SFT stage
        deadline = time.monotonic() + 300
        while not all((out / f"seed-{s}" / "sft").is_dir() for s in (3, 4)):
            assert parent.poll() is None, parent.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the seeds did not reach their SFT stage"
            time.sleep(0.2)
        workers = [c for c in _children(parent.pid) if _is_seed_process(c)]
        seed_logs = [out / f"seed-{s}" / "log.txt" for s in (3, 4)]
        assert len(workers) == 2, workers
        parent.send_signal(stop)
        parent.wait(timeout=60)
        if stop == signal.SIGTERM:  # the experiment stopped its seeds before it ended
            assert parent.returncode != 0
            assert all(_ended(w) for w in workers)
        deadline = time.monotonic() + 60
        while not all(_ended(w) for w in workers):
            assert time.monotonic() < deadline, f"still running: {workers}"
            time.sleep(0.2)
        if stop == signal.SIGKILL:  # each seed noticed it had lost its parent, and said so
            assert all("has ended; stopping" in log.read_text() for log in seed_logs)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_failed_seed_is_reported_with_how_it_ended():
    folder = Path("runs/exp/seed-3")
    assert _seed_failure(-9, folder) == "seed-3 (killed by SIGKILL; log: runs/exp/seed-3/log.txt)"
    assert _seed_failure(1, folder) == "seed-3 (exit code 1; log: runs/exp/seed-3/log.txt)"
