"""The training vocabulary shared by ``pmrlhf sft``, ``pmrlhf rm`` and ``pmrlhf rl``.

One set of field names for the same settings (:class:`OptimConfig`), one AdamW builder that
never decays biases and norm scales (:func:`build_optimizer`), one learning-rate schedule
(:func:`lr_factor`) and one precision helper (:func:`mixed_precision`, :func:`compute_dtype`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pmrlhf.config import option

__all__ = [
    "DTYPES",
    "LR_SCHEDULES",
    "OptimConfig",
    "build_optimizer",
    "build_scheduler",
    "compute_dtype",
    "lr_factor",
    "mixed_precision",
]

LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    """Optimisation settings, named the same way in every training command."""

    lr: float = option(1e-5, help="peak learning rate of AdamW")
    weight_decay: float = option(
        0.0, help="AdamW weight decay on weight matrices (biases and norm scales never decay)"
    )
    lr_schedule: str = option(
        "constant", choices=list(LR_SCHEDULES), help="learning-rate schedule after warm-up"
    )
    warmup_steps: int = option(0, help="optimizer steps of linear learning-rate warm-up from 0")
    max_grad_norm: float = option(1.0, help="clip gradients to this norm (0 disables clipping)")
    seed: int = option(0, help="random seed")
    dtype: str = option(
        "auto",
        choices=list(DTYPES),
        help="compute precision: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16 "
        "or fp16; bf16/fp16 run mixed precision, with trained weights and optimizer state in fp32",
    )


def _decays(param: torch.Tensor) -> bool:
    # Weight matrices (and embeddings) decay; biases and norm scales, which are vectors, do not.
    return param.ndim >= 2


def build_optimizer(
    groups: Iterable[tuple[Iterable[torch.nn.Parameter], float]], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over ``(parameters, lr)`` groups; only trainable parameters are included.

    Each group is split into a decayed part (matrices) and an undecayed part (vectors).
    """
    param_groups: list[dict] = []
    for params, lr in groups:
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if _decays(p)]
        no_decay = [p for p in trainable if not _decays(p)]
        for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if members:
                param_groups.append({"params": members, "lr": lr, "weight_decay": wd})
    if not param_groups:
        raise ValueError("no trainable parameters: nothing for the optimizer to update")
    return torch.optim.AdamW(param_groups)


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimizer step (0-based)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_factor`; stepped once per optimizer update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, total_steps, warmup_steps)
    )


def mixed_precision(dtype: str) -> str:
    """Accelerate's ``mixed_precision`` value ('no', 'bf16', 'fp16') for a ``dtype`` option."""
    if dtype == "fp32":
        return "no"
    if dtype in ("bf16", "fp16"):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:  # `accelerate launch --mixed_precision X` decides
        return launched
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def compute_dtype(dtype: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype that frozen models are held in and autocast computes in.

    ``dtype`` is a ``dtype`` option value or an accelerate ``mixed_precision`` value. ``auto``
    resolves as :func:`mixed_precision` does, except that a ``device`` other than CUDA is fp32.
    """
    if dtype == "auto" and device is not None and torch.device(device).type != "cuda":
        return torch.float32
    precision = dtype if dtype == "no" else mixed_precision(dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
