"""Advantage estimators. Pure tensor functions over (batch, T) per-token tensors.

``token_rewards`` already holds the shaped reward of spec §4: ``−β p_t`` at every response token
plus the sequence reward at the last one. ``mask`` marks the response tokens (right-padded).
None of the estimators normalises by a standard deviation: that would rescale β and break the
preference-matching target (spec §5).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_returns(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted return of each sequence: Σ_t of its per-token rewards."""
    return (token_rewards * mask).sum(-1)


def rewards_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = Σ_{u≥t} γ^{u−t} r_u`` over the response tokens (0 on padding)."""
    rewards = token_rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out * mask


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation. Returns ``(advantages, returns)``, both masked.

    The value after the last response token is 0 (the episode ends there).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = token_rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    T = rewards.shape[-1]
    for t in range(T - 1, -1, -1):
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last = delta + gamma * lam * last * (mask[..., t + 1] if t + 1 < T else 0.0)
        advantages[..., t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _grouped(returns: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(
            f"group-baseline estimators need at least 2 samples per prompt, got {group_size}"
        )
    if returns.numel() % group_size:
        raise ValueError(
            f"batch of {returns.numel()} is not a multiple of samples_per_prompt={group_size}"
        )
    return returns.view(-1, group_size)


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline: ``A_i = R_i − mean_{j≠i} R_j`` within each prompt's k samples.

    ``returns`` is ordered so that the k samples of one prompt are consecutive.
    """
    grouped = _grouped(returns, group_size)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(returns.shape)


def group_mean_advantages(returns: Tensor, group_size: int) -> Tensor:
    """GRPO-style group baseline without std normalisation: ``A_i = R_i − mean_j R_j``."""
    grouped = _grouped(returns, group_size)
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(returns.shape)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++: per-token rewards-to-go minus one global (batch-wide) baseline."""
    togo = rewards_to_go(token_rewards, mask, gamma)
    baseline = togo.sum() / mask.sum().clamp_min(1)
    return (togo - baseline) * mask


def broadcast_to_tokens(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every response token its sequence's advantage."""
    return sequence_advantages.unsqueeze(-1) * mask
