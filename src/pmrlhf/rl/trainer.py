"""The RL training loop. One step:

    prompts ─> generate ─> reward, ref log-probs (kl/cpm only), values (PPO) ─> policy forward
            ─> per-token penalty ─> shaped rewards ─> advantages ─> losses ─> optimizer step

Each arrow is a function from :mod:`pmrlhf.rl.rollout`, :mod:`pmrlhf.regularizers`,
:mod:`pmrlhf.rl.advantages` or :mod:`pmrlhf.rl.losses`; this file only strings them together,
handles devices through ``accelerate``, and writes metrics and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmrlhf.regularizers import make_regularizer
from pmrlhf.rl import advantages as adv
from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.losses import aggregate, clipped_policy_loss, clipped_value_loss
from pmrlhf.rl.rewards import CallableReward, RewardFn, is_model_reward, load_reward
from pmrlhf.rl.rollout import Rollout, ValueModel, generate, token_logprobs
from pmrlhf.runtime import (
    JsonlLogger,
    Stopwatch,
    atomic_directory,
    commit_directory,
    fresh_temp_directory,
    set_seed,
)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


def _lr_lambda(config: RLConfig):
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class RLTrainer:
    """Runs :class:`RLConfig` on one or many processes (``accelerate launch``).

    ``reward_fn`` and ``prompts`` may be passed directly from Python; otherwise they are loaded
    from ``config.reward`` and ``config.prompts``. ``allowed_token_ids`` restricts the policy (and
    the reference) to a fixed token set, consistently in sampling and scoring.
    """

    def __init__(
        self,
        config: RLConfig,
        reward_fn: RewardFn | None = None,
        prompts: Sequence[str] | None = None,
        allowed_token_ids: list[int] | None = None,
        accelerator=None,
    ):
        from accelerate import Accelerator

        config.validate()
        config.warn_pm_safety()
        self.config = config
        from pmrlhf.training import mixed_precision

        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(config.dtype)
        )
        self.device = self.accelerator.device
        # Trained models keep fp32 weights and optimizer state, computing under autocast, so
        # that small updates (lr 1e-6 in the paper) are not rounded away; the frozen reference
        # and reward models are held directly in the compute dtype.
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            str(self.accelerator.mixed_precision), torch.float32
        )
        self.allowed_token_ids = allowed_token_ids
        self._rollout_copy = None
        self.regularizer = make_regularizer(config.regularizer, config.beta, config.alpha)
        set_seed(config.seed)
        self._load_models(reward_fn)
        self.prompts = list(prompts) if prompts is not None else self._load_prompts()
        if not self.prompts:
            raise ValueError("no prompts to train on")
        self.step = 0

    # ------------------------------------------------------------------ set-up
    def _load_models(self, reward_fn: RewardFn | None) -> None:
        from pmrlhf import lora
        from pmrlhf.models import load_tokenizer

        c = self.config
        assert c.policy is not None and c.reward is not None
        self.tokenizer = load_tokenizer(c.policy, padding_side="left")
        policy = lora.load_policy_model(c.policy, dtype=torch.float32)
        policy.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.ref = None
        if self.regularizer.needs_ref:
            self.ref = lora.load_policy_model(
                c.ref or c.policy, dtype=self.dtype, device=self.device
            ).eval()
            self.ref.requires_grad_(False)
        self.reward_fn = (
            CallableReward(reward_fn)
            if reward_fn is not None
            else load_reward(c.reward, self.device, self.dtype)
        )
        self.critic = None
        params = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": c.lr}]
        if c.algo == "ppo":
            init = c.critic_init
            if init == "auto":
                init = "reward" if is_model_reward(c.reward) and reward_fn is None else "policy"
            critic = ValueModel(
                lora.load_scoring_model(
                    c.reward if init == "reward" else c.policy, dtype=torch.float32
                )
            )
            params.append({"params": list(critic.parameters()), "lr": c.critic_lr})
            self.critic = critic
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(c))
        if self.critic is not None:
            self.policy, self.critic, self.optimizer, self.scheduler = self.accelerator.prepare(
                policy, self.critic, optimizer, scheduler
            )
        else:
            self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(
                policy, optimizer, scheduler
            )

    def _load_prompts(self) -> list[str]:
        from pmrlhf.data import load_prompts

        if not self.config.prompts:
            raise ValueError("config: `prompts` is required when no prompts are passed in")
        records = load_prompts(
            self.config.prompts,
            self.tokenizer,
            split=self.config.prompt_split,
            subset=self.config.prompt_subset,
            max_prompt_tokens=self.config.max_prompt_tokens,
        )
        return [record.prompt for record in records]

    # ------------------------------------------------------------------ one step
    def _step_prompts(self) -> list[str]:
        """Prompts of this step on this process: a pure function of (seed, step, rank)."""
        c = self.config
        generator = torch.Generator().manual_seed(
            c.seed * 1_000_003 + self.step * 9_973 + self.accelerator.process_index
        )
        index = torch.randint(len(self.prompts), (c.prompts_per_step,), generator=generator)
        return [self.prompts[i] for i in index.tolist() for _ in range(c.samples_per_prompt)]

    def _generation_model(self):
        """The model rollouts are sampled from.

        Without mixed precision it is the policy itself. Under bf16/fp16 mixed precision on a
        single device or DDP, it is a copy of the policy held in the compute dtype and refreshed
        from the fp32 weights before every rollout: decoding then runs in pure bf16 with a static
        cache, which autocast over fp32 weights cannot use.
        """
        from accelerate.utils import DistributedType

        policy = self.accelerator.unwrap_model(self.policy)
        plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
        if self.dtype == torch.float32 or not plain:
            return policy
        if self._rollout_copy is None:
            from pmrlhf import lora

            assert self.config.policy is not None
            copy = lora.load_policy_model(self.config.policy, dtype=self.dtype, device=self.device)
            self._rollout_copy = copy.eval().requires_grad_(False)
        with torch.no_grad():
            targets = dict(self._rollout_copy.named_parameters())
            for name, param in policy.named_parameters():
                targets[name].copy_(param)
        return self._rollout_copy

    def _rollout(self, prompts: list[str]) -> Rollout:
        c = self.config
        model = self._generation_model()
        cache = c.cache_implementation
        own_dtype = next(model.parameters()).dtype == self.dtype
        if cache is None and self.device.type == "cuda" and own_dtype:
            cache = "static"  # fastest HF decoding; needs weights in the compute dtype
        was_training = model.training
        model.eval()
        rollout = generate(
            model,
            self.tokenizer,
            prompts,
            max_new_tokens=c.max_new_tokens,
            min_new_tokens=c.min_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            cache_implementation=cache,
            allowed_token_ids=self.allowed_token_ids,
        )
        model.train(was_training)
        return rollout

    def _advantages(
        self, token_rewards: Tensor, mask: Tensor, values: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        c = self.config
        if c.algo == "ppo":
            assert values is not None
            return adv.gae(token_rewards, values, mask, c.gamma, c.lam)
        if c.algo == "reinforce_pp":
            return adv.reinforce_pp_advantages(token_rewards, mask, c.gamma), None
        returns = adv.sequence_returns(token_rewards, mask)
        if c.algo == "rloo":
            seq_adv = adv.rloo_advantages(returns, c.samples_per_prompt)
        else:
            seq_adv = adv.group_mean_advantages(returns, c.samples_per_prompt)
        return adv.broadcast_to_tokens(seq_adv, mask), None

    def _shape(
        self,
        old_logp: Tensor,
        ref_logp: Tensor | None,
        mask: Tensor,
        reward: Tensor,
        old_values: Tensor | None,
    ):
        """Per-token rewards −β·p_t plus the sequence reward at the last token, and advantages.

        Computed once per batch from the detached log-probs of the rollout policy (the sampled
        estimator of spec §5).
        """
        c = self.config
        penalty = self.regularizer.penalty(old_logp, ref_logp, mask)
        token_rewards = -c.beta * penalty
        last = (mask.sum(-1).long() - 1).clamp_min(0)
        token_rewards[torch.arange(mask.shape[0], device=mask.device), last] += reward
        advantages, returns = self._advantages(token_rewards, mask, old_values)
        if c.normalize_advantages:
            mean = (advantages * mask).sum() / mask.sum()
            std = (((advantages - mean) * mask) ** 2).sum().div(mask.sum()).sqrt()
            advantages = (advantages - mean) / (std + 1e-8) * mask
        return penalty, advantages, returns

    def train_step(self) -> dict[str, float]:
        c = self.config
        watch = Stopwatch()
        rollout = self._rollout(self._step_prompts())
        seq, attn, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        mask = rollout.response_mask.float()
        restrict = self.allowed_token_ids
        # With one pass over one minibatch, the old log-probs are the current ones, detached:
        # the policy's forward pass then serves both the rewards and the gradient.
        fused = c.ppo_epochs == 1 and c.minibatches == 1

        with torch.no_grad():
            raw_reward = self.reward_fn(rollout.prompts, rollout.responses).to(self.device).float()
            reward = (
                raw_reward
                if c.reward_clip is None
                else raw_reward.clamp(-c.reward_clip, c.reward_clip)
            )
            ref_logp = (
                token_logprobs(self.ref, seq, attn, P, allowed_token_ids=restrict)[0]
                if self.ref is not None
                else None
            )
            old_logp = old_values = penalty = advantages = returns = None
            if not fused:
                old_logp = token_logprobs(self.policy, seq, attn, P, allowed_token_ids=restrict)[0]
                old_values = self.critic(seq, attn, P) if self.critic is not None else None
                penalty, advantages, returns = self._shape(
                    old_logp, ref_logp, mask, reward, old_values
                )

        n = seq.shape[0]
        stats: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clip_fraction": [],
            "entropy": [],
        }
        for _epoch in range(c.ppo_epochs):
            order = torch.randperm(n) if c.minibatches > 1 else torch.arange(n)
            for chunk in order.chunk(c.minibatches):
                idx = chunk.to(seq.device)
                logp, entropy = token_logprobs(
                    self.policy,
                    seq[idx],
                    attn[idx],
                    P,
                    with_entropy=True,
                    allowed_token_ids=restrict,
                )
                values = self.critic(seq[idx], attn[idx], P) if self.critic is not None else None
                if fused:
                    old_logp = logp.detach()
                    old_values = values.detach() if values is not None else None
                    penalty, advantages, returns = self._shape(
                        old_logp, ref_logp, mask, reward, old_values
                    )
                assert old_logp is not None and advantages is not None and entropy is not None
                m = mask[idx]
                policy_loss, clip_fraction = clipped_policy_loss(
                    logp, old_logp[idx], advantages[idx], m, c.clip, c.loss_aggregation
                )
                loss = policy_loss
                if values is not None:
                    assert returns is not None and old_values is not None
                    value_loss = clipped_value_loss(
                        values, old_values[idx], returns[idx], m, c.value_clip
                    )
                    loss = loss + c.value_coef * value_loss
                    stats["value_loss"].append(float(value_loss.detach()))
                self.accelerator.backward(loss)
                if c.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self._trainable_parameters(), c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["entropy"].append(float(aggregate(entropy, m, "token-mean")))
        self.scheduler.step()
        self.step += 1

        assert old_logp is not None and penalty is not None
        seconds = watch.seconds()
        metrics: dict[str, float] = {
            "step": self.step,
            "reward_mean": float(raw_reward.mean()),
            "penalty_mean": float(penalty.sum(-1).mean()),
            "logp_mean": float((old_logp * mask).sum(-1).mean()),
            "entropy": _mean(stats["entropy"]),
            "response_length": float(mask.sum(-1).mean()),
            "clip_fraction": _mean(stats["clip_fraction"]),
            "policy_loss": _mean(stats["policy_loss"]),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "step_seconds": seconds,
            "samples_per_second": n / seconds,
        }
        if ref_logp is not None:
            metrics["kl_to_ref"] = float(((old_logp - ref_logp) * mask).sum(-1).mean())
        if stats["value_loss"]:
            metrics["value_loss"] = _mean(stats["value_loss"])
        return self._gather(metrics)

    def _trainable_parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _gather(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        local = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        mean = self.accelerator.reduce(local, reduction="mean")
        out = dict(zip(keys, mean.tolist(), strict=True))
        out["step"] = self.step
        out["samples_per_second"] = metrics["samples_per_second"] * self.accelerator.num_processes
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Atomically write policy, critic, optimizer, scheduler, RNG states and the step."""
        final = (
            Path(directory)
            if directory is not None
            else Path(self.config.output_dir) / CHECKPOINT_DIR
        )
        acc = self.accelerator
        tmp = (
            fresh_temp_directory(final)
            if acc.is_main_process
            else final.with_name(final.name + ".tmp")
        )
        acc.wait_for_everyone()
        # Tied input/output embeddings are saved once; accelerate warns about that on every save,
        # and the resume test checks that they reload exactly.
        shared_tensor_log = logging.getLogger("accelerate.utils.other")
        level = shared_tensor_log.level
        shared_tensor_log.setLevel(logging.ERROR)
        try:
            acc.save_state(str(tmp), safe_serialization=True)
        finally:
            shared_tensor_log.setLevel(level)
        if acc.is_main_process:
            acc.unwrap_model(self.policy).save_pretrained(tmp / "policy")
            self.tokenizer.save_pretrained(tmp / "policy")
            (tmp / STATE_FILE).write_text(
                json.dumps({"step": self.step, "config": asdict(self.config)}, indent=2)
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            commit_directory(tmp, final)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: str | Path) -> None:
        directory = Path(directory)
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"not a pmrlhf RL checkpoint (no {STATE_FILE}): {directory}")
        self.accelerator.load_state(str(directory))
        self.step = int(json.loads(state_file.read_text())["step"])

    def save_policy(self, directory: str | Path) -> None:
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                self.accelerator.unwrap_model(self.policy).save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def train(self, resume: str | Path | None = None, print_summary: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        c = self.config
        out = Path(c.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        main = self.accelerator.is_main_process
        logger = JsonlLogger(out / "metrics.jsonl" if main else None, append=resume is not None)
        board = _tensorboard(out) if (c.tensorboard and main) else None
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc=f"rl {c.algo}/{c.regularizer}",
            disable=c.quiet or not main,
        )
        history: list[dict[str, float]] = []
        watch = Stopwatch()
        while self.step < c.steps:
            metrics = self.train_step()
            history.append(metrics)
            logger.log(metrics)
            if board is not None:
                for key, value in metrics.items():
                    board.add_scalar(f"rl/{key}", value, self.step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}", pen=f"{metrics['penalty_mean']:.3f}"
            )
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        bar.close()
        logger.close()
        if board is not None:
            board.close()
        self.save_checkpoint()
        self.save_policy(out / "policy")
        summary = _summary(history, watch.seconds(), out)
        if main and print_summary and not c.quiet:
            print(json.dumps(summary, indent=2))
        return summary


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _summary(history: list[dict[str, float]], seconds: float, out: Path) -> dict[str, Any]:
    tail = history[-max(1, len(history) // 10) :] if history else []
    keys = ("reward_mean", "penalty_mean", "entropy", "response_length", "kl_to_ref")
    final = {k: _mean([h[k] for h in tail if k in h]) for k in keys if any(k in h for h in tail)}
    return {
        "steps_run": len(history),
        "seconds": seconds,
        "final (mean of last 10% of steps)": final,
        "samples_per_second": _mean([h["samples_per_second"] for h in history]),
        "policy": str(out / "policy"),
        "metrics": str(out / "metrics.jsonl"),
    }


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))
