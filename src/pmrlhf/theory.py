"""Closed forms of preference models and of the optimal RLHF policies.

Everything here is a pure function of tensors, batched over leading dimensions: the last
dimension indexes the finite set of responses to one prompt. See docs/method.md §1–§4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ODERegularizer",
    "btl_log_likelihood",
    "btl_probability",
    "collapse_table",
    "cpm_effective_objective",
    "cpm_log_g",
    "cpm_offline_fixed_point",
    "cpm_optimal_policy",
    "default_collapse_reward",
    "dpo_fixed_point",
    "implied_preference",
    "kl_objective",
    "kl_optimal_policy",
    "pl_log_likelihood",
    "pl_probability",
    "pm_objective",
    "pm_offline_fixed_point",
    "pm_optimal_policy",
    "regularized_objective",
]


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


# --------------------------------------------------------------------------- preference models
def btl_probability(reward_1: Tensor, reward_2: Tensor) -> Tensor:
    """Bradley–Terry–Luce probability that response 1 beats response 2: σ(r1 − r2)."""
    return torch.sigmoid(reward_1 - reward_2)


def btl_log_likelihood(reward_winner: Tensor, reward_loser: Tensor) -> Tensor:
    """log σ(r_w − r_l), computed without overflow for large reward gaps."""
    return torch.nn.functional.logsigmoid(reward_winner - reward_loser)


def pl_log_likelihood(ranked_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett–Luce log-likelihood of a ranking, scores given best to worst on the last dim.

    ``log P = Σ_k [s_k − log Σ_{j≥k} exp s_j]``. ``mask`` marks the responses present in each
    ranking; masked entries must be trailing (lists of different lengths padded at the end).
    The k = K term is always zero, so a two-item ranking gives exactly the BTL log-likelihood.
    """
    if mask is None:
        scores = ranked_scores
        present = torch.ones_like(ranked_scores, dtype=torch.bool)
    else:
        if mask.shape != ranked_scores.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != scores shape {tuple(ranked_scores.shape)}"
            )
        present = mask.bool()
        scores = ranked_scores.masked_fill(~present, float("-inf"))
    # log Σ_{j≥k} exp s_j: a reversed cumulative logsumexp.
    tail_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = torch.where(present, scores - tail_lse, torch.zeros_like(scores))
    return terms.sum(-1)


def pl_probability(ranked_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett–Luce probability of a ranking (scores best to worst on the last dim)."""
    return pl_log_likelihood(ranked_scores, mask).exp()


# --------------------------------------------------------------------------- optimal policies
def kl_optimal_policy(reward: Tensor, ref_probs: Tensor, beta: float) -> Tensor:
    """Optimum of J_KL: ``π* ∝ π_ref · exp(r/β)`` (docs/method.md §2)."""
    _check_beta(beta)
    if ref_probs.shape != reward.shape:
        raise ValueError(
            f"ref_probs shape {tuple(ref_probs.shape)} != reward shape {tuple(reward.shape)}"
        )
    return torch.softmax(reward / beta + torch.log(ref_probs), dim=-1)


def pm_optimal_policy(reward: Tensor, beta: float = 1.0) -> Tensor:
    """Optimum of J_PM: ``π* = softmax(r/β)``; β = 1 is exact preference matching (docs/method.md §3)."""
    _check_beta(beta)
    return torch.softmax(reward / beta, dim=-1)


def _not_meaningful_log_ref(ref_token_probs: Tensor, token_mask: Tensor, alpha: float) -> Tensor:
    """Σ over a response's real tokens with π_ref ≤ α of log π_ref (docs/method.md §4, strict > at α)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if token_mask.shape != ref_token_probs.shape:
        raise ValueError(
            f"token_mask shape {tuple(token_mask.shape)} != ref_token_probs shape "
            f"{tuple(ref_token_probs.shape)}"
        )
    not_meaningful = token_mask.bool() & ~(ref_token_probs > alpha)
    log_ref = torch.log(
        torch.where(not_meaningful, ref_token_probs, torch.ones_like(ref_token_probs))
    )
    return log_ref.sum(-1)


def cpm_log_g(ref_token_probs: Tensor, token_mask: Tensor, alpha: float) -> Tensor:
    """``log g(y) = Σ_{t: π_ref(y_t|s_t) ≤ α} log π_ref(y_t|s_t)`` over each response's real
    tokens (..., T) → (...): the reference's say in the conditional-PM optimum."""
    return _not_meaningful_log_ref(ref_token_probs, token_mask, alpha)


def cpm_optimal_policy(
    reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor, alpha: float, beta: float
) -> Tensor:
    """Effective optimum of conditional PM for a finite response set (docs/method.md §4).

    ``π(y) ∝ exp(r_y/β) · Π_{t: π_ref(y_t|s_t) ≤ α} π_ref(y_t|s_t)``.

    ``reward``: (..., N); ``ref_token_probs`` and ``token_mask``: (..., N, T), the reference
    probability of each response token and which positions are real tokens.
    """
    _check_beta(beta)
    if ref_token_probs.shape[:-1] != reward.shape:
        raise ValueError(
            f"ref_token_probs leading shape {tuple(ref_token_probs.shape[:-1])} != reward shape "
            f"{tuple(reward.shape)}"
        )
    return torch.softmax(
        reward / beta + _not_meaningful_log_ref(ref_token_probs, token_mask, alpha), dim=-1
    )


# --------------------------------------------------------------------------- offline fixed points
# An offline loss reads the policy as a reward model, s(y) = β(log π(y) − log h(y)), and fits s
# to the comparisons by BTL (rankings by Plackett–Luce). Its fixed point on data from a BTL
# reward r has s = r + c, i.e. π ∝ h·exp(r/β): the optimum of the RLHF objective h came from.
def dpo_fixed_point(reward: Tensor, ref_probs: Tensor, beta: float) -> Tensor:
    """Fixed point of the DPO loss ``−log σ(β[log π/π_ref (y_w) − log π/π_ref (y_l)])``:
    the KL optimum ``π ∝ π_ref · exp(r/β)`` (docs/method.md §9)."""
    return kl_optimal_policy(reward, ref_probs, beta)


def pm_offline_fixed_point(reward: Tensor, beta: float = 1.0) -> Tensor:
    """Fixed point of the offline PM loss ``−log σ(β[log π(y_w) − log π(y_l)])``: the PM
    optimum ``softmax(r/β)``, with no reference (docs/method.md §9)."""
    return pm_optimal_policy(reward, beta)


def cpm_offline_fixed_point(
    reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor, alpha: float, beta: float
) -> Tensor:
    """Fixed point of the offline cPM loss ``−log σ(β[(log π − log g)(y_w) − (log π − log g)(y_l)])``:
    the g-tilted optimum ``π ∝ exp(r/β) · g`` (docs/method.md §9)."""
    return cpm_optimal_policy(reward, ref_token_probs, token_mask, alpha, beta)


def implied_preference(probs: Tensor) -> Tensor:
    """Pairwise preference a policy implies: ``P[..., i, j] = p_i / (p_i + p_j)``.

    Pairs where both probabilities are zero are given 1/2 (no information either way).
    """
    p_i = probs.unsqueeze(-1)
    p_j = probs.unsqueeze(-2)
    denom = p_i + p_j
    half = torch.full_like(denom, 0.5)
    return torch.where(denom > 0, p_i / torch.where(denom > 0, denom, torch.ones_like(denom)), half)


# --------------------------------------------------------------------------- objectives
def _entropy_term(probs: Tensor) -> Tensor:
    """Σ π log π with 0 log 0 = 0."""
    return torch.where(
        probs > 0, probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0
    ).sum(-1)


def pm_objective(probs: Tensor, reward: Tensor, beta: float = 1.0) -> Tensor:
    """``J_PM(π) = Σ_y π_y (r_y − β log π_y)``; responses with π_y = 0 contribute 0."""
    expected_reward = torch.where(probs > 0, probs * reward, 0.0).sum(-1)
    return expected_reward - beta * _entropy_term(probs)


def kl_objective(probs: Tensor, reward: Tensor, ref_probs: Tensor, beta: float) -> Tensor:
    """``J_KL(π) = Σ_y π_y (r_y − β log(π_y / π_ref,y))``; responses with π_y = 0 contribute 0."""
    log_ref = torch.where(probs > 0, probs * torch.log(ref_probs), 0.0).sum(-1)
    return pm_objective(probs, reward, beta) + beta * log_ref


def cpm_effective_objective(
    probs: Tensor,
    reward: Tensor,
    ref_token_probs: Tensor,
    token_mask: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    """Sequence-level conditional-PM objective for a finite response set.

    The per-token penalties of docs/method.md §4 sum, over a response, to
    ``log π(y) − Σ_{t not meaningful} log π_ref(y_t|s_t)``, so
    ``J = Σ_y π_y (r_y − β log π_y + β Σ_{t not meaningful} log π_ref)``.
    """
    bonus = _not_meaningful_log_ref(ref_token_probs, token_mask, alpha)
    return pm_objective(probs, reward + beta * bonus, beta)


def regularized_objective(
    probs: Tensor, reward: Tensor, regularizer: Callable[[Tensor], Tensor]
) -> Tensor:
    """``J_R(π) = Σ_y π_y (r_y + R(π_y))`` for a sequence-level regulariser R (docs/method.md §3)."""
    return (probs * (reward + regularizer(probs))).sum(-1)


@dataclass(frozen=True)
class ODERegularizer:
    """A member of the PM regulariser family ``R(z) = −log z + C1 + C2/z``.

    Every member solves ``R(z) + z R'(z) = −log z + c`` and so has the PM optimum
    ``softmax(r)``; the constants only shift the objective (``C2/z`` adds ``n·C2``).
    """

    c1: float = 0.0
    c2: float = 0.0

    def __call__(self, z: Tensor) -> Tensor:
        return -torch.log(z) + self.c1 + self.c2 / z

    def ode_residual(self, z: Tensor) -> Tensor:
        """``R(z) + z R'(z) + log z``: constant (= C1 − 1) exactly for family members."""
        z = z.detach().requires_grad_(True)
        value = self(z)
        (grad,) = torch.autograd.grad(value.sum(), z)
        return (value + z * grad + torch.log(z)).detach()


# --------------------------------------------------------------------------- collapse showcase
def collapse_table(
    reward: Tensor, ref_probs: Tensor, betas: list[float], pm_beta: float = 1.0
) -> dict:
    """The numbers behind ``pmrlhf exact``: KL-RLHF optima over β against the PM optimum.

    The "top pair" is the two highest-reward responses; the minority is every response but the
    highest-reward one.
    """
    order = torch.argsort(reward, descending=True)
    top, second = int(order[0]), int(order[1]) if reward.numel() > 1 else int(order[0])
    rm_pref = float(btl_probability(reward[top], reward[second]))
    pm_target = pm_optimal_policy(reward, 1.0)

    def row(method: str, beta: float, probs: Tensor) -> dict:
        pref = implied_preference(probs)[top, second]
        return {
            "method": method,
            "beta": beta,
            "policy": [float(p) for p in probs],
            "implied_preference": float(pref),
            "rm_preference": rm_pref,
            "minority_mass": float(1.0 - probs[top]),
            "tv_to_pm_target": float(0.5 * (probs - pm_target).abs().sum()),
        }

    rows = [row("kl", b, kl_optimal_policy(reward, ref_probs, b)) for b in betas]
    rows.append(row("pm", pm_beta, pm_optimal_policy(reward, pm_beta)))
    return {
        "reward": [float(r) for r in reward],
        "ref": [float(p) for p in ref_probs],
        "top_pair": [top, second],
        "target_minority_mass": float(1.0 - pm_target[top]),
        "rows": rows,
    }


def default_collapse_reward() -> list[float]:
    """The spec's 51%/49% example: ``r1 − r2 = log(0.51/0.49)``."""
    return [math.log(0.51 / 0.49), 0.0]
