"""Deterministic SFT / RM / RL splits of one dataset (the paper: 20% / 40% / 40%, seed 1234).

The split is over row indices of the raw table, before any format parsing, so the three stages
of one pipeline see disjoint rows however each stage reads them. The same seed and row count
always give the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "PAPER_FRACTIONS",
    "PAPER_SEED",
    "STAGES",
    "holdout_indices",
    "split_indices",
    "subset_indices",
]

STAGES: tuple[str, str, str] = ("sft", "rm", "rl")
PAPER_FRACTIONS: tuple[float, float, float] = (0.2, 0.4, 0.4)
PAPER_SEED = 1234


def split_indices(
    n: int, fractions: Sequence[float] = PAPER_FRACTIONS, seed: int = PAPER_SEED
) -> list[list[int]]:
    """Partition ``range(n)`` into ``len(fractions)`` disjoint, covering parts.

    Part sizes follow the fractions (normalised to sum 1), with boundaries rounded so every
    row lands in exactly one part. Each part lists its indices in increasing order, so rows
    keep their file order.
    """
    if n < 0:
        raise ValueError(f"row count must be >= 0, got {n}")
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {list(fractions)}")
    weights = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    bounds = np.rint(np.cumsum(weights) * n).astype(int)
    bounds[-1] = n
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for end in bounds:
        parts.append(sorted(int(i) for i in order[start:end]))
        start = end
    return parts


def subset_indices(
    n: int,
    subset: str = "all",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    seed: int = PAPER_SEED,
) -> list[int]:
    """The row indices of one stage (``sft``, ``rm`` or ``rl``), or all rows for ``all``."""
    if subset == "all":
        return list(range(n))
    if subset not in STAGES:
        raise ValueError(f"subset must be 'all' or one of {list(STAGES)}, got {subset!r}")
    if len(fractions) != len(STAGES):
        raise ValueError(
            f"split fractions must give one value per stage {list(STAGES)}, got {list(fractions)}"
        )
    return split_indices(n, fractions, seed)[STAGES.index(subset)]


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; the held-out part has ``round(fraction·n)`` rows.

    At least one row stays in training; a positive fraction of n >= 2 holds out at least one.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must lie in [0, 1), got {fraction}")
    held = round(fraction * n)
    if fraction > 0 and n >= 2:
        held = max(held, 1)
    held = min(held, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])
