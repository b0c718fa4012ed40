"""Per-token regularisation penalties ``p_t`` for KL-RLHF, PM and conditional PM (spec §4).

The shaped per-token reward is ``−β · p_t``, with the sequence reward added at the last response
token. All functions take (..., T) tensors of log-probabilities for the sampled tokens and a mask
of the real response positions; masked positions get a penalty of exactly zero, whatever values
(even ``-inf`` or ``nan``) they hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "REGULARIZERS",
    "CPMRegularizer",
    "KLRegularizer",
    "PMRegularizer",
    "Regularizer",
    "cpm_penalty",
    "kl_penalty",
    "make_regularizer",
    "meaningful_tokens",
    "pm_penalty",
]


def _check_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {detail} (all must be equal)")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(
        mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)
    )


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """``p_t = log π(y_t|s_t) − log π_ref(y_t|s_t)``: the KL-in-reward of standard RLHF."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    return _masked(logp - ref_logp, mask)


def pm_penalty(logp: Tensor, mask: Tensor) -> Tensor:
    """``p_t = log π(y_t|s_t)``: preference matching, no reference model needed."""
    _check_shapes(logp=logp, mask=mask)
    return _masked(logp, mask)


def meaningful_tokens(ref_logp: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Positions whose reference probability is strictly above α (and that are real tokens).

    The threshold is compared in log space, with ``log α`` rounded to the input's dtype, so a
    token whose reference log-probability equals ``log α`` in that dtype is *not* meaningful.
    """
    _check_alpha(alpha)
    _check_shapes(ref_logp=ref_logp, mask=mask)
    log_alpha = torch.tensor(math.log(alpha), dtype=torch.float64).to(ref_logp.dtype)
    return mask.bool() & (ref_logp > log_alpha.to(ref_logp.device))


def cpm_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Conditional PM: ``log π`` where ``π_ref > α``, ``log π − log π_ref`` elsewhere."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    meaningful = meaningful_tokens(ref_logp, mask, alpha)
    return _masked(torch.where(meaningful, logp, logp - ref_logp), mask)


@dataclass(frozen=True)
class Regularizer:
    """Base class: a named per-token penalty with strength β that states what it needs."""

    beta: float = 1.0
    name = "base"
    needs_ref = False

    def __post_init__(self) -> None:
        _check_beta(self.beta)

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def token_rewards(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        """The shaped per-token reward ``−β p_t`` (sequence reward not included)."""
        return -self.beta * self.penalty(logp, ref_logp, mask)

    def _require_ref(self, ref_logp: Tensor | None) -> Tensor:
        if ref_logp is None:
            raise ValueError(f"the {self.name!r} regulariser needs reference log-probs (ref_logp)")
        return ref_logp


@dataclass(frozen=True)
class KLRegularizer(Regularizer):
    """Standard RLHF: reverse KL to the reference model."""

    name = "kl"
    needs_ref = True

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return kl_penalty(logp, self._require_ref(ref_logp), mask)


@dataclass(frozen=True)
class PMRegularizer(Regularizer):
    """Preference matching: ``−log π``; its optimum is ``softmax(r/β)``."""

    name = "pm"
    needs_ref = False

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return pm_penalty(logp, mask)


@dataclass(frozen=True)
class CPMRegularizer(Regularizer):
    """Conditional PM: the PM term on tokens the reference finds plausible (π_ref > α)."""

    alpha: float = 0.1
    name = "cpm"
    needs_ref = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.alpha)

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return cpm_penalty(logp, self._require_ref(ref_logp), mask, self.alpha)


REGULARIZERS: dict[str, type[Regularizer]] = {
    "kl": KLRegularizer,
    "pm": PMRegularizer,
    "cpm": CPMRegularizer,
}


def make_regularizer(name: str, beta: float, alpha: float | None = None) -> Regularizer:
    """Build a regulariser by name. The name is always explicit, never inferred from α."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {sorted(REGULARIZERS)}")
    if name == "cpm":
        if alpha is None:
            raise ValueError("the 'cpm' regularizer needs alpha in (0, 1)")
        return CPMRegularizer(beta=beta, alpha=alpha)
    return REGULARIZERS[name](beta=beta)
