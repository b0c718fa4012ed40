"""The RL training loop. One step is two named halves:

    make_experience(prompts)   generate ─> reward ─> reference log-probs (kl/cpm) ─> old
                               log-probs and values ─> shaped per-token rewards ─> advantages
    update(experience)         epochs × minibatches: policy (and value) loss ─> backward ─>
                               gradient clip ─> optimizer step; then the lr schedule

Each arrow is a function from :mod:`pmrlhf.rl.rollout`, :mod:`pmrlhf.regularizers`,
:mod:`pmrlhf.rl.advantages` or :mod:`pmrlhf.rl.losses`; this file only strings them together,
handles devices through ``accelerate``, times the phases, and writes metrics and checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmrlhf.config import to_dict
from pmrlhf.optim import build_optimizer, build_scheduler, compute_dtype, mixed_precision
from pmrlhf.regularizers import expected_penalties, make_regularizer
from pmrlhf.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageSettings,
    add_sequence_reward,
    penalty_to_go_rewards,
    whiten,
)
from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.experience import Experience, PolicyForward
from pmrlhf.rl.losses import (
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    expected_penalty_loss,
)
from pmrlhf.rl.rewards import CallableReward, RewardFn, is_model_reward, load_reward
from pmrlhf.rl.rollout import (
    DistinctRows,
    Rollout,
    ValueModel,
    distinct_rows,
    generate,
    logprobs_from_logits,
    resolve_decoder,
    response_logits,
    token_logprobs,
)
from pmrlhf.rl.timing import PHASES, PhaseTimer, phase_postfix
from pmrlhf.runtime import (
    JsonlLogger,
    NonFiniteError,
    Stopwatch,
    atomic_directory,
    check_finite_weights,
    check_resume_settings,
    claim_output_dir_on_main,
    commit_directory,
    fresh_temp_directory,
    recover_directory,
    run_length_settings,
    set_seed,
)

#: A reward passed from Python: ``fn(prompts, completions)`` returning one float per completion.
RewardCallable = Callable[[list[str], list[str]], Sequence[float] | Tensor]

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
# Settings that may differ between a run and its resumption: none of them moves the trajectory.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "save_every", "keep_checkpoint", "tensorboard", "quiet", "overwrite"}
)


class RLTrainer:
    """Runs :class:`RLConfig` on one or many processes (``accelerate launch``).

    ``reward_fn`` and ``prompts`` may be passed directly from Python; otherwise they are loaded
    from ``config.reward`` and ``config.prompts``. ``allowed_token_ids`` restricts the policy (and
    the reference) to a fixed token set, consistently in sampling and scoring.
    """

    def __init__(
        self,
        config: RLConfig,
        reward_fn: RewardCallable | None = None,
        prompts: Sequence[str] | None = None,
        allowed_token_ids: list[int] | None = None,
        accelerator=None,
    ):
        from accelerate import Accelerator

        config.validate()  # again: the fields may have been changed since construction
        if reward_fn is None and not config.reward:
            raise ValueError(
                "config: `reward` is required (a reward-model folder or 'module:function') "
                "unless a reward_fn is passed to RLTrainer"
            )
        config.warn_optimum_shift()
        self.config = config
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(config.dtype)
        )
        self.device = self.accelerator.device
        # Trained models keep fp32 weights and optimizer state, computing under autocast, so
        # that small updates (lr 1e-6 in the paper) are not rounded away; the frozen reference
        # and reward models are held directly in the compute dtype.
        self.dtype = compute_dtype(str(self.accelerator.mixed_precision))
        self.allowed_token_ids = allowed_token_ids
        self._rollout_copy: Any = None
        self.regularizer = make_regularizer(config.regularizer, config.beta, config.alpha)
        #: the full-vocabulary penalty estimator (docs/method.md §8) instead of the sampled one
        self.full_penalty = config.penalty_estimator == "full"
        self.estimator = ADVANTAGE_ESTIMATORS[config.algo]
        # the full estimator's direct term, scaled like the estimator's policy gradient (§8)
        self._direct_scale = self.estimator.gradient_scale(
            AdvantageSettings(config.samples_per_prompt, config.gamma, config.lam)
        )
        self.timer = PhaseTimer(self.device)
        set_seed(config.seed)
        policy, critic = self._load_models(reward_fn)
        self._prepare(policy, critic)
        self.prompts = list(prompts) if prompts is not None else self._load_prompts()
        if not self.prompts:
            raise ValueError("no prompts to train on")
        self.step = 0

    # ------------------------------------------------------------------ set-up
    def _load_models(self, reward_fn: RewardCallable | None) -> tuple[Any, ValueModel | None]:
        """Load tokenizer, policy, reference (if the regulariser needs one), reward and critic.

        Returns the (unprepared) trained models: the policy, and the critic when the
        estimator needs one. The frozen ones are set on ``self``.
        """
        from pmrlhf import lora
        from pmrlhf.models import load_tokenizer

        c = self.config
        assert c.policy is not None  # RLConfig.validate
        self.tokenizer = load_tokenizer(c.policy, padding_side="left")
        policy = lora.load_policy_model(c.policy, dtype=torch.float32)
        policy.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.ref = None
        if self.regularizer.needs_ref:
            self.ref = lora.load_policy_model(
                c.ref or c.policy, dtype=self.dtype, device=self.device, trainable=False
            ).eval()
            self.ref.requires_grad_(False)
        if reward_fn is not None:
            self.reward_fn: RewardFn = CallableReward(reward_fn)
        else:
            assert c.reward  # checked in __init__
            self.reward_fn = load_reward(c.reward, self.device, self.dtype)
        critic = None
        if self.estimator.needs_critic:
            source = self._critic_source(reward_fn)
            critic = ValueModel(lora.load_scoring_model(source, dtype=torch.float32))
        return policy, critic

    def _critic_source(self, reward_fn: RewardCallable | None) -> str:
        """The model the critic starts from: the reward model (the paper) or the policy."""
        c = self.config
        assert c.policy is not None
        model_reward = c.reward is not None and is_model_reward(c.reward)
        init = c.critic_init
        if init == "auto":
            init = "reward" if model_reward and reward_fn is None else "policy"
        if init == "reward":
            if not model_reward:
                raise ValueError(
                    "config: critic_init 'reward' needs `reward` to be a reward-model folder; "
                    "use critic_init 'policy' or 'auto' with a reward function"
                )
            assert c.reward is not None
            return c.reward
        return c.policy

    def _optimizer_for(
        self, model: torch.nn.Module, lr: float
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over one trained model, and its lr schedule."""
        c = self.config
        optimizer = build_optimizer([(list(model.parameters()), lr)], c.weight_decay)
        scheduler = build_scheduler(optimizer, c.lr_schedule, c.max_steps, c.warmup_steps)
        return optimizer, scheduler

    def _prepare(self, policy: torch.nn.Module, critic: torch.nn.Module | None) -> None:
        """Hand each trained model, with its own optimizer and schedule, to accelerate.

        One model per ``prepare`` call and one optimizer per model: FSDP2 wraps only one model
        per call. The policy trains at ``lr``, the critic at ``critic_lr``; AdamW's update is
        per parameter, so two optimizers step exactly as one with two groups would.
        """
        acc = self.accelerator
        self.policy, self.optimizer, self.scheduler = acc.prepare(
            policy, *self._optimizer_for(policy, self.config.lr)
        )
        self.critic = self.critic_optimizer = self.critic_scheduler = None
        if critic is not None:
            self.critic, self.critic_optimizer, self.critic_scheduler = acc.prepare(
                critic, *self._optimizer_for(critic, self.config.critic_lr)
            )

    def _optimizers(self) -> list[Any]:
        return [o for o in (self.optimizer, self.critic_optimizer) if o is not None]

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

    # ------------------------------------------------------------------ sampling
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
            copy = lora.load_policy_model(
                self.config.policy, dtype=self.dtype, device=self.device, trainable=False
            )
            self._rollout_copy = copy.eval().requires_grad_(False)
        with torch.no_grad():
            targets = dict(self._rollout_copy.named_parameters())
            for name, param in policy.named_parameters():
                targets[name].copy_(param)
        return self._rollout_copy

    @property
    def _sharded_policy(self) -> bool:
        """Whether the processes hold the policy sharded (FSDP, ZeRO-3): every forward then
        gathers weights from all of them, so they must decode the same number of steps."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if self.accelerator.num_processes < 2:
            return False
        if kind == DistributedType.FSDP:
            return True
        plugin = self.accelerator.state.deepspeed_plugin
        return kind == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3

    @property
    def decoder(self) -> str:
        """The rollouts' decoder (:data:`pmrlhf.rl.rollout.DECODERS`), ``auto`` resolved."""
        return resolve_decoder(self.config.decoder, self.device)

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
            decoder=self.decoder,
            sharded=self._sharded_policy,
        )
        model.train(was_training)
        return rollout

    # ------------------------------------------------------------------ scoring
    @property
    def one_pass(self) -> bool:
        """One epoch over one minibatch: the policy that sampled is the one being updated."""
        return self.config.ppo_epochs == 1 and self.config.minibatches == 1

    def _forward(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        ref_logits: Tensor | None = None,
        with_entropy: bool = True,
        distinct: DistinctRows | None = None,
    ) -> PolicyForward:
        """Policy log-probs and entropies (and critic values), with the autograd graph.

        With ``penalty_estimator: full`` it also computes ``f(s_t)`` at every visited state from
        the same logits (and ``ref_logits``, the reference's at the same states, when the
        regulariser needs them), chunk by chunk over the sequence. Repeated rows are scored once
        (:meth:`_repeats`; ``distinct``: the batch's distinct rows when already known).
        """
        rows = self._repeats(sequences, attention_mask, distinct)
        if rows is not None:
            sequences, attention_mask = sequences[rows.index], attention_mask[rows.index]
            ref_logits = ref_logits[rows.index] if ref_logits is not None else None
        with self.timer.phase("policy_forward"):
            logits = response_logits(
                self.policy,
                sequences,
                attention_mask,
                prompt_length,
                allowed_token_ids=self.allowed_token_ids,
            )
            logp, entropy = logprobs_from_logits(
                logits, sequences, attention_mask, prompt_length, with_entropy=with_entropy
            )
            state_penalty = None
            if self.full_penalty:
                mask = attention_mask[:, prompt_length:]
                state_penalty = expected_penalties(self.regularizer, logits, ref_logits, mask)
            del logits
        values = None
        if self.critic is not None:
            with self.timer.phase("critic"):
                values = self.critic(sequences, attention_mask, prompt_length)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        forward = PolicyForward(logp, entropy, values, state_penalty)
        return forward if rows is None else forward.take(rows.inverse)

    def _repeats(
        self, sequences: Tensor, attention_mask: Tensor, distinct: DistinctRows | None = None
    ) -> DistinctRows | None:
        """The batch's distinct rows (``distinct`` when given, else found here) when some rows
        repeat and ``score_distinct_once`` is on; None when every row is scored as it is."""
        if not self.config.score_distinct_once:
            return None
        rows = distinct if distinct is not None else distinct_rows(sequences, attention_mask)
        return rows if rows.count < sequences.shape[0] else None

    def _reference_scores(
        self, seq: Tensor, attn: Tensor, P: int, distinct: DistinctRows
    ) -> tuple[Tensor, Tensor | None]:
        """The reference's log-probs of the response tokens, and with ``penalty_estimator:
        full`` its logits at every visited state (which ``f`` needs); repeats scored once."""
        rows = self._repeats(seq, attn, distinct)
        if rows is not None:
            seq, attn = seq[rows.index], attn[rows.index]
        ref_logits = None
        if self.full_penalty:
            ref_logits = response_logits(
                self.ref, seq, attn, P, self.allowed_token_ids, upcast=False
            )
            ref_logp = logprobs_from_logits(ref_logits, seq, attn, P)[0]
        else:
            ref_logp = token_logprobs(
                self.ref, seq, attn, P, allowed_token_ids=self.allowed_token_ids
            )[0]
        if rows is None:
            return ref_logp, ref_logits
        return rows.take(ref_logp), rows.take(ref_logits) if ref_logits is not None else None

    def _score_with_rollout_policy(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        ref_logits: Tensor | None,
        distinct: DistinctRows,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, PolicyForward | None]:
        """Old log-probs and values: the sampling policy's scores of its own samples.

        This is the one place of the one-pass shortcut. With one epoch over one minibatch
        (:attr:`one_pass`), the old policy *is* the current one, so the forward that
        :meth:`update` needs for the gradient runs here, with its graph, and its detached
        outputs are the old log-probs and values: one policy forward per step, not two. It is
        returned so that the experience carries it to :meth:`update`. Otherwise a separate
        no-grad forward scores the batch and nothing is carried.

        Returns ``(old_logp, old_values, old_state_penalty, forward)``; the third is ``f(s_t)``
        under the sampling policy with ``penalty_estimator: full``, else None.
        """
        if self.one_pass:
            forward = self._forward(
                sequences, attention_mask, prompt_length, ref_logits, distinct=distinct
            )
            values = forward.values.detach() if forward.values is not None else None
            state_penalty = forward.state_penalty
            old_f = state_penalty.detach() if state_penalty is not None else None
            return forward.logp.detach(), values, old_f, forward
        with torch.no_grad():
            forward = self._forward(sequences, attention_mask, prompt_length, ref_logits,
                                    with_entropy=False, distinct=distinct)  # fmt: skip
        return forward.logp, forward.values, forward.state_penalty, None

    def make_experience(self, prompts: list[str]) -> Experience:
        """Sample responses to ``prompts`` and score them: rewards, log-probs, advantages.

        The shaped per-token rewards are the regulariser's ``−β p_t`` plus the sequence reward
        at the last response token, computed from the detached log-probs of the sampling policy
        (the sampled estimator of docs/method.md §5). With ``penalty_estimator: full`` they are
        ``−β f(s_{t+1})``, the expected penalty of the state each action leads to, plus the
        sequence reward (docs/method.md §8). The configured estimator turns them into advantages.
        """
        c = self.config
        with self.timer.phase("generate"):
            rollout = self._rollout(prompts)
        seq, attn, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        mask = rollout.response_mask.float()
        # found once: the metrics count them, and the scoring below runs on them
        distinct = distinct_rows(seq, attn)
        with torch.no_grad():
            with self.timer.phase("reward"):
                raw_reward = self.reward_fn(rollout.prompts, rollout.responses)
                raw_reward = raw_reward.to(self.device).float()
                reward = (
                    raw_reward
                    if c.reward_clip is None
                    else raw_reward.clamp(-c.reward_clip, c.reward_clip)
                )
            ref_logp = ref_logits = None
            if self.ref is not None:
                with self.timer.phase("reference"):
                    ref_logp, ref_logits = self._reference_scores(seq, attn, P, distinct)
        old_logp, old_values, old_f, first_forward = self._score_with_rollout_policy(
            seq, attn, P, ref_logits, distinct
        )
        with torch.no_grad():
            penalty = self.regularizer.penalty(old_logp, ref_logp, mask)
            if old_f is not None:
                shaped = penalty_to_go_rewards(old_f, mask, self.regularizer.beta)
            else:
                shaped = self.regularizer.token_rewards(old_logp, ref_logp, mask)
            token_rewards = add_sequence_reward(shaped, reward, mask)
            settings = AdvantageSettings(c.samples_per_prompt, c.gamma, c.lam)
            advantages, returns = self.estimator(token_rewards, mask, old_values, settings)
            if c.normalize_advantages:
                advantages = whiten(advantages, mask)
        return Experience(
            prompts=list(rollout.prompts),
            sequences=seq,
            attention_mask=attn,
            prompt_length=P,
            mask=mask,
            raw_reward=raw_reward,
            reward=reward,
            ref_logp=ref_logp,
            old_logp=old_logp,
            old_values=old_values,
            penalty=penalty,
            advantages=advantages,
            returns=returns,
            state_penalty=old_f,
            # kept only when a later minibatch forward has to recompute f with its graph
            ref_logits=ref_logits if first_forward is None else None,
            first_forward=first_forward,
            distinct_sequences=distinct.count,
        )

    # ------------------------------------------------------------------ learning
    def _minibatch_forward(self, experience: Experience, idx: Tensor) -> PolicyForward:
        """The forward of one minibatch: the carried one in one-pass mode, else a fresh one."""
        if experience.first_forward is not None:  # see _score_with_rollout_policy
            forward, experience.first_forward = experience.first_forward, None
            return forward
        ref_logits = experience.ref_logits
        return self._forward(
            experience.sequences[idx],
            experience.attention_mask[idx],
            experience.prompt_length,
            ref_logits[idx] if ref_logits is not None else None,
        )

    def update(self, experience: Experience) -> dict[str, float]:
        """Epochs × minibatches of clipped policy (and value) losses, each followed by a
        gradient step; then one step of the lr schedule. Returns the mean losses."""
        c = self.config
        n = experience.sequences.shape[0]
        stats: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clip_fraction": [],
            "entropy": [],
        }
        for _epoch in range(c.ppo_epochs):
            order = torch.randperm(n) if c.minibatches > 1 else torch.arange(n)
            for chunk in order.chunk(c.minibatches):
                idx = chunk.to(experience.sequences.device)
                forward = self._minibatch_forward(experience, idx)
                m = experience.mask[idx]
                policy_loss, clip_fraction = clipped_policy_loss(
                    forward.logp,
                    experience.old_logp[idx],
                    experience.advantages[idx],
                    m,
                    c.clip,
                    c.loss_aggregation,
                )
                loss = policy_loss
                if forward.state_penalty is not None:
                    # the direct term of the full estimator: the exact gradient of f at each
                    # visited state, outside the ratio clip (docs/method.md §8)
                    loss = loss + self._direct_scale * expected_penalty_loss(
                        forward.state_penalty, m, self.regularizer.beta, c.loss_aggregation
                    )
                if forward.values is not None:
                    value_loss = self._value_loss(forward.values, experience, idx)
                    loss = loss + c.value_coef * value_loss
                    stats["value_loss"].append(float(value_loss.detach()))
                self._check_finite("loss", loss)
                with self.timer.phase("backward"):
                    self.accelerator.backward(loss)
                with self.timer.phase("optimizer"):
                    # clip to max_grad_norm, or only measure the norm (a clip at inf scales by 1)
                    limit = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
                    norm = self.accelerator.clip_grad_norm_(self._trainable_parameters(), limit)
                    if norm is not None:
                        self._check_finite("gradient norm", norm)
                    for optimizer in self._optimizers():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["entropy"].append(float(aggregate(forward.entropy, m, "token-mean")))
        with self.timer.phase("optimizer"):
            self.scheduler.step()
            if self.critic_scheduler is not None:
                self.critic_scheduler.step()
        return {key: _mean(values) for key, values in stats.items() if values}

    def _check_finite(self, what: str, value: Tensor) -> None:
        """Stop before a non-finite loss or gradient reaches the weights (nothing is saved)."""
        if bool(torch.isfinite(value.detach()).all()):
            return
        kept = Path(self.config.output_dir) / CHECKPOINT_DIR
        saved = (
            f"the last checkpoint, {kept}, is kept"
            if kept.is_dir()
            else "no checkpoint had been saved (save_every writes one)"
        )
        raise NonFiniteError(
            f"training stopped in step {self.step + 1}: the {what} is {float(value.detach())}; "
            f"that update was not applied and nothing was saved, {saved}. Check the reward's "
            f"scale, or try a lower lr (now {self.config.lr:g})"
        )

    def _value_loss(self, values: Tensor, experience: Experience, idx: Tensor) -> Tensor:
        if experience.old_values is None or experience.returns is None:
            raise ValueError(f"the {self.config.algo!r} estimator gave no value targets")
        return clipped_value_loss(
            values,
            experience.old_values[idx],
            experience.returns[idx],
            experience.mask[idx],
            self.config.value_clip,
        )

    def train_step(self) -> dict[str, float]:
        """One RL step: this step's prompts ─> :meth:`make_experience` ─> :meth:`update`."""
        watch = Stopwatch()
        self.timer.reset()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        experience = self.make_experience(self._step_prompts())
        stats = self.update(experience)
        self.step += 1
        seconds = watch.seconds()
        mask, old_logp = experience.mask, experience.old_logp
        metrics: dict[str, float] = {
            "step": self.step,
            "reward_mean": float(experience.raw_reward.mean()),
            "penalty_mean": float(experience.penalty.sum(-1).mean()),
            "logp_mean": float((old_logp * mask).sum(-1).mean()),
            "entropy": stats["entropy"],
            "response_length": float(mask.sum(-1).mean()),
            # share of the step's samples that are distinct (prompt, response) pairs: falls as
            # the policy concentrates, and bounds the work scoring each of them once saves
            "distinct_responses": experience.distinct_sequences / experience.sequences.shape[0],
            "clip_fraction": stats["clip_fraction"],
            "policy_loss": stats["policy_loss"],
            "lr": float(self.scheduler.get_last_lr()[0]),
            "step_seconds": seconds,
            "samples_per_second": experience.sequences.shape[0] / seconds,
        }
        if experience.state_penalty is not None:
            expected = (experience.state_penalty * mask).sum(-1).mean()
            metrics["expected_penalty_mean"] = float(expected)
        if experience.ref_logp is not None:
            kl = ((old_logp - experience.ref_logp) * mask).sum(-1).mean()
            metrics["kl_to_ref"] = float(kl)
        if "value_loss" in stats:
            metrics["value_loss"] = stats["value_loss"]
        for phase in PHASES:
            if phase in self.timer.seconds:
                metrics[f"time_{phase}"] = self.timer.seconds[phase]
        if cuda:  # the step's high-water mark of allocated GPU memory, in GiB
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return self._gather(metrics)

    def _trainable_parameters(self) -> list[Tensor]:
        models = [self.policy] if self.critic is None else [self.policy, self.critic]
        return [p for model in models for p in model.parameters() if p.requires_grad]

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
        check_finite_weights(acc, self.policy, f"the checkpoint at step {self.step}")
        if self.critic is not None:
            check_finite_weights(acc, self.critic, f"the critic at step {self.step}")
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
        # every process takes part in gathering the weights (sharded under FSDP / ZeRO-3)
        policy_state = acc.get_state_dict(self.policy)
        if acc.is_main_process:
            acc.unwrap_model(self.policy).save_pretrained(tmp / "policy", state_dict=policy_state)
            self.tokenizer.save_pretrained(tmp / "policy")
            (tmp / STATE_FILE).write_text(
                json.dumps(
                    {
                        "step": self.step,
                        "processes": acc.num_processes,
                        "config": asdict(self.config),
                    },
                    indent=2,
                )
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            commit_directory(tmp, final)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: str | Path, allow_config_change: bool = False) -> None:
        """Restore a checkpoint of a run with the same settings (see :func:`check_resume_settings`).

        A checkpoint whose save was cut short between its renames is recovered first. Missing
        random-number states are an error, not a silent change of the run.
        """
        directory = Path(directory)
        where = f"--resume {directory}"
        if self.accelerator.is_main_process:
            recover_directory(directory)
        self.accelerator.wait_for_everyone()
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{where}: not a pmrlhf RL checkpoint (no {STATE_FILE})")
        try:
            state = json.loads(state_file.read_text())
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: cannot read {STATE_FILE}: {err}") from None
        processes = state.get("processes", 1)
        if processes != self.accelerator.num_processes:
            raise ValueError(
                f"{where}: written by {processes} process(es), resumed on "
                f"{self.accelerator.num_processes}; use the same number"
            )
        for rank in range(self.accelerator.num_processes):
            if not (directory / f"random_states_{rank}.pkl").is_file():
                raise ValueError(
                    f"{where}: incomplete checkpoint, random_states_{rank}.pkl is missing, so "
                    "the run could not continue exactly"
                )
        check_resume_settings(
            state.get("config", {}),
            asdict(self.config),
            ignore=RESUMABLE_CHANGES | run_length_settings(self.config.lr_schedule),
            where=where,
            allow_changes=allow_config_change,
        )
        self.accelerator.load_state(str(directory))
        self.step = step

    def save_policy(self, directory: str | Path) -> None:
        check_finite_weights(self.accelerator, self.policy, f"the policy {directory}")
        state = self.accelerator.get_state_dict(self.policy)  # on every process, see above
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                self.accelerator.unwrap_model(self.policy).save_pretrained(tmp, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def train(
        self,
        resume: str | Path | None = None,
        print_summary: bool = True,
        allow_config_change: bool = False,
        on_step: Callable[[RLTrainer, dict[str, float]], None] | None = None,
    ) -> dict[str, Any]:
        """Run to ``max_steps``; ``resume`` continues exactly from a checkpoint folder.

        The output folder is locked for the run, and a folder that holds another run is refused
        unless ``resume`` or the ``overwrite`` setting is given. ``on_step(trainer, metrics)``
        is called after every step (the bandit records its distance to the optimum with it).
        """
        c = self.config
        claim = claim_output_dir_on_main(
            self.accelerator,
            c.output_dir,
            overwrite=c.overwrite,
            resume=resume is not None,
            command="pmrlhf rl",
        )
        try:
            if resume is not None:
                self.load_checkpoint(resume, allow_config_change)
            return self._train(
                resumed=resume is not None, print_summary=print_summary, on_step=on_step
            )
        finally:
            if claim is not None:
                claim.release()

    def _train(
        self,
        resumed: bool,
        print_summary: bool,
        on_step: Callable[[RLTrainer, dict[str, float]], None] | None = None,
    ) -> dict[str, Any]:
        from tqdm.auto import tqdm

        c = self.config
        out = Path(c.output_dir)
        main = self.accelerator.is_main_process
        logger = JsonlLogger(
            out / "metrics.jsonl" if main else None, resume_step=self.step if resumed else None
        )
        board = _tensorboard(out) if (c.tensorboard and main) else None
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            desc=f"rl {c.algo}/{c.regularizer}",
            disable=c.quiet or not main,
        )
        history: list[dict[str, float]] = []
        watch = Stopwatch()
        while self.step < c.max_steps:
            metrics = self.train_step()
            history.append(metrics)
            logger.log(metrics)
            if on_step is not None:
                on_step(self, metrics)
            if board is not None:
                for key, value in metrics.items():
                    board.add_scalar(f"rl/{key}", value, self.step)
            bar.update(1)
            bar.set_postfix(phase_postfix(metrics))
            if c.save_every and self.step % c.save_every == 0 and self.step < c.max_steps:
                self.save_checkpoint()
        bar.close()
        logger.close()
        if board is not None:
            board.close()
        if c.keep_checkpoint:
            self.save_checkpoint()
        self.save_policy(out / "policy")
        if not c.keep_checkpoint and main:  # one a save_every step left behind
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        if main:  # the run's settings beside its policy, as sft and rm leave them
            import yaml

            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
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
