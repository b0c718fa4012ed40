"""LoRA through ``peft``: wrapping a model for training and loading saved adapters.

A LoRA run saves only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
which records the base model it was trained on. The loaders here take either a full model
folder or an adapter folder, so the rest of the library can accept both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pmrlhf.models import load_causal_lm, load_reward_model

__all__ = [
    "adapter_base",
    "apply_lora",
    "is_adapter_dir",
    "is_peft_model",
    "load_policy_model",
    "load_scoring_model",
    "parse_target_modules",
    "unwrap_peft",
]

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def parse_target_modules(text: str) -> str | list[str]:
    """``all-linear`` (every linear layer but the output head) or a comma list of names."""
    text = text.strip()
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("lora_target_modules: give 'all-linear' or comma-separated module names")
    return names


def apply_lora(
    model: Any,
    task: str,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str = "all-linear",
) -> Any:
    """Wrap ``model`` in a peft LoRA model; only the adapter (and a reward head) train.

    ``task`` is ``causal_lm`` or ``seq_cls``; for ``seq_cls`` peft also trains and saves the
    freshly initialised scalar head, which the base checkpoint does not have.
    """
    from peft import LoraConfig, get_peft_model

    if task not in _TASK_TYPES:
        raise ValueError(f"task must be one of {list(_TASK_TYPES)}, got {task!r}")
    if r <= 0:
        raise ValueError(f"lora_r must be > 0, got {r}")
    config = LoraConfig(
        task_type=_TASK_TYPES[task],
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
    )
    return get_peft_model(model, config)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}: adapter_config.json does not name its base model")
    return str(base)


def load_policy_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trainable: bool = True,
) -> Any:
    """A causal LM from a model folder, hub id, ``.gguf`` file or LoRA adapter folder.

    ``trainable`` says whether the model is to be trained: for an adapter folder the adapter's
    weights then require gradients (the base weights never do); for a full model all weights
    do. Frozen copies (a reference, a rollout copy) pass ``trainable=False``. The model comes
    back in eval mode either way, so that LoRA dropout never perturbs the log-probabilities
    the trainers score, whatever the adapter was saved with.
    """
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_causal_lm(adapter_base(path), dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable).to(device)
    else:
        model = load_causal_lm(str(path), dtype=dtype, device=device)
        model.requires_grad_(trainable)
    return model.eval()


def load_scoring_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trainable: bool = False,
) -> Any:
    """A scalar reward model from a model folder, hub id or LoRA adapter folder.

    Frozen by default (it scores); ``trainable=True`` makes the adapter and its scalar head
    (or, for a full model, every weight) require gradients. A causal-LM adapter (a LoRA policy
    used as the critic's start) loads onto the classification model with a fresh head.
    """
    if is_adapter_dir(path):
        from peft import PeftConfig, PeftModel

        base = load_reward_model(adapter_base(path), dtype=dtype, device=device)
        config = PeftConfig.from_pretrained(str(path))
        if config.task_type != _TASK_TYPES["seq_cls"]:
            # not a reward adapter: a generic wrapper, which leaves the classification head be
            config.task_type = None
        model = PeftModel.from_pretrained(
            base, str(path), config=config, is_trainable=trainable
        ).to(device)
    else:
        model = load_reward_model(str(path), dtype=dtype, device=device)
        model.requires_grad_(trainable)
    return model.eval()


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is wrapped by peft (an adapter on top of frozen base weights)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap_peft(model: Any) -> Any:
    """The transformers model under a peft wrapper (its LoRA layers are injected in place)."""
    return model.get_base_model() if is_peft_model(model) else model
