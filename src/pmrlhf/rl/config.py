"""The typed configuration of an RL run. Each field's help is its ``pmrlhf rl --help`` entry."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pmrlhf.config import option

ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce_pp")


class PMSafetyWarning(UserWarning):
    """A setting that silently moves the optimum away from the preference-matching target."""


@dataclass
class RLConfig:
    # models
    policy: str | None = option(None, help="policy: HF hub id, local folder or .gguf file")
    ref: str | None = option(
        None,
        help="reference model (default: the policy's starting weights); loaded only for kl/cpm",
    )
    reward: str | None = option(
        None,
        help="reward: a reward-model folder (from `pmrlhf rm`) or a Python callable 'module:function' / 'file.py:function' taking (prompts, completions) and returning floats",
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
    algo: str = option("rloo", help="policy-gradient algorithm", choices=list(ALGORITHMS))
    regularizer: str = option(
        "pm",
        help="per-token regulariser: kl (standard RLHF), pm (preference matching) or cpm (conditional PM)",
        choices=["kl", "pm", "cpm"],
    )
    beta: float = option(
        1.0, help="regularisation strength β; β=1 with pm is exact preference matching"
    )
    alpha: float = option(
        0.1,
        help="cpm threshold α in (0,1): tokens with π_ref > α get the PM term, the rest the KL term",
    )
    steps: int = option(100, help="number of optimisation steps (one generation batch each)")
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
        help="how per-token losses are reduced: seq-mean-token-sum (unbiased, no length weighting) or token-mean",
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
    min_new_tokens: int = option(0, help="minimum response length in tokens")
    temperature: float = option(
        1.0, help="sampling temperature during rollouts (≠1 breaks the PM target)"
    )
    top_p: float = option(1.0, help="nucleus sampling during rollouts (<1 breaks the PM target)")
    top_k: int = option(0, help="top-k sampling during rollouts (0 = off; >0 breaks the PM target)")
    cache_implementation: str | None = option(
        None,
        help="HF generation cache ('static' is fastest on GPU); default: static on CUDA, dynamic on CPU",
    )
    # optimisation
    lr: float = option(1e-5, help="policy learning rate")
    critic_lr: float = option(1e-5, help="critic learning rate (PPO)")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(0, help="linear learning-rate warm-up steps")
    lr_schedule: str = option(
        "constant",
        help="learning-rate schedule after warm-up",
        choices=["constant", "linear", "cosine"],
    )
    max_grad_norm: float = option(1.0, help="gradient-norm clip (0 = off)")
    dtype: str = option(
        "auto",
        help="compute precision: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16 or "
        "fp16; trained weights and optimizer state stay fp32 (mixed precision), the frozen "
        "reference and reward models are held in this dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
    )
    seed: int = option(0, help="random seed")
    # output
    output_dir: str = option(
        "runs/rl", help="folder for metrics.jsonl, checkpoints and the final policy"
    )
    save_every: int = option(0, help="write a checkpoint every N steps (0 = only at the end)")
    tensorboard: bool = option(
        False, help="also log metrics to tensorboard in output_dir/tensorboard"
    )
    quiet: bool = option(False, help="no progress bar and no final summary printout")

    def validate(self) -> None:
        if not self.policy:
            raise ValueError("config: `policy` is required (a hub id, folder or .gguf file)")
        if not self.reward:
            raise ValueError(
                "config: `reward` is required (a reward-model folder or 'module:function')"
            )
        if self.beta <= 0:
            raise ValueError(f"config: beta must be > 0, got {self.beta}")
        if self.regularizer == "cpm" and not 0 < self.alpha < 1:
            raise ValueError(f"config: alpha must lie in (0, 1) for cpm, got {self.alpha}")
        if self.algo in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(
                f"config: {self.algo} needs samples_per_prompt >= 2, got {self.samples_per_prompt}"
            )
        for name in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "max_new_tokens",
            "ppo_epochs",
            "minibatches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        batch = self.prompts_per_step * self.samples_per_prompt
        if batch % self.minibatches:
            raise ValueError(
                f"config: batch of {batch} responses does not split into {self.minibatches} minibatches"
            )

    def pm_safety_issues(self) -> list[str]:
        """Settings that silently break the PM target (spec §5); empty for kl runs."""
        if self.regularizer == "kl":
            return []
        issues = []
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
        if self.loss_aggregation == "token-mean" and self.max_new_tokens > 1:
            issues.append("loss_aggregation=token-mean weights sequences by length")
        return issues

    def warn_pm_safety(self) -> None:
        for issue in self.pm_safety_issues():
            warnings.warn(
                f"{self.regularizer} target at risk: {issue}", PMSafetyWarning, stacklevel=2
            )
