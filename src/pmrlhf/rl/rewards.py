"""Sequence rewards for RL: a reward-model folder or a plain Python callable."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

RewardFn = Callable[[Sequence[str], Sequence[str]], Tensor]


def load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"reward callable must look like 'module:function', got {spec!r}")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward module file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no callable named {function_name!r}")
    return function


def is_model_reward(spec: str) -> bool:
    return Path(spec).is_dir() or (":" not in spec and not spec.endswith(".py"))


class CallableReward:
    """Wraps ``fn(prompts, completions) -> floats`` and checks what it returns."""

    def __init__(self, fn: Callable, name: str = "reward"):
        self.fn = fn
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        values = self.fn(list(prompts), list(completions))
        out = torch.as_tensor(values, dtype=torch.float32).flatten()
        if out.numel() != len(completions):
            raise ValueError(
                f"{self.name} returned {out.numel()} rewards for {len(completions)} completions"
            )
        if not torch.isfinite(out).all():
            raise ValueError(f"{self.name} returned a non-finite reward")
        return out


class ModelReward:
    """A scalar reward model (``AutoModelForSequenceClassification``, one label), no grad."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        from pmrlhf.lora import load_scoring_model
        from pmrlhf.models import load_tokenizer

        self.model = load_scoring_model(path, dtype=dtype, device=device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        from pmrlhf.score import score_texts

        return (
            score_texts(
                self.model,
                self.tokenizer,
                list(prompts),
                list(completions),
                batch_size=self.batch_size,
            )
            .float()
            .cpu()
        )


def load_reward(spec: str, device: torch.device, dtype: torch.dtype) -> RewardFn:
    if is_model_reward(spec):
        return ModelReward(spec, device, dtype)
    return CallableReward(load_callable(spec), name=spec)
