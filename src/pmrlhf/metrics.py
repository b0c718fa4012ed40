"""Evaluation metrics: the paper's PMD (docs/method.md §6) and distribution-matching measures.

Distributions are tensors whose last dimension indexes the responses; functions batch over
leading dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pmrlhf.theory import btl_probability, implied_preference

__all__ = [
    "kl_divergence",
    "minority_mass",
    "pmd",
    "pmd_all_pairs",
    "pmd_improvement",
    "preference_calibration_error",
    "total_variation",
]


def pmd(reward_1: Tensor, reward_2: Tensor, logp_1: Tensor, logp_2: Tensor) -> Tensor:
    """Preference matching divergence: ``mean [(r1 − r2) − (log π(y1) − log π(y2))]²``.

    Each argument holds one value per evaluation prompt, for two responses drawn independently
    from the policy. It is zero exactly when the policy's log-odds between the two responses
    equal the reward model's, i.e. when its pairwise preference is the BTL preference.
    """
    shapes = {tuple(t.shape) for t in (reward_1, reward_2, logp_1, logp_2)}
    if len(shapes) != 1:
        raise ValueError(f"pmd arguments must share one shape, got {sorted(shapes)}")
    gap = (reward_1 - reward_2) - (logp_1 - logp_2)
    return (gap.double() ** 2).mean()


def pmd_all_pairs(rewards: Tensor, logps: Tensor) -> Tensor:
    """PMD over every pair of a fixed response set, ``mean_{i<j} [(r_i − r_j) − (l_i − l_j)]²``.

    ``rewards`` and ``logps`` hold one value per response (the last dimension; leading ones are
    averaged too). Sampled PMD draws both responses from the policy, so a policy that always
    gives the same response scores 0 whatever its preferences; over a fixed set, such as every
    valid answer of an enumerable task, a collapsed policy's log-odds against the answers it no
    longer gives count in full.
    """
    if rewards.shape != logps.shape or rewards.shape[-1] < 2:
        raise ValueError(
            f"pmd_all_pairs needs rewards and log-probs of one shape with at least 2 responses, "
            f"got {tuple(rewards.shape)} and {tuple(logps.shape)}"
        )
    gap = rewards.double() - logps.double()
    diff = gap.unsqueeze(-1) - gap.unsqueeze(-2)
    n = gap.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=gap.device), diagonal=1)
    return (diff[..., upper] ** 2).mean()


def pmd_improvement(pmd_baseline: float | Tensor, pmd_method: float | Tensor) -> float:
    """Relative PMD reduction ``(PMD_base − PMD_method) / PMD_base`` (paper: 29–41%)."""
    base, method = float(pmd_baseline), float(pmd_method)
    if base <= 0:
        raise ValueError(f"baseline PMD must be > 0 to compute an improvement, got {base}")
    return (base - method) / base


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """``½ Σ |p − q|`` over the last dimension."""
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return 0.5 * (p - q).abs().sum(-1)


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ p log(p/q)`` with ``0 log 0 = 0``; ``inf`` where q = 0 < p."""
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    ratio = torch.where(p > 0, torch.log(p) - torch.log(q), torch.zeros_like(p))
    return torch.where(p > 0, p * ratio, torch.zeros_like(p)).sum(-1)


def minority_mass(probs: Tensor, target: Tensor, share: float | None = None) -> Tensor:
    """Mass a policy puts on minority responses.

    With ``share`` given, the minority is every response whose target share is below it;
    otherwise it is every response but the target's majority (its argmax).
    """
    if probs.shape != target.shape:
        raise ValueError(
            f"probs and target differ in shape: {tuple(probs.shape)} vs {tuple(target.shape)}"
        )
    if share is None:
        minority = torch.ones_like(target, dtype=torch.bool)
        minority.scatter_(-1, target.argmax(-1, keepdim=True), False)
    else:
        minority = target < share
    return torch.where(minority, probs, torch.zeros_like(probs)).sum(-1)


def preference_calibration_error(probs: Tensor, reward: Tensor) -> Tensor:
    """Mean ``|π_i/(π_i+π_j) − σ(r_i − r_j)|`` over the pairs i < j.

    Zero exactly when every implied pairwise preference of the policy equals the BTL preference
    of the reward (which is the PM property).
    """
    if probs.shape != reward.shape:
        raise ValueError(
            f"probs and reward differ in shape: {tuple(probs.shape)} vs {tuple(reward.shape)}"
        )
    n = probs.shape[-1]
    if n < 2:
        raise ValueError("calibration needs at least two responses")
    implied = implied_preference(probs)
    btl = btl_probability(reward.unsqueeze(-1), reward.unsqueeze(-2))
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=probs.device), diagonal=1)
    return (implied - btl).abs()[..., upper].mean(-1)
