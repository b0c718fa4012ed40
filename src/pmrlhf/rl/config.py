"""The typed configuration of an RL run. Each field's help is its ``pmrlhf rl --help`` entry.

An :class:`RLConfig` cannot be built wrong: every check runs in ``__post_init__`` and names the
field. The ``algo`` and ``regularizer`` choices are the live registries of
:mod:`pmrlhf.rl.advantages` and :mod:`pmrlhf.regularizers`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pmrlhf.config import option
from pmrlhf.optim import OptimConfig
from pmrlhf.regularizers import PENALTY_ESTIMATORS, REGULARIZERS, make_regularizer
from pmrlhf.rl.advantages import ADVANTAGE_ESTIMATORS
from pmrlhf.rl.rewards import is_model_reward
from pmrlhf.rl.rollout import DECODER_CHOICES


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _unit(value: float) -> bool:
    return 0 <= value <= 1


#: (field, check, what the check requires) for every single-field range check of RLConfig.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    *((name, _positive, "a finite number > 0") for name in
      ("lr", "critic_lr", "clip", "value_clip", "temperature")),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("gamma", _unit, "in [0, 1]"),
    ("lam", _unit, "in [0, 1]"),
    ("max_grad_norm", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = off)"),
    ("reward_clip", lambda v: v is None or _positive(v), "a finite number > 0 when set"),
    *((name, lambda v: v >= 0, ">= 0") for name in
      ("save_every", "warmup_steps", "min_new_tokens", "top_k")),
    *((name, lambda v: v >= 1, ">= 1") for name in
      ("max_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
       "minibatches", "max_prompt_tokens")),
)  # fmt: skip


class OptimumShiftWarning(UserWarning):
    """A setting that silently moves the optimum away from the regulariser's closed form."""


class PMSafetyWarning(OptimumShiftWarning):
    """A setting that silently moves the optimum away from the preference-matching target."""


@dataclass
class RLConfig(OptimConfig):
    # models
    policy: str | None = option(None, help="policy: HF hub id, local folder or .gguf file")
    ref: str | None = option(
        None,
        help="reference model (default: the policy's starting weights); loaded only for kl/cpm",
    )
    reward: str | None = option(
        None,
        help="reward: a reward-model folder (from `pmrlhf rm`) or a Python callable 'module:function' / 'file.py:function' taking (prompts, completions) and returning floats; optional when a reward_fn is passed in Python",
    )
    critic_init: str = option(
        "auto",
        help="PPO critic initialisation: 'reward' (the paper), 'policy', or 'auto' (reward when it is a model, else policy)",
        choices=["auto", "reward", "policy"],
    )
    # data
    prompts: str | None = option(
        None,
        help="prompt data: jsonl/json/parquet/csv file or HF dataset name with a 'prompt' column",
    )
    prompt_split: str = option("train", help="split name when `prompts` is a hub dataset")
    prompt_subset: str = option(
        "all",
        help="use all rows, or one stage of the paper's deterministic 20/40/40 SFT/RM/RL split",
        choices=["all", "sft", "rm", "rl"],
    )
    max_prompt_tokens: int = option(
        256, help="prompts longer than this many tokens are dropped (and counted)"
    )
    # algorithm
    algo: str = option(
        "rloo",
        help="policy-gradient algorithm (its advantage estimator)",
        choices=ADVANTAGE_ESTIMATORS,
    )
    regularizer: str = option(
        "pm",
        help="per-token regulariser: kl (standard RLHF), pm (preference matching), cpm (conditional PM) or any registered one",
        choices=REGULARIZERS,
    )
    beta: float = option(
        1.0, help="regularisation strength β; β=1 with pm is exact preference matching"
    )
    alpha: float = option(
        0.1,
        help="cpm threshold α in (0,1): tokens with π_ref > α get the PM term, the rest the KL term",
    )
    penalty_estimator: str = option(
        "sampled",
        help="sampled: −β·p_t of the sampled token as a reward (the paper); full: the penalty's exact expectation over the vocabulary at each visited state, its gradient in the loss and the later states' expectations as rewards (the same objective and optimum; less noise far from the optimum, more near it: docs/method.md §8)",
        choices=list(PENALTY_ESTIMATORS),
    )
    max_steps: int = option(100, help="number of RL steps (one generation batch each)")
    prompts_per_step: int = option(8, help="prompts per step and process")
    samples_per_prompt: int = option(
        4, help="responses sampled per prompt (k; RLOO/GRPO need at least 2)"
    )
    gamma: float = option(1.0, help="discount γ (PPO/GAE and REINFORCE++)")
    lam: float = option(0.95, help="GAE λ (PPO)")
    clip: float = option(0.2, help="PPO ratio clip ε")
    value_clip: float = option(0.2, help="PPO value clip")
    value_coef: float = option(0.5, help="weight of the value loss (PPO)")
    ppo_epochs: int = option(
        1,
        help="optimisation passes over each batch; with 1 pass the old log-probs are the current ones, detached",
    )
    minibatches: int = option(1, help="minibatches per pass")
    loss_aggregation: str = option(
        "seq-mean-token-sum",
        help="how per-token losses are reduced: seq-mean-token-sum (unbiased, no length weighting) or token-mean (the same direction, scaled by the batch's token count)",
        choices=["seq-mean-token-sum", "token-mean"],
    )
    reward_clip: float | None = option(
        None, help="clip the sequence reward to ±this value (breaks the PM target; off by default)"
    )
    normalize_advantages: bool = option(
        False,
        help="divide advantages by their batch std (rescales β, breaks the PM target; off by default)",
    )
    # generation
    max_new_tokens: int = option(32, help="maximum response length in tokens")
    min_new_tokens: int = option(
        0, help="minimum response length in tokens (>0 forbids early EOS: moves the target)"
    )
    temperature: float = option(
        1.0, help="sampling temperature during rollouts (≠1 breaks the PM target)"
    )
    top_p: float = option(1.0, help="nucleus sampling during rollouts (<1 breaks the PM target)")
    top_k: int = option(0, help="top-k sampling during rollouts (0 = off; >0 breaks the PM target)")
    decoder: str = option(
        "auto",
        choices=list(DECODER_CHOICES),
        help="sampling loop of the rollouts: lean (pmrlhf's own loop over a static cache, fastest "
        "for small models on a CPU), hf (Hugging Face generate, compiled static-cache decoding on "
        "a GPU) or auto (lean on a CPU, hf elsewhere); both sample the same distribution",
    )
    cache_implementation: str | None = option(
        None,
        help="HF generation cache of the hf decoder ('static' is fastest on GPU); default: static "
        "on CUDA, dynamic on CPU",
    )
    score_distinct_once: bool = option(
        True,
        help="score each distinct (prompt, response) of a step once in the reference, policy and "
        "critic forwards, and share its log-probs, values and gradient with its repeats (exact; "
        "saves work when the policy repeats itself)",
    )
    # optimisation (the shared fields lr, weight_decay, lr_schedule, warmup_steps,
    # max_grad_norm, seed and dtype come from OptimConfig)
    lr: float = option(1e-5, help="policy learning rate (peak, AdamW)")
    critic_lr: float = option(1e-5, help="critic learning rate (PPO)")
    dtype: str = option(
        "auto",
        help="compute precision: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16 or "
        "fp16; trained weights and optimizer state stay fp32 (mixed precision), the frozen "
        "reference and reward models are held in this dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
    )
    # output
    output_dir: str = option(
        "runs/rl",
        help="folder for metrics.jsonl, checkpoints, the final policy and its config.yaml",
    )
    save_every: int = option(0, help="write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoint: bool = option(
        True,
        help="end the run with a checkpoint in output_dir/checkpoint/ (false: a finished run "
        "keeps only its policy, metrics.jsonl and config.yaml, for runs that will not be "
        "continued; save_every checkpoints still guard it while it trains)",
    )
    tensorboard: bool = option(
        False, help="also log metrics to tensorboard in output_dir/tensorboard"
    )
    overwrite: bool = option(
        False,
        help="replace the run already in output_dir (its checkpoint, metrics, policy); without "
        "it a used output_dir is refused unless resuming",
    )
    quiet: bool = option(False, help="no progress bar and no final summary printout")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range (runs on construction)."""
        if not self.policy:
            raise ValueError("config: `policy` is required (a hub id, folder or .gguf file)")
        for name, registry in (
            ("algo", ADVANTAGE_ESTIMATORS), ("regularizer", REGULARIZERS),
            ("decoder", DECODER_CHOICES),
        ):  # fmt: skip
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"config: {name} must be one of {sorted(registry)}, got {getattr(self, name)!r}"
                )
        if self.penalty_estimator not in PENALTY_ESTIMATORS:
            raise ValueError(
                f"config: penalty_estimator must be one of {list(PENALTY_ESTIMATORS)}, "
                f"got {self.penalty_estimator!r}"
            )
        regularizer = REGULARIZERS[self.regularizer]
        if self.penalty_estimator == "full" and not regularizer.supports_full_estimator():
            raise ValueError(
                f"config: penalty_estimator 'full' needs the {self.regularizer!r} regulariser "
                f"to define expected_penalty ({regularizer.__name__} does not); use 'sampled'"
            )
        for name, ok, requirement in _RANGES:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"config: {name} must be {requirement}, got {value}")
        try:  # the regulariser checks its own parameters (β, and α for cpm)
            make_regularizer(self.regularizer, self.beta, self.alpha)
        except ValueError as err:
            raise ValueError(f"config: {err}") from None
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Checks that involve several fields."""
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"config: min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        estimator = ADVANTAGE_ESTIMATORS[self.algo]
        if self.samples_per_prompt < estimator.min_group_size:
            raise ValueError(
                f"config: {self.algo} needs samples_per_prompt >= {estimator.min_group_size}, "
                f"got {self.samples_per_prompt}"
            )
        batch = self.prompts_per_step * self.samples_per_prompt
        if batch % self.minibatches:
            raise ValueError(
                f"config: batch of {batch} responses does not split into {self.minibatches} minibatches"
            )
        callable_reward = self.reward is not None and not is_model_reward(self.reward)
        if estimator.needs_critic and self.critic_init == "reward" and callable_reward:
            raise ValueError(
                f"config: critic_init 'reward' starts the critic from a reward model, but "
                f"reward is the callable {self.reward!r}; use critic_init 'policy' or 'auto'"
            )

    def optimum_shift_issues(self) -> list[str]:
        """Settings that silently move the optimum away from the regulariser's closed form.

        Sampling settings (temperature, top-p, top-k, min_new_tokens) move every regulariser's
        optimum, kl's included, because rollouts are then not drawn from the π that is scored.
        For regularisers that aim at their closed form exactly (pm, cpm), reward clipping and
        advantage normalisation are flagged too (docs/method.md §5). The global ``token-mean`` loss only
        rescales each batch's step, so it leaves the fixed point where it is and is not flagged.
        """
        issues = []
        if REGULARIZERS[self.regularizer].exact_target:
            if self.normalize_advantages:
                issues.append("normalize_advantages divides by a batch std, which rescales β")
            if self.reward_clip is not None:
                issues.append(
                    f"reward_clip={self.reward_clip} clips the reward, so π no longer ∝ exp(r/β)"
                )
        if self.temperature != 1.0:
            issues.append(f"temperature={self.temperature}: rollouts are not drawn from π")
        if self.top_p < 1.0:
            issues.append(f"top_p={self.top_p}: rollouts are not drawn from π")
        if self.top_k > 0:
            issues.append(f"top_k={self.top_k}: rollouts are not drawn from π")
        if self.min_new_tokens > 0:
            issues.append(
                f"min_new_tokens={self.min_new_tokens} forbids EOS for the first "
                f"{self.min_new_tokens} tokens: rollouts are not drawn from π"
            )
        return issues

    def warn_optimum_shift(self) -> None:
        """Warn once per issue: PMSafetyWarning for pm/cpm-like runs, OptimumShiftWarning for kl."""
        regularizer = REGULARIZERS[self.regularizer]
        category = PMSafetyWarning if regularizer.exact_target else OptimumShiftWarning
        target = "target" if regularizer.exact_target else "optimum (π_ref·exp(r/β)/Z for kl)"
        for issue in self.optimum_shift_issues():
            warnings.warn(f"{self.regularizer} {target} moves: {issue}", category, stacklevel=2)
