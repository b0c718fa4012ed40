"""SIGKILL at random moments, then --resume: the run ends exactly where an uninterrupted one does.

Each trial starts `pmrlhf rl` (PPO with a critic) or `pmrlhf sft` as a real process, kills it
with SIGKILL after a random number of logged steps and a random delay — mid-step, mid-save or
mid-commit — and resumes it with `--resume` until it finishes. The final weights must equal
those of a run that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REWARD_SPEC = f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea"
TRIALS = int(os.environ.get("PMRLHF_KILL_TRIALS", "4"))


def _rl_args(policy: Path, out: Path, prompts: Path) -> list[str]:
    return ["rl", "--policy", str(policy), "--reward", REWARD_SPEC, "--prompts", str(prompts),
            "--algo", "ppo", "--critic-init", "policy", "--regularizer", "cpm", "--alpha", "0.05",
            "--max-steps", "12", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "4", "--lr", "1e-2", "--save-every", "1",
            "--output-dir", str(out), "--quiet", "true"]  # fmt: skip


def _sft_args(model: Path, out: Path, data: Path) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--max-steps", "12",
            "--batch-size", "4", "--lr", "3e-3", "--save-every", "1", "--eval-fraction", "0.1",
            "--output-dir", str(out), "--quiet", "true"]  # fmt: skip


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pmrlhf", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _finished(out: Path, final: str) -> bool:
    return (out / final / "model.safetensors").is_file()


def _steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_bytes().splitlines()) if metrics.is_file() else 0


def _kill_after_progress(process: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """SIGKILL once the run has logged 1–4 more steps, plus up to 0.2 s (mid-step, mid-save or
    mid-commit). Waiting for progress rather than for a fixed delay makes the kill land inside
    the run however fast this machine is. Returns whether the process was killed."""
    target = _steps_logged(out) + rng.randint(1, 4)
    while process.poll() is None and _steps_logged(out) < target:
        time.sleep(0.005)
    try:
        process.wait(timeout=rng.uniform(0.0, 0.2))
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _run_with_kills(args: list[str], out: Path, final: str, rng: random.Random) -> int:
    """Run to the end, killing the first attempts partway; returns the kills."""
    kills = 0
    resume: list[str] = []
    for attempt in range(20):
        process = subprocess.Popen(
            _command(args + resume), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if attempt < 2:
            kills += _kill_after_progress(process, out, rng)
        else:
            process.wait()
        if process.returncode == 0 and _finished(out, final):
            return kills
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read().decode()[-2000:]
        # a kill before the first checkpoint means a fresh start; afterwards, resume
        has_checkpoint = (out / "checkpoint").is_dir() or (out / "checkpoint.tmp").is_dir()
        resume = (
            ["--resume", str(out / "checkpoint")] if has_checkpoint else ["--overwrite", "true"]
        )
        time.sleep(0.1)
    raise AssertionError("the run did not finish in 20 attempts")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("command", ["rl", "sft"])
def test_sigkill_and_resume_match_an_uninterrupted_run(command, tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    if command == "rl":
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                ["Which drink do you prefer ?", "Which season do you like best ?"]))  # fmt: skip
        make, final = _rl_args, "policy"
    else:
        rows = [{"prompt": "Which drink do you prefer ?", "completion": f"I prefer {d} ."}
                for d in ("tea", "coffee", "water")] * 8  # fmt: skip
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        make, final = _sft_args, "model"
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(make(tiny_model_dir, reference, data)), env=_env(), check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    expected = _weights(reference / final)
    rng = random.Random(0)
    total_kills = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        total_kills += _run_with_kills(make(tiny_model_dir, out, data), out, final, rng)
        got = _weights(out / final)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), f"trial {trial}: {name} differs"
    print(f"{command}: {TRIALS} trials, {total_kills} SIGKILLs, all resumed to identical weights")
    assert total_kills > 0  # at least some trials were really interrupted
