"""Run-time plumbing: crash-safe folder commits, output-folder guard and lock, metrics.jsonl."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pmrlhf.runtime import (
    COMPLETE_MARKER,
    JsonlLogger,
    OutputDirError,
    atomic_directory,
    claim_output_dir,
    commit_directory,
    fresh_temp_directory,
    has_complete_copy,
    read_jsonl,
    recover_directory,
)

# ----------------------------------------------------------------------------- crash injection

FILES = ("model.safetensors", "optimizer/state.bin", "trainer_state.json")


class Crash(Exception):
    """The process dies here (raised in place of the file-system step it interrupts)."""


class CrashAt:
    """Numbers every file-system step (rename, unlink, rmdir, fsync) and dies before the k-th.

    Deleting a folder is many unlink/rmdir steps, so a crash half-way through one is included.
    """

    STEPS = ("rename", "replace", "unlink", "rmdir", "fsync")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, k: int):
        self.k = k
        self.count = 0
        for name in self.STEPS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def step(*args, **kwargs):
            self.count += 1
            if self.count == self.k:
                raise Crash(f"crash before step {self.k}")
            return real(*args, **kwargs)

        return step


def write_checkpoint(folder: Path, tag: str) -> None:
    for name in FILES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{tag}:{name}")


def checkpoint_tag(folder: Path) -> str:
    """The one version every file of ``folder`` holds; fails on a mixed or partial folder."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(FILES), f"incomplete checkpoint: {files}"
    tags = {(folder / name).read_text().split(":")[0] for name in FILES}
    assert len(tags) == 1, f"files from different versions: {tags}"
    return tags.pop()


@pytest.mark.parametrize("had_previous", [True, False])
def test_a_crash_at_any_step_of_a_commit_is_recovered(tmp_path, had_previous):
    outcomes = []
    k = 0
    while True:
        k += 1
        final = tmp_path / f"case{k}" / "checkpoint"
        if had_previous:
            with atomic_directory(final) as tmp:
                write_checkpoint(tmp, "old")
        tmp = fresh_temp_directory(final)
        write_checkpoint(tmp, "new")
        with pytest.MonkeyPatch.context() as patch:
            CrashAt(patch, k)
            try:
                commit_directory(tmp, final)
                crashed = False
            except Crash:
                crashed = True
        # a new process starts, checks its --resume argument, and recovers before loading
        available = has_complete_copy(final)
        recovered = recover_directory(final)
        assert available == (recovered is not None)
        siblings = sorted(p.name for p in final.parent.iterdir())
        if recovered is None:
            assert not had_previous, "the previous checkpoint was lost"
            assert siblings == [], f"leftovers: {siblings}"
            outcomes.append("none")
        else:
            assert recovered == final and siblings == ["checkpoint"], siblings
            assert not (final / COMPLETE_MARKER).exists()
            outcomes.append(checkpoint_tag(final))
        if not crashed:
            assert outcomes[-1] == "new"
            break
    assert k > 8, "the commit should have been interrupted at each of its many steps"
    # before the new copy is complete the old one (or nothing) survives; after, the new one
    first = "old" if had_previous else "none"
    switch = outcomes.index("new")
    assert outcomes[:switch] == [first] * switch and set(outcomes[switch:]) == {"new"}


def test_recovery_prefers_a_complete_new_copy_and_never_a_partial_one(tmp_path):
    final = tmp_path / "checkpoint"
    # crashed between the renames: previous copy in .old, complete new copy in .tmp
    write_checkpoint(tmp_path / "checkpoint.old", "old")
    write_checkpoint(tmp_path / "checkpoint.tmp", "new")
    (tmp_path / "checkpoint.tmp" / COMPLETE_MARKER).write_text("complete\n")
    assert recover_directory(final) == final and checkpoint_tag(final) == "new"
    # crashed while writing the new copy (no marker): the previous copy comes back
    shutil.rmtree(final)
    write_checkpoint(tmp_path / "checkpoint.old", "old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "model.safetensors").write_text("new:partial")
    assert recover_directory(final) == final and checkpoint_tag(final) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_starting_a_new_save_recovers_first_instead_of_deleting_the_only_copy(tmp_path):
    final = tmp_path / "checkpoint"
    write_checkpoint(tmp_path / "checkpoint.tmp", "new")
    (tmp_path / "checkpoint.tmp" / COMPLETE_MARKER).write_text("complete\n")
    tmp = fresh_temp_directory(final)  # the next save begins before anyone recovered
    assert checkpoint_tag(final) == "new"
    assert tmp.is_dir() and list(tmp.iterdir()) == []


def test_commit_flushes_every_file_before_marking_the_copy_complete(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the flushed files")
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    final = tmp_path / "checkpoint"
    tmp = fresh_temp_directory(final)
    write_checkpoint(tmp, "new")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    commit_directory(tmp, final)
    marker = flushed.index(str(tmp / COMPLETE_MARKER))
    for name in FILES:
        assert flushed.index(str(tmp / name)) < marker, name
    assert str(tmp / "optimizer") in flushed[:marker]
    assert flushed[-1] == str(tmp_path), "the rename into place was not flushed"


def test_rl_resumes_from_a_checkpoint_whose_commit_crashed_between_the_renames(
    tiny_model_dir, tmp_path, monkeypatch
):
    from pmrlhf.rl.config import RLConfig
    from pmrlhf.rl.trainer import RLTrainer

    def config(out: Path) -> RLConfig:
        return RLConfig(
            policy=str(tiny_model_dir),
            reward=f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea",
            algo="rloo", regularizer="kl", max_steps=3, save_every=1, prompts_per_step=2,
            samples_per_prompt=2, max_new_tokens=4, lr=1e-2, output_dir=str(out), quiet=True,
        )  # fmt: skip

    prompts = ["Which drink do you prefer ?"]
    straight = RLTrainer(config(tmp_path / "a"), prompts=prompts)
    straight.train()

    real_rename = os.rename
    commits = []

    def rename(src, dst):
        if str(src).endswith("checkpoint.tmp"):
            commits.append(dst)
            if len(commits) == 2:  # the step-2 save, after checkpoint -> checkpoint.old
                raise Crash("killed between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        RLTrainer(config(tmp_path / "b"), prompts=prompts).train()
    monkeypatch.undo()
    checkpoint = tmp_path / "b" / "checkpoint"
    assert not checkpoint.exists() and (tmp_path / "b" / "checkpoint.old").is_dir()

    assert recover_directory(checkpoint) == checkpoint
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    resumed = RLTrainer(config(tmp_path / "b"), prompts=prompts)
    resumed.train(resume=checkpoint)
    flat = [torch.cat([p.detach().flatten() for p in t.policy.parameters()]) for t in (straight, resumed)]  # fmt: skip
    torch.testing.assert_close(flat[1], flat[0], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- output folders


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "run"
    target.write_text("not a folder")
    with pytest.raises(OutputDirError, match=r"run is an existing file"):
        claim_output_dir(target, overwrite=False, resume=False, command="pmrlhf rl")
    with pytest.raises(OutputDirError, match=r"cannot be created"):
        claim_output_dir(target / "sub", overwrite=True, resume=False, command="pmrlhf rl")


@pytest.mark.parametrize(
    "artefact", ["metrics.jsonl", "checkpoint", "checkpoint-20", "model", "policy"]
)
def test_a_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path, artefact):
    run = tmp_path / "run"
    run.mkdir()
    (run / artefact).mkdir() if "." not in artefact else (run / artefact).write_text("{}\n")
    with pytest.raises(
        OutputDirError, match=rf"already holds a run \({artefact}\).*--resume.*--overwrite"
    ):
        claim_output_dir(run, overwrite=False, resume=False, command="pmrlhf rl")
    assert (run / artefact).exists(), "a refused claim must not touch the folder"
    with claim_output_dir(run, overwrite=False, resume=True, command="pmrlhf rl"):
        assert (run / artefact).exists()


def test_a_fresh_or_unrelated_folder_is_accepted(tmp_path):
    run = tmp_path / "new" / "run"
    with claim_output_dir(run, overwrite=False, resume=False, command="pmrlhf sft") as claim:
        assert claim.held and run.is_dir()
    (run / "notes.txt").write_text("mine")
    claim_output_dir(run, overwrite=False, resume=False, command="pmrlhf sft").release()


def test_overwrite_clears_the_previous_runs_artefacts_only(tmp_path):
    run = tmp_path / "run"
    for folder in ("checkpoint", "checkpoint.old", "checkpoint-10", "checkpoint-20", "model", "policy", "tensorboard"):  # fmt: skip
        (run / folder).mkdir(parents=True)
        (run / folder / "file").write_text("x")
    for name in ("metrics.jsonl", "eval.json", "config.yaml", "notes.txt"):
        (run / name).write_text("x")
    with claim_output_dir(run, overwrite=True, resume=False, command="pmrlhf sft"):
        left = sorted(p.name for p in run.iterdir())
    assert left == [".lock", "config.yaml", "notes.txt"]


def test_overwrite_and_resume_together_are_refused(tmp_path):
    with pytest.raises(OutputDirError, match="contradict"):
        claim_output_dir(tmp_path, overwrite=True, resume=True, command="pmrlhf rl")


def _hold(path: str, ready, release) -> None:
    claim = claim_output_dir(
        path, overwrite=False, resume=False, command="pmrlhf rl --config a.yaml"
    )
    ready.set()
    release.wait(60)
    claim.release()


def _race(path: str, start, done, results) -> None:
    start.wait(60)
    try:
        claim = claim_output_dir(path, overwrite=False, resume=True, command=f"racer {os.getpid()}")
    except OutputDirError as err:
        results.put(("refused", str(err)))
        return
    results.put(("claimed", ""))
    done.wait(60)  # hold the lock until every racer has tried
    claim.release()


def test_a_second_process_cannot_use_a_locked_output_dir(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputDirError, match=r"in use by another run \(pid \d+: pmrlhf rl --config a.yaml\)") as err:  # fmt: skip
            claim_output_dir(tmp_path, overwrite=False, resume=False, command="pmrlhf rl")
        assert str(tmp_path) in str(err.value)
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    # the lock goes with its holder: now the folder is free
    claim_output_dir(tmp_path, overwrite=False, resume=False, command="pmrlhf rl").release()


def test_of_several_racing_processes_exactly_one_gets_the_folder(tmp_path):
    context = multiprocessing.get_context("fork")
    n = 4
    start, done, results = context.Barrier(n), context.Event(), context.Queue()
    racers = [
        context.Process(target=_race, args=(str(tmp_path), start, done, results)) for _ in range(n)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    done.set()
    for racer in racers:
        racer.join(60)
    assert sorted(kind for kind, _ in outcomes) == ["claimed"] + ["refused"] * (n - 1)
    assert all(
        "in use by another run" in message for kind, message in outcomes if kind == "refused"
    )


def test_the_lock_is_released_when_its_process_dies(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, never = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, never))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(60)
    claim_output_dir(tmp_path, overwrite=False, resume=False, command="pmrlhf rl").release()


# ----------------------------------------------------------------------------- metrics.jsonl


def test_non_finite_metrics_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log(
        {
            "step": 1,
            "loss": float("nan"),
            "grad": float("inf"),
            "low": -math.inf,
            "np": np.float32("nan"),
            "tensor": torch.tensor([1.0, float("nan")]),
            "nested": {"x": [float("nan"), 2.0]},
            "ok": 0.5,
            "path": tmp_path,
        }
    )
    logger.close()
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record == {
        "step": 1, "loss": None, "grad": None, "low": None, "np": None, "tensor": [1.0, None],
        "nested": {"x": [None, 2.0]}, "ok": 0.5, "path": str(tmp_path),
    }  # fmt: skip


def test_resuming_drops_steps_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 6):
        logger.log({"step": step, "loss": step / 10})
    logger.close()
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # the line a kill cut short
    resumed = JsonlLogger(path, resume_step=3)  # the checkpoint was written at step 3
    for step in range(4, 6):
        resumed.log({"step": step, "loss": step / 100})
    resumed.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [0.1, 0.2, 0.3, 0.04, 0.05]


def test_resume_step_without_a_previous_file_starts_one(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl", resume_step=7)
    logger.log({"step": 8})
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 8}]
