"""RL runs and their output folders: guard, lock, crash recovery on resume, metrics without repeats.

These check the trainer's use of the :mod:`pmrlhf.runtime` helpers (``claim_output_dir``,
``recover_directory``, ``JsonlLogger(resume_step=...)``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from pmrlhf.models import load_causal_lm
from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.trainer import RLTrainer
from pmrlhf.runtime import (
    NonFiniteError,
    OutputDirError,
    ResumeSettingsWarning,
    claim_output_dir,
    read_jsonl,
)

REWARD_SPEC = f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea"
PROMPTS = ["Which drink do you prefer ?"]


def make_config(policy: Path, out: Path, **overrides) -> RLConfig:
    values = dict(
        policy=str(policy), reward=REWARD_SPEC, algo="rloo", regularizer="kl", max_steps=2,
        prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, lr=1e-2,
        output_dir=str(out), quiet=True,
    )  # fmt: skip
    values.update(overrides)
    return RLConfig(**values)


class _Crash(Exception):
    pass


def test_a_second_run_into_a_finished_runs_folder_is_refused(tiny_model_dir, tmp_path):
    RLTrainer(make_config(tiny_model_dir, tmp_path), prompts=PROMPTS).train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    again = RLTrainer(make_config(tiny_model_dir, tmp_path), prompts=PROMPTS)
    with pytest.raises(OutputDirError, match="already holds a run") as err:
        again.train()
    assert str(tmp_path) in str(err.value)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before, "the refused run touched the finished one"


def _hold(path: str, ready, release) -> None:
    claim = claim_output_dir(path, overwrite=False, resume=True, command="pmrlhf rl (other)")
    ready.set()
    release.wait(60)
    claim.release()


def test_a_run_into_a_folder_another_run_holds_is_refused(tiny_model_dir, tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        trainer = RLTrainer(make_config(tiny_model_dir, tmp_path), prompts=PROMPTS)
        with pytest.raises(OutputDirError, match="in use by another run"):
            trainer.train()
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        release.set()
        holder.join(60)


def test_resume_recovers_a_checkpoint_whose_commit_crashed_between_the_renames(
    tiny_model_dir, tmp_path, monkeypatch
):
    config = make_config(tiny_model_dir, tmp_path, max_steps=3, save_every=1)
    real_rename = os.rename
    commits = []

    def rename(src, dst):
        if str(src).endswith("checkpoint.tmp"):
            commits.append(dst)
            if len(commits) == 2:
                raise _Crash("killed between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(_Crash):
        RLTrainer(config, prompts=PROMPTS).train()
    monkeypatch.undo()
    checkpoint = tmp_path / "checkpoint"
    assert not checkpoint.exists()
    resumed = RLTrainer(
        make_config(tiny_model_dir, tmp_path, max_steps=3, save_every=1), prompts=PROMPTS
    )
    resumed.train(resume=checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


class _CrashAtStep:
    """A reward that dies on its n-th call (the n-th step), like a kill."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.n:
            raise _Crash("killed")
        return [float(c.split().count("tea")) for c in completions]


def test_steps_logged_after_the_last_checkpoint_appear_once_after_resume(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, max_steps=5, save_every=2)
    with pytest.raises(_Crash):
        RLTrainer(config, reward_fn=_CrashAtStep(4), prompts=PROMPTS).train()
    # steps 1-3 were logged; the checkpoint holds step 2
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    resumed = RLTrainer(make_config(tiny_model_dir, tmp_path, max_steps=5, save_every=2),
                        reward_fn=_CrashAtStep(0), prompts=PROMPTS)  # fmt: skip
    resumed.train(resume=tmp_path / "checkpoint")
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_the_reference_and_the_rollout_copy_load_frozen(tiny_model_dir, tmp_path, monkeypatch):
    from pmrlhf import lora

    calls: list[bool] = []
    real = lora.load_policy_model

    def recording(path, *args, trainable: bool = True, **kwargs):
        calls.append(trainable)
        return real(path, *args, trainable=trainable, **kwargs)

    monkeypatch.setattr(lora, "load_policy_model", recording)
    trainer = RLTrainer(make_config(tiny_model_dir, tmp_path), prompts=PROMPTS)
    assert calls == [True, False], "policy trainable, reference frozen"
    assert trainer.ref is not None and not any(p.requires_grad for p in trainer.ref.parameters())
    assert torch.is_grad_enabled()


def _finite_then_huge(prompts, completions):
    """Ordinary rewards for the first two steps, then values whose sums overflow float32."""
    _finite_then_huge.calls += 1
    return [3e38 if _finite_then_huge.calls > 2 else 1.0] * len(completions)


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    _finite_then_huge.calls = 0
    config = make_config(tiny_model_dir, tmp_path, max_steps=5, save_every=1)
    trainer = RLTrainer(config, reward_fn=_finite_then_huge, prompts=PROMPTS)
    with pytest.raises(NonFiniteError, match=r"stopped in step 3: the (loss|gradient norm)") as err:
        trainer.train()
    assert "the last checkpoint" in str(err.value) and "is kept" in str(err.value)
    checkpoint = tmp_path / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "policy").exists()
    saved = load_causal_lm(str(checkpoint / "policy"))
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def _finished_run(policy: Path, out: Path) -> Path:
    RLTrainer(make_config(policy, out), prompts=PROMPTS).train()
    return out / "checkpoint"


def test_resume_refuses_a_changed_field_unless_allowed(tiny_model_dir, tmp_path):
    checkpoint = _finished_run(tiny_model_dir, tmp_path)
    changed = make_config(tiny_model_dir, tmp_path, beta=0.5, seed=3)
    with pytest.raises(ValueError, match=r"seed 0 -> 3; beta 1\.0 -> 0\.5") as err:
        RLTrainer(changed, prompts=PROMPTS).train(resume=checkpoint)
    assert "--allow-config-change" in str(err.value)
    with pytest.warns(ResumeSettingsWarning, match="beta 1.0 -> 0.5"):
        summary = RLTrainer(changed, prompts=PROMPTS).train(
            resume=checkpoint, allow_config_change=True
        )
    assert summary["steps_run"] == 0  # the checkpoint already holds max_steps


def test_resume_refuses_a_missing_rng_state(tiny_model_dir, tmp_path):
    checkpoint = _finished_run(tiny_model_dir, tmp_path)
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(ValueError, match=r"random_states_0\.pkl is missing"):
        RLTrainer(make_config(tiny_model_dir, tmp_path), prompts=PROMPTS).train(resume=checkpoint)
