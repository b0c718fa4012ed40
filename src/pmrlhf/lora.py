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
    "load_policy_model",
    "load_scoring_model",
    "parse_target_modules",
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
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """A causal LM from a model folder, hub id, ``.gguf`` file or LoRA adapter folder."""
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_causal_lm(adapter_base(path), dtype=dtype, device=device)
        return PeftModel.from_pretrained(base, str(path)).to(device)
    return load_causal_lm(str(path), dtype=dtype, device=device)


def load_scoring_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """A scalar reward model from a model folder, hub id or LoRA adapter folder."""
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_reward_model(adapter_base(path), dtype=dtype, device=device)
        return PeftModel.from_pretrained(base, str(path)).to(device)
    return load_reward_model(str(path), dtype=dtype, device=device)
