"""PM, cPM and KL as a TRL reward function, for ``RLOOTrainer`` and ``GRPOTrainer``.

The plug-in returns ``−β Σ_t p_t`` for each completion, with ``p_t`` from
:mod:`pmrlhf.regularizers`; TRL then runs with its own ``beta=0.0``::

    from pmrlhf.integrations.trl import PenaltyReward

    penalty = PenaltyReward(regularizer="cpm", beta=1.0, alpha=0.1, ref_model=ref)
    trainer = RLOOTrainer(model=policy, reward_funcs=[task_reward, penalty],
                          args=RLOOConfig(beta=0.0, ...), train_dataset=prompts)
    penalty.bind(trainer)   # TRL does not hand the models to reward functions
    trainer.train()

The log-probabilities are the ones TRL computes for its own KL term: the trainer's
``_get_per_token_logps_and_entropies`` on the prompt tokenised by the trainer's
``_tokenize_prompts``, padded as TRL pads (prompt on the left, completion on the right,
``pad_to_multiple_of``), the same completion mask (tokens up to the first EOS, truncated
completions dropped under ``mask_truncated_completions``), the same temperature division and
autocast, under ``torch.no_grad``. A separate reference model is given TRL's fused LM head and
prepared exactly as TRL prepares its own reference (DeepSpeed, FSDP or a plain accelerate
evaluation model); with a PEFT policy and no ``ref_model``, the reference is the policy with its
adapter disabled (or the adapter named ``"ref"`` if there is one), as in TRL.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from pmrlhf.integrations._common import build_regularizer
from pmrlhf.regularizers import Regularizer
from pmrlhf.rl.config import PMSafetyWarning

__all__ = ["SUPPORTED_TRL", "PenaltyReward", "pm_risks"]

# The TRL versions this module is tested against (oldest, newest); see docs/integrations.md.
SUPPORTED_TRL = ("1.5.0", "1.16.0")

# Private trainer attributes the plug-in reads; checked in `bind` so a TRL change fails loudly.
_TRAINER_NAMES = (
    "_get_per_token_logps_and_entropies",
    "_tokenize_prompts",
    "_tokenizer",
    "pad_to_multiple_of",
    "mask_truncated_completions",
    "temperature",
    "accelerator",
    "reward_funcs",
    "reward_weights",
)


def _trl_version() -> str:
    import trl

    return str(trl.__version__)


def _check_trl_version() -> None:
    from packaging.version import Version

    version = Version(_trl_version())
    oldest, newest = (Version(v) for v in SUPPORTED_TRL)
    if not (oldest <= version and version.major == newest.major):
        raise ImportError(
            f"pmrlhf.integrations.trl supports trl {SUPPORTED_TRL[0]} to {newest.major}.x "
            f"(tested: {SUPPORTED_TRL[0]}..{SUPPORTED_TRL[1]}); installed: trl {version}"
        )


def pm_risks(trainer: Any, penalty: PenaltyReward | None = None) -> list[str]:
    """Trainer settings that move the regularised optimum away from its closed form."""
    args = trainer.args
    risks = []
    if getattr(args, "temperature", 1.0) != 1.0:
        risks.append(
            f"temperature={args.temperature}: completions are sampled from, and log-probs taken "
            "under, the tempered policy, so the target is reached by π^(1/T), not π"
        )
    if (getattr(args, "top_p", None) or 1.0) < 1.0:
        risks.append(f"top_p={args.top_p} < 1 truncates sampling; log-probs use the full softmax")
    if (getattr(args, "top_k", None) or 0) > 0:
        risks.append(f"top_k={args.top_k} > 0 truncates sampling; log-probs use the full softmax")
    if (getattr(args, "min_p", None) or 0.0) > 0.0:
        risks.append(f"min_p={args.min_p} > 0 truncates sampling; log-probs use the full softmax")
    if (getattr(args, "repetition_penalty", None) or 1.0) != 1.0:
        risks.append(
            f"repetition_penalty={args.repetition_penalty} changes the sampling distribution"
        )
    scale = getattr(args, "scale_rewards", "none")
    if scale not in ("none", False, None):
        risks.append(
            f'scale_rewards={scale!r}: dividing by a reward std rescales β per group or batch; use "none"'
        )
    if getattr(args, "multi_objective_aggregation", None) == "normalize_then_sum":
        risks.append(
            'multi_objective_aggregation="normalize_then_sum" normalises the penalty separately '
            'from the task reward; use "sum_then_normalize"'
        )
    if getattr(args, "reward_clip_range", None):
        risks.append(f"reward_clip_range={args.reward_clip_range} clips the penalised reward")
    if getattr(trainer, "beta", getattr(args, "beta", 0.0)) not in (0, 0.0, None):
        risks.append(
            f"the trainer's own beta={trainer.beta} adds TRL's KL term on top of the plug-in's "
            "penalty; set beta=0.0"
        )
    if penalty is not None and penalty in list(trainer.reward_funcs):
        index = list(trainer.reward_funcs).index(penalty)
        weight = float(trainer.reward_weights[index])
        if weight != 1.0:
            risks.append(
                f"reward_weights[{index}]={weight} scales the penalty: the effective β is "
                f"{weight * penalty.regularizer.beta}"
            )
    return risks


class PenaltyReward:
    """A TRL reward function returning ``−β Σ_t p_t`` per completion (see the module docstring).

    ``regularizer`` is a name registered in :data:`pmrlhf.regularizers.REGULARIZERS` (``kl``,
    ``pm``, ``cpm``, or one of your own) or a built :class:`~pmrlhf.regularizers.Regularizer`.
    ``ref_model`` is needed by regularisers that read the reference (``kl``, ``cpm``) unless the
    policy is a PEFT model, whose disabled adapter then serves as the reference.

    After each call, ``last_penalty`` holds the per-completion ``Σ_t p_t`` (a CPU tensor).
    """

    def __init__(
        self,
        regularizer: str | Regularizer = "cpm",
        beta: float = 1.0,
        alpha: float | None = None,
        ref_model: Any = None,
    ) -> None:
        self.regularizer = build_regularizer(regularizer, beta, alpha)
        self.ref_model = ref_model
        self.trainer: Any = None
        self._use_adapter = False
        self.last_penalty: Tensor | None = None
        self.__name__ = f"{self.regularizer.name}_penalty"  # TRL's column name for this reward

    # -- binding ---------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The bound trainer's policy (as the trainer holds it)."""
        return self._bound().model

    @property
    def processing_class(self) -> Any:
        return self._bound().processing_class

    @property
    def accelerator(self) -> Any:
        return self._bound().accelerator

    @property
    def args(self) -> Any:
        return self._bound().args

    def _bound(self) -> Any:
        if self.trainer is None:
            raise RuntimeError(
                "PenaltyReward is not bound: call penalty.bind(trainer) after building the trainer"
            )
        return self.trainer

    def bind(self, trainer: Any) -> PenaltyReward:
        """Attach the trainer: its policy, processing class, accelerator and arguments."""
        _check_trl_version()
        missing = [name for name in _TRAINER_NAMES if not hasattr(trainer, name)]
        if missing:
            raise TypeError(
                f"{type(trainer).__name__} lacks {missing}: PenaltyReward works with TRL's "
                f"RLOOTrainer and GRPOTrainer (trl {SUPPORTED_TRL[0]}..{SUPPORTED_TRL[1]})"
            )
        if self not in list(trainer.reward_funcs):
            raise ValueError(
                "this PenaltyReward is not among the trainer's reward_funcs; pass it in "
                "reward_funcs=[task_reward, penalty] before calling bind"
            )
        for feature in ("tools", "rollout_func", "environment_factories"):
            if getattr(trainer, feature, None):
                raise ValueError(
                    f"PenaltyReward does not support a trainer with {feature}: the tokens it adds "
                    "to a completion are not the policy's samples"
                )
        for risk in pm_risks(trainer, self):
            warnings.warn(
                f"{self.regularizer.name} target at risk: {risk}", PMSafetyWarning, stacklevel=2
            )
        use_adapter = False
        if self.regularizer.needs_ref:
            if self.ref_model is None:
                from accelerate.utils import is_peft_model

                if not is_peft_model(trainer.model):
                    raise ValueError(
                        f"the {self.regularizer.name!r} regulariser needs a reference: pass "
                        "ref_model=..., or train a PEFT adapter (its disabled adapter is the reference)"
                    )
                use_adapter = True
            else:
                self.ref_model = self._prepare_reference(trainer, self.ref_model)
        self._use_adapter = use_adapter
        self.trainer = trainer
        return self

    @staticmethod
    def _prepare_reference(trainer: Any, ref: Any) -> Any:
        """Give ``ref`` TRL's fused LM head and wrap it as TRL wraps its own reference."""
        import trl.trainer.utils as trl_utils
        from trl.models import prepare_deepspeed, prepare_fsdp

        if getattr(ref, "_pmrlhf_prepared", False):
            return ref
        if getattr(trainer.args, "disable_dropout", False):
            trl_utils.disable_dropout_in_model(ref)
        # trl >= 1.15 scores tokens through a fused LM head that also divides by the temperature;
        # older versions divide the logits inside `_get_per_token_logps_and_entropies`.
        add_fused_lm_head = getattr(trl_utils, "add_fused_lm_head", None)
        if add_fused_lm_head is not None:
            kwargs: dict[str, Any] = {"temperature": trainer.temperature}
            cast = getattr(trainer.args, "cast_lm_head_to_fp32", None)
            if cast and "cast_lm_head_to_fp32" in inspect.signature(add_fused_lm_head).parameters:
                kwargs["cast_lm_head_to_fp32"] = cast
            add_fused_lm_head(ref, **kwargs)
        if trainer.is_deepspeed_enabled:
            ref = prepare_deepspeed(ref, trainer.accelerator)
        elif trainer.is_fsdp_enabled:
            ref = prepare_fsdp(ref, trainer.accelerator)
        else:
            ref = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
        ref._pmrlhf_prepared = True
        return ref

    # -- the reward function ---------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        **kwargs: Any,
    ) -> list[float]:
        self._bound()
        if kwargs.get("images") is not None or kwargs.get("image") is not None:
            raise ValueError("PenaltyReward does not support multimodal prompts")
        input_ids, attention_mask, completion_mask = self._batch(prompts, completion_ids)
        logp, ref_logp = self._logps(input_ids, attention_mask, completion_mask.size(1))
        reg = self.regularizer
        mask = completion_mask.bool()
        rewards = reg.token_rewards(
            logp.float(), None if ref_logp is None else ref_logp.float(), mask
        )
        self.last_penalty = (
            reg.penalty(logp.float(), None if ref_logp is None else ref_logp.float(), mask)
            .sum(-1)
            .cpu()
        )
        return rewards.sum(-1).tolist()

    def _batch(
        self, prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt + completion ids, attention mask and completion mask, built as TRL builds them."""
        from trl.trainer.utils import pad

        trainer = self.trainer
        device = trainer.accelerator.device
        prompt_ids, images, multimodal = trainer._tokenize_prompts(copy.deepcopy(list(prompts)))
        if images is not None or multimodal:
            raise ValueError("PenaltyReward does not support multimodal prompts")
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(
                f"{len(prompt_ids)} prompts but {len(completion_ids)} completions were passed"
            )
        pad_id = trainer._tokenizer.pad_token_id
        multiple = trainer.pad_to_multiple_of

        def padded(rows: Sequence[Sequence[int]], value: int, side: str) -> Tensor:
            tensors = [torch.tensor(list(ids), dtype=torch.long) for ids in rows]
            return pad(tensors, padding_value=value, padding_side=side, pad_to_multiple_of=multiple)

        ones = [[1] * len(ids) for ids in prompt_ids]
        prompt = padded(prompt_ids, pad_id, "left")
        prompt_mask = padded(ones, 0, "left")
        completion = padded(completion_ids, pad_id, "right")
        completion_mask = padded([[1] * len(ids) for ids in completion_ids], 0, "right")
        if trainer.mask_truncated_completions:
            eos = getattr(trainer, "eos_token_ids", None) or [trainer._tokenizer.eos_token_id]
            ends = [*eos, pad_id]
            truncated = torch.tensor(
                [len(ids) == 0 or ids[-1] not in ends for ids in completion_ids]
            )
            completion_mask = completion_mask * (~truncated).unsqueeze(1).long()
        input_ids = torch.cat([prompt, completion], dim=1).to(device)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
        return input_ids, attention_mask, completion_mask.to(device)

    @torch.no_grad()
    def _logps(
        self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int
    ) -> tuple[Tensor, Tensor | None]:
        from trl.models.utils import disable_gradient_checkpointing

        trainer = self.trainer
        args = trainer.args
        training = trainer.model.training
        batch_size = (
            args.per_device_train_batch_size if training else args.per_device_eval_batch_size
        )

        def logps(model: Any) -> Tensor:
            return trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size
            )[0]

        with disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
            logp = logps(trainer.model)
            ref_logp = None
            if self.regularizer.needs_ref:
                if self._use_adapter:
                    ref_logp = self._adapter_logps(logps)
                else:
                    ref_logp = logps(self.ref_model)
        return logp, ref_logp

    def _adapter_logps(self, logps: Any) -> Tensor:
        from trl.trainer.utils import use_adapter

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        name = "ref" if "ref" in getattr(model, "peft_config", {}) else None
        context = use_adapter(model, adapter_name=name) if model is not None else nullcontext()
        with context:
            return logps(trainer.model)
