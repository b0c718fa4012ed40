"""Seconds per phase of an RL step, measured by the trainer itself.

Each step's metrics carry ``time_<phase>`` for the phases in :data:`PHASES` that ran; the
progress bar shows them, and ``benchmarks/bench_rloo.py`` reads them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["PHASES", "PhaseTimer", "phase_postfix"]

#: The timed phases of a step, in order; each is logged as ``time_<phase>`` (seconds).
PHASES = (
    "generate",
    "reward",
    "reference",
    "policy_forward",
    "critic",
    "backward",
    "optimizer",
)


class PhaseTimer:
    """Seconds spent in each named phase of one step.

    On CUDA the device is synchronised before each clock reading, so that asynchronously
    launched kernels are charged to the phase that launched them; elsewhere nothing waits.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self._now() - start


_SHORT = {
    "generate": "gen",
    "reward": "rew",
    "reference": "ref",
    "policy_forward": "fwd",
    "critic": "critic",
    "backward": "bwd",
    "optimizer": "opt",
}


def phase_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix: reward, penalty and the step's seconds per phase."""
    times = " ".join(
        f"{_SHORT[p]} {metrics[f'time_{p}']:.2f}" for p in PHASES if f"time_{p}" in metrics
    )
    return {
        "reward": f"{metrics['reward_mean']:.3f}",
        "pen": f"{metrics['penalty_mean']:.3f}",
        "s": f"{metrics['step_seconds']:.2f} ({times})",
    }
