"""Policy and value losses (pure functions)."""

from __future__ import annotations

import torch
from torch import Tensor


def aggregate(values: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Reduce per-token losses.

    ``seq-mean-token-sum`` sums over each sequence's tokens and averages over sequences: the
    unbiased estimate of the sequence-level objective's gradient, with no length weighting.
    ``token-mean`` averages over all response tokens in the batch.
    """
    masked = values * mask
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp_min(1)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float, aggregation: str
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate. With ``old_logp == logp.detach()`` it is the plain policy gradient.

    Returns ``(loss, clip_fraction)``.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    clip_fraction = ((clipped > unclipped).to(logp.dtype) * mask).sum() / mask.sum().clamp_min(1)
    return loss, clip_fraction.detach()


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """PPO's clipped value loss, ``½ max((V − R)², (clip(V) − R)²)``, masked token mean."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp_min(1)


def expected_penalty_loss(
    state_penalty: Tensor, mask: Tensor, beta: float, aggregation: str
) -> Tensor:
    """``+β Σ_t f_θ(s_t)``, reduced like the policy loss: the direct term of the full estimator.

    ``state_penalty`` holds ``f_θ(s_t)`` at the visited states with its graph; its gradient is
    the exact gradient of the penalty's expectation at each state (docs/method.md §8). It is not
    a ratio-weighted surrogate, so PPO's clip does not apply to it.
    """
    return beta * aggregate(state_penalty, mask, aggregation)
