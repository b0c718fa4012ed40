"""What one RL step passes from sampling to learning: :class:`Experience`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Experience", "PolicyForward"]


@dataclass
class PolicyForward:
    """The policy's (and critic's) forward over a batch, with the autograd graph."""

    logp: Tensor  # (B, T) log-probs of the response tokens
    entropy: Tensor  # (B, T) token entropies (no graph)
    values: Tensor | None  # (B, T) critic values, when there is a critic
    #: (B, T) ``f(s_t)``, the penalty's expectation at each visited state, with its graph
    #: (``penalty_estimator: full`` only; docs/method.md §8)
    state_penalty: Tensor | None = None

    def take(self, rows: Tensor) -> PolicyForward:
        """The forward of the rows ``rows`` (a gather, so gradients flow back through it)."""

        def pick(value: Tensor | None) -> Tensor | None:
            return value[rows] if value is not None else None

        return PolicyForward(self.logp[rows], self.entropy[rows], pick(self.values),
                             pick(self.state_penalty))  # fmt: skip


@dataclass
class Experience:
    """One batch of rollouts, sampled and scored: everything :meth:`RLTrainer.update` needs.

    All per-token tensors are (B, T) over the response positions, zero (or ignored) where
    ``mask`` is 0; B = prompts_per_step × samples_per_prompt, a prompt's samples consecutive.
    """

    prompts: list[str]
    sequences: Tensor  # (B, P + T) prompt (left-padded) and response ids
    attention_mask: Tensor  # (B, P + T)
    prompt_length: int  # P
    mask: Tensor  # (B, T) float: 1 on response tokens up to and including EOS
    raw_reward: Tensor  # (B,) as the reward returned it
    reward: Tensor  # (B,) the reward trained on (clipped to ±reward_clip when set)
    ref_logp: Tensor | None  # (B, T) reference log-probs; None when the regulariser needs none
    old_logp: Tensor  # (B, T) detached log-probs under the policy that sampled
    old_values: Tensor | None  # (B, T) detached critic values; None without a critic
    penalty: Tensor  # (B, T) the regulariser's per-token penalty p_t
    advantages: Tensor  # (B, T)
    returns: Tensor | None  # (B, T) value targets; None without a critic
    #: ``penalty_estimator: full``: (B, T) detached ``f(s_t)`` under the sampling policy
    state_penalty: Tensor | None = None
    #: ``penalty_estimator: full`` with a reference and several passes: (B, T, V) reference
    #: logits at the visited states, to recompute ``f`` with the graph in each minibatch
    ref_logits: Tensor | None = None
    #: One-pass mode only (see ``RLTrainer._score_with_rollout_policy``): the forward, with its
    #: graph, whose detached outputs are ``old_logp``/``old_values``; ``update`` differentiates
    #: it instead of running the policy again. None otherwise.
    first_forward: PolicyForward | None = None
    #: distinct (prompt, response) rows of ``sequences`` (:func:`pmrlhf.rl.rollout.distinct_rows`)
    distinct_sequences: int = 0
