"""What the SFT and reward-model trainers share: the common config fields and the loop.

The loop runs under ``accelerate``: model, optimizer and data loader go through
``accelerator.prepare``, gradients through ``accelerator.backward`` and ``accumulate``, and
metrics through ``reduce``/``gather``, so ``accelerate launch`` (DDP, FSDP, DeepSpeed) works
without changes and a plain call runs on one process. The learning-rate schedule is stepped
here once per optimizer update rather than prepared, so its length is simply the number of
updates each process makes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmrlhf.config import option, to_dict
from pmrlhf.runtime import JsonlLogger, atomic_directory

__all__ = [
    "TrainConfig",
    "TrainData",
    "adapt_model",
    "check_config",
    "data_kwargs",
    "fit_and_save",
    "load_train_eval",
    "make_accelerator",
    "mixed_precision",
    "quiet_transformers",
    "resolve_model_path",
    "save_model",
    "train_loop",
    "write_run_files",
]


@dataclass
class TrainConfig:
    """Fields shared by ``pmrlhf sft`` and ``pmrlhf rm``."""

    model: str = option(
        help="model to start from: hub id, local folder or .gguf file (a SmolLM2 GGUF works)"
    )
    data: str = option(
        help="training data: a .jsonl/.json/.parquet/.csv file or a Hugging Face dataset name "
        "(formats: docs/data-formats.md)"
    )
    output_dir: str = option(
        "runs/train",
        help="run folder: model/ (final weights), checkpoint-N/, metrics.jsonl, eval.json, "
        "config.yaml",
    )
    split: str | None = option(
        None, help="hub split or slice to read, e.g. train or train[:2000]; a local file is 'train'"
    )
    subset: str = option(
        "all",
        choices=["all", "sft", "rm", "rl"],
        help="rows to use: all, or one stage of the deterministic SFT/RM/RL split of the data",
    )
    split_fractions: list[float] = option(
        [0.2, 0.4, 0.4], help="SFT,RM,RL fractions of that split (the paper: 0.2,0.4,0.4)"
    )
    split_seed: int = option(1234, help="seed of the SFT/RM/RL split (the paper: 1234)")
    eval_data: str | None = option(
        None, help="separate evaluation data; if unset, eval_fraction of the training rows"
    )
    eval_split: str | None = option(None, help="hub split or slice of eval_data, e.g. test")
    eval_fraction: float = option(
        0.05, help="fraction of training rows held out for evaluation when eval_data is unset"
    )
    max_length: int = option(
        512, help="tokens per prompt+response; longer ones are cut from the right"
    )
    max_prompt_tokens: int = option(
        256, help="rows whose prompt is longer are dropped, with a warning (the paper: 256)"
    )
    epochs: int = option(2, help="passes over the training data")
    max_steps: int | None = option(
        None, help="stop after this many optimizer steps (overrides epochs when set)"
    )
    batch_size: int = option(8, help="examples per device per micro-batch")
    eval_batch_size: int | None = option(None, help="examples per eval batch (default: batch_size)")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-5, help="peak learning rate of AdamW")
    weight_decay: float = option(0.0, help="AdamW weight decay (not applied to biases and norms)")
    lr_scheduler: str = option(
        "linear", choices=["constant", "linear", "cosine"], help="decay after warm-up"
    )
    warmup_ratio: float = option(0.0, help="fraction of steps spent warming the lr up from 0")
    max_grad_norm: float = option(1.0, help="clip gradients to this norm (0 disables clipping)")
    seed: int = option(1234, help="seed for initialisation, shuffling and the eval hold-out")
    dtype: str = option(
        "auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision; bf16/fp16 run mixed precision (weights and optimizer stay fp32); "
        "auto is bf16 on a GPU that supports it, fp32 on CPU",
    )
    lora: bool = option(False, help="train a LoRA adapter (peft) instead of all weights")
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.05, help="dropout on the LoRA path")
    lora_target_modules: str = option(
        "all-linear", help="'all-linear' or comma-separated module names to adapt"
    )
    merge_lora: bool = option(
        False, help="save the final model with the adapter merged in, instead of the adapter"
    )
    gradient_checkpointing: bool = option(
        False, help="recompute activations in the backward pass to save memory"
    )
    save_every: int = option(0, help="also save a checkpoint-N/ folder every N steps (0: never)")
    eval_before: bool = option(True, help="also evaluate before training, to report the change")
    quiet: bool = option(False, help="no progress bar and no printed summary")


def check_config(config: TrainConfig) -> None:
    """Reject impossible settings before anything is loaded."""
    positive = {
        "batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_length": config.max_length,
        "max_prompt_tokens": config.max_prompt_tokens,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if config.max_steps is None and config.epochs <= 0:
        raise ValueError(f"epochs must be > 0 (or set max_steps), got {config.epochs}")
    if config.max_steps is not None and config.max_steps <= 0:
        raise ValueError(f"max_steps must be > 0 when set, got {config.max_steps}")
    if config.eval_batch_size is not None and config.eval_batch_size <= 0:
        raise ValueError(f"eval_batch_size must be > 0, got {config.eval_batch_size}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {config.warmup_ratio}")
    if config.save_every < 0:
        raise ValueError(f"save_every must be >= 0, got {config.save_every}")


def data_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of the ``pmrlhf.data`` loaders for the training data."""
    return {
        "split": config.split,
        "subset": config.subset,
        "fractions": config.split_fractions,
        "seed": config.split_seed,
        "max_prompt_tokens": config.max_prompt_tokens,
    }


def mixed_precision(dtype: str) -> str:
    """Accelerate's ``mixed_precision`` for a ``dtype`` option value."""
    if dtype == "fp32":
        return "no"
    if dtype in ("bf16", "fp16"):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:  # `accelerate launch --mixed_precision X` decides
        return launched
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=mixed_precision(config.dtype),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


@contextmanager
def quiet_transformers(enabled: bool) -> Iterator[None]:
    """Silence transformers' load reports and weight-loading bars while ``enabled``."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- data and model
@dataclass
class TrainData:
    train: list[Any]
    eval: list[Any]
    rows: int
    dropped_long_prompts: int


def load_train_eval(config: TrainConfig, tokenizer: Any, kind: str) -> TrainData:
    """Training and evaluation records of one kind, all validated before training starts."""
    from pmrlhf.data import holdout_indices, read_records

    records = read_records(config.data, kind, tokenizer, **data_kwargs(config))
    dropped = records.dropped
    if config.eval_data:
        held = read_records(
            config.eval_data,
            kind,
            tokenizer,
            split=config.eval_split,
            max_prompt_tokens=config.max_prompt_tokens,
        )
        dropped += held.dropped
        return TrainData(list(records), list(held), records.rows, dropped)
    train_idx, eval_idx = holdout_indices(len(records), config.eval_fraction, config.seed)
    return TrainData(
        [records[i] for i in train_idx], [records[i] for i in eval_idx], records.rows, dropped
    )


def resolve_model_path(name_or_path: str) -> str:
    """An absolute path for a local model, so saved adapters point at their base from anywhere."""
    from pmrlhf.lora import is_adapter_dir

    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and is_adapter_dir(path):
            raise ValueError(
                f"{name_or_path} holds a LoRA adapter; start from a full model (save the earlier "
                "run with merge_lora: true, or pass its base model)"
            )
        return str(path.resolve())
    return name_or_path


def adapt_model(model: Any, config: TrainConfig, task: str, base: str | None = None) -> Any:
    """Apply gradient checkpointing and LoRA as the config asks (``task``: causal_lm/seq_cls).

    ``base`` is recorded as the adapter's base model; it matters for ``.gguf`` files, whose
    loaded model only knows the folder the file sits in.
    """
    from pmrlhf.lora import apply_lora

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora:
        model = apply_lora(
            model,
            task,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
        if base is not None:
            for adapter in model.peft_config.values():
                adapter.base_model_name_or_path = base
        if config.gradient_checkpointing:
            # frozen embeddings would otherwise cut the graph that checkpointing replays
            model.enable_input_require_grads()
    return model


# --------------------------------------------------------------------------- saving
def save_model(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    directory: Path,
    merge_lora: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save weights (safetensors) and tokenizer into ``directory``, atomically.

    Every process must call this (sharded setups assemble the state dict collectively); only
    the main process writes. ``merge_lora`` folds a LoRA adapter into the weights first, which
    changes the in-memory model, so it is for the final save only.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    merge = merge_lora and hasattr(unwrapped, "merge_and_unload")
    state_dict = None if merge else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_directory(directory) as tmp:
            if merge:
                unwrapped.merge_and_unload().save_pretrained(tmp)
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            for name, value in (extra or {}).items():
                (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- optimisation
def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            # matrices decay; biases and norm scales do not (standard AdamW practice)
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    steps: int
    epochs: float
    train_loss: float
    seconds: float


def train_loop(
    *,
    config: TrainConfig,
    accelerator: Any,
    model: Any,
    train_examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    save_checkpoint: Callable[[Any, Path, dict[str, Any]], None],
    logger: JsonlLogger,
    name: str,
) -> tuple[Any, LoopResult]:
    """Train ``model`` on ``train_examples``; returns the prepared model and a summary.

    ``loss_fn(model, batch)`` returns the loss and detached per-batch statistics, which are
    averaged over processes and written to ``logger`` with loss, lr, grad norm and step time
    once per optimizer step.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    loader: Any = DataLoader(
        list(train_examples),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=generator,
    )
    optimizer = _optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    total = config.max_steps or config.epochs * updates_per_epoch
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "optimizer", optimizer),
        _lr_lambda(config.lr_scheduler, total, warmup),
    )
    bar = tqdm(total=total, desc=name, disable=config.quiet or not accelerator.is_main_process)
    model.train()
    step, last_loss = 0, float("nan")
    started = time.perf_counter()
    step_start = time.perf_counter()
    pending: list[torch.Tensor] = []
    stat_names: list[str] = []
    while step < total:
        for batch in loader:
            with accelerator.accumulate(model):
                loss, stats = loss_fn(model, batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), config.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stat_names = ["loss", *stats]
            pending.append(
                torch.stack([loss.detach().float(), *(v.float() for v in stats.values())])
            )
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            # one collective per step: the stats of this step's micro-batches, averaged
            values = accelerator.reduce(torch.stack(pending).mean(0), reduction="mean").tolist()
            pending = []
            record = dict(zip(stat_names, values))
            last_loss = record["loss"]
            now = time.perf_counter()
            line = {
                "step": step,
                "epoch": round(step / updates_per_epoch, 4),
                **record,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "step_seconds": now - step_start,
            }
            step_start = now
            if accelerator.is_main_process:
                logger.log(line)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            if config.save_every and step % config.save_every == 0 and step < total:
                save_checkpoint(
                    model, Path(config.output_dir) / f"checkpoint-{step}", {"step": step, **line}
                )
            if step >= total:
                break
    bar.close()
    return model, LoopResult(
        steps=step,
        epochs=step / updates_per_epoch,
        train_loss=last_loss,
        seconds=time.perf_counter() - started,
    )


def write_run_files(output_dir: Path, config: TrainConfig, evaluation: dict[str, Any]) -> Path:
    """``config.yaml`` and ``eval.json`` of a finished run; returns the eval file."""
    import yaml

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    path = output_dir / "eval.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(evaluation, indent=2) + "\n")
    tmp.replace(path)
    return path


def fit_and_save(
    *,
    config: TrainConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    data: TrainData,
    train_examples: Sequence[Any],
    eval_examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    evaluate: Callable[[Any, Any], dict[str, Any]],
    name: str,
) -> dict[str, Any]:
    """Evaluate, train, evaluate again, save; returns the run's result dict.

    ``evaluate(model, eval_loader)`` runs on the prepared eval loader of ``eval_examples`` and
    must gather across processes itself; it is skipped when there is nothing to evaluate.
    """
    from torch.utils.data import DataLoader

    if not train_examples:
        raise ValueError(f"{config.data}: no training examples left after validation")
    out = Path(config.output_dir)
    metrics_file = out / "metrics.jsonl"
    logger = JsonlLogger(metrics_file if accelerator.is_main_process else None)
    eval_loader = None
    if eval_examples:
        eval_loader = accelerator.prepare(
            DataLoader(
                list(eval_examples),  # type: ignore[arg-type]
                batch_size=config.eval_batch_size or config.batch_size,
                collate_fn=collate,
            )
        )
    model = model.to(accelerator.device)
    before = (
        evaluate(model, eval_loader) if eval_loader is not None and config.eval_before else None
    )

    def save_checkpoint(current: Any, directory: Path, state: dict[str, Any]) -> None:
        save_model(accelerator, current, tokenizer, directory, extra={"trainer_state.json": state})

    try:
        model, loop = train_loop(
            config=config,
            accelerator=accelerator,
            model=model,
            train_examples=train_examples,
            collate=collate,
            loss_fn=loss_fn,
            save_checkpoint=save_checkpoint,
            logger=logger,
            name=name,
        )
    finally:
        logger.close()
    after = evaluate(model, eval_loader) if eval_loader is not None else None
    model_dir = out / "model"
    save_model(accelerator, model, tokenizer, model_dir, merge_lora=config.merge_lora)
    evaluation = {"before": before, "after": after, "steps": loop.steps}
    eval_file = out / "eval.json"
    if accelerator.is_main_process:
        write_run_files(out, config, evaluation)
    accelerator.wait_for_everyone()
    return {
        "model_dir": str(model_dir),
        "output_dir": str(out),
        "metrics_file": str(metrics_file),
        "eval_file": str(eval_file),
        "steps": loop.steps,
        "epochs": loop.epochs,
        "train_loss": loop.train_loss,
        "seconds": loop.seconds,
        "rows": data.rows,
        "n_train": len(train_examples),
        "n_eval": len(eval_examples),
        "dropped_long_prompts": data.dropped_long_prompts,
        "eval": after,
        "eval_before": before,
    }
