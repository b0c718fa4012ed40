"""Advantage estimators. Pure tensor functions over (batch, T) per-token tensors.

``token_rewards`` already holds the shaped reward of docs/method.md §4: ``−β p_t`` at every response token
plus the sequence reward at the last one. ``mask`` marks the response tokens (right-padded).
None of the estimators normalises by a standard deviation: that would rescale β and break the
preference-matching target (docs/method.md §5).

Estimators are registered by name (:func:`register_advantage`) with one signature,
``(token_rewards, mask, values, settings) -> (advantages, returns or None)``; the trainer looks
the configured ``algo`` up in :data:`ADVANTAGE_ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def add_sequence_reward(token_rewards: Tensor, reward: Tensor, mask: Tensor) -> Tensor:
    """The shaped per-token rewards with each sequence's reward added at its last response token.

    ``token_rewards``: (B, T) per-token rewards (``−β p_t``); ``reward``: (B,); ``mask``: (B, T)
    right-padded response mask. A row without response tokens gets its reward at position 0.
    """
    out = token_rewards.clone()
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    out[torch.arange(mask.shape[0], device=mask.device), last] += reward
    return out


def penalty_to_go_rewards(state_penalty: Tensor, mask: Tensor, beta: float) -> Tensor:
    """The full estimator's per-token rewards: action ``t`` gets ``−β f(s_{t+1})``.

    ``state_penalty``: (B, T) ``f(s_t)`` at each visited state (detached); ``mask``: (B, T)
    right-padded response mask. State ``s_{t+1}`` is visited when position ``t+1`` is a response
    token; the last response token has no later state and gets 0. The state's own ``f(s_t)`` is
    not in action ``t``'s reward: its gradient is the direct term in the loss (docs/method.md §8).
    """
    later = torch.zeros_like(state_penalty)
    later[..., :-1] = (state_penalty * mask)[..., 1:]
    return -beta * later * mask


def whiten(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages minus their masked batch mean, divided by their masked batch std.

    This rescales β and so moves the PM optimum; it runs only when asked for.
    """
    mean = (advantages * mask).sum() / mask.sum()
    std = (((advantages - mean) * mask) ** 2).sum().div(mask.sum()).sqrt()
    return (advantages - mean) / (std + 1e-8) * mask


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
    """REINFORCE++: per-token rewards-to-go minus a leave-one-out global baseline.

    The baseline of sequence ``i`` is the mean rewards-to-go over the response tokens of every
    *other* sequence in the batch, ``b_i = Σ_{j≠i} Σ_t G_jt / Σ_{j≠i} T_j``. Leaving the sample's
    own return out keeps the baseline independent of the sampled response, so the gradient
    estimate is unbiased; a batch-wide mean that includes it is biased by O(1/B). A batch of one
    sequence has no other samples and gets baseline 0.
    """
    togo = rewards_to_go(token_rewards, mask, gamma)
    own_sum, own_count = togo.sum(-1), mask.sum(-1)
    others_sum = own_sum.sum() - own_sum
    others_count = own_count.sum() - own_count
    baseline = others_sum / others_count.clamp_min(1)
    return (togo - baseline.unsqueeze(-1)) * mask


def broadcast_to_tokens(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every response token its sequence's advantage."""
    return sequence_advantages.unsqueeze(-1) * mask


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class AdvantageSettings:
    """What an estimator may read besides the rewards: the batch layout and the discounts."""

    group_size: int  # samples per prompt; a prompt's samples are consecutive in the batch
    gamma: float = 1.0
    lam: float = 0.95


EstimatorFn = Callable[
    [Tensor, Tensor, Tensor | None, AdvantageSettings], tuple[Tensor, Tensor | None]
]


ScaleFn = Callable[[AdvantageSettings], float]


def _unit_scale(settings: AdvantageSettings) -> float:
    return 1.0


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: ``fn(token_rewards, mask, values, settings)`` returns
    ``(advantages, returns)``; ``returns`` are the value targets, None without a critic.

    ``gradient_scale(settings)`` is the factor by which the estimator's expected policy
    gradient multiplies the true one (``(k−1)/k`` for GRPO's group mean, 1 otherwise). The full
    penalty estimator multiplies its direct term by it, so that the two parts keep their
    proportion and the fixed point stays where it is (docs/method.md §8).
    """

    name: str
    fn: EstimatorFn
    needs_critic: bool = False
    min_group_size: int = 1
    gradient_scale: ScaleFn = _unit_scale

    def __call__(
        self,
        token_rewards: Tensor,
        mask: Tensor,
        values: Tensor | None,
        settings: AdvantageSettings,
    ) -> tuple[Tensor, Tensor | None]:
        if self.needs_critic and values is None:
            raise ValueError(f"the {self.name!r} estimator needs critic values")
        return self.fn(token_rewards, mask, values, settings)


#: algo name -> estimator. Live: an estimator registered later shows up in the ``algo`` choices.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(
    name: str,
    *,
    needs_critic: bool = False,
    min_group_size: int = 1,
    gradient_scale: ScaleFn = _unit_scale,
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Function decorator: make ``fn`` the advantage estimator of ``algo: name``.

    ``needs_critic`` makes the trainer build and train a value model (PPO);
    ``min_group_size`` is the smallest ``samples_per_prompt`` the estimator accepts;
    ``gradient_scale`` is the factor its expected gradient puts on the true one (see
    :class:`AdvantageEstimator`).
    """

    def register(fn: EstimatorFn) -> EstimatorFn:
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(
            name, fn, needs_critic, min_group_size, gradient_scale
        )
        return fn

    return register


@register_advantage("ppo", needs_critic=True)
def ppo_estimator(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, settings: AdvantageSettings
) -> tuple[Tensor, Tensor | None]:
    """PPO: GAE(γ, λ) on the critic's values; the returns are the critic's targets."""
    assert values is not None  # AdvantageEstimator checks needs_critic
    return gae(token_rewards, values, mask, settings.gamma, settings.lam)


@register_advantage("rloo", min_group_size=2)
def rloo_estimator(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, settings: AdvantageSettings
) -> tuple[Tensor, Tensor | None]:
    """RLOO: each sequence's return minus the mean of its prompt's other samples."""
    returns = sequence_returns(token_rewards, mask)
    return broadcast_to_tokens(rloo_advantages(returns, settings.group_size), mask), None


def _group_mean_scale(settings: AdvantageSettings) -> float:
    """``R_i − mean_j R_j = ((k−1)/k)(R_i − mean_{j≠i} R_j)``: RLOO scaled by (k−1)/k."""
    return (settings.group_size - 1) / settings.group_size


@register_advantage("grpo", min_group_size=2, gradient_scale=_group_mean_scale)
def grpo_estimator(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, settings: AdvantageSettings
) -> tuple[Tensor, Tensor | None]:
    """GRPO without std normalisation: return minus the mean of the prompt's samples."""
    returns = sequence_returns(token_rewards, mask)
    return broadcast_to_tokens(group_mean_advantages(returns, settings.group_size), mask), None


@register_advantage("reinforce_pp")
def reinforce_pp_estimator(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, settings: AdvantageSettings
) -> tuple[Tensor, Tensor | None]:
    """REINFORCE++: discounted rewards-to-go minus a leave-one-out global baseline."""
    return reinforce_pp_advantages(token_rewards, mask, settings.gamma), None
