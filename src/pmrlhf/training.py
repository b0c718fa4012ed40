"""What the SFT and reward-model trainers share: the common config fields and the loop.

The loop runs under ``accelerate``: model, optimizer and data loader go through
``accelerator.prepare``, gradients through ``accelerator.backward`` and ``accumulate``, and
metrics through ``reduce``/``gather``, so ``accelerate launch`` (DDP, FSDP, DeepSpeed) works
without changes and a plain call runs on one process. The learning-rate schedule is stepped
here once per optimizer update rather than prepared, so its length is simply the number of
updates each process makes.

Checkpoints (``output_dir/checkpoint/``, the latest one, every ``save_every`` steps) hold the
model, optimizer, schedule, RNG states and the position in the shuffled data, so a run resumed
from one continues exactly as if it had not stopped. A non-finite loss or gradient stops
training before the update is applied; nothing non-finite is ever saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmrlhf.config import option, to_dict
from pmrlhf.optim import (
    LR_SCHEDULES,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    mixed_precision,
)
from pmrlhf.runtime import (
    JsonlLogger,
    NonFiniteError,
    atomic_directory,
    check_finite_weights,
    check_resume_settings,
    claim_output_dir_on_main,
    commit_directory,
    fresh_temp_directory,
    recover_directory,
    run_length_settings,
)

__all__ = [
    "CHECKPOINT_DIR",
    "Checkpoint",
    "GroupedRandomSampler",
    "NonFiniteError",
    "RunStart",
    "TrainConfig",
    "TrainData",
    "adapt_model",
    "check_config",
    "data_kwargs",
    "fit_and_save",
    "load_train_eval",
    "make_accelerator",
    "quiet_transformers",
    "read_checkpoint",
    "resolve_model_path",
    "save_model",
    "start_run",
    "train_loop",
    "write_run_files",
]

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
DATA_ORDER_FILE = "data_order.safetensors"
# Settings that may differ between a run and its resumption: none of them moves the trajectory.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "save_every", "eval_before", "eval_batch_size", "quiet", "merge_lora",
     "calibration_bins", "overwrite"}
)  # fmt: skip


@dataclass(kw_only=True)
class TrainConfig(OptimConfig):
    """Fields shared by ``pmrlhf sft`` and ``pmrlhf rm``; the optimisation fields are
    :class:`pmrlhf.optim.OptimConfig`'s, with SFT/RM defaults for the schedule and seed."""

    lr_schedule: str = option(
        "linear", choices=list(LR_SCHEDULES), help="learning-rate schedule after warm-up"
    )
    seed: int = option(1234, help="seed for initialisation, shuffling and the eval hold-out")
    model: str = option(
        help="model to start from: hub id, local folder or .gguf file (a SmolLM2 GGUF works)"
    )
    data: str = option(
        help="training data: a .jsonl/.json/.parquet/.csv file or a Hugging Face dataset name "
        "(formats: docs/data-formats.md)"
    )
    output_dir: str = option(
        "runs/train",
        help="run folder: model/ (final weights), checkpoint/ (the latest resumable state), "
        "metrics.jsonl, eval.json, config.yaml",
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
    epochs: int = option(2, help="passes over the training data (when max_steps is unset)")
    max_steps: int | None = option(
        None, help="stop after this many optimizer steps (overrides epochs when set)"
    )
    batch_size: int = option(8, help="examples per device per micro-batch")
    eval_batch_size: int | None = option(None, help="examples per eval batch (default: batch_size)")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
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
    save_every: int = option(
        0,
        help="every N steps, replace output_dir/checkpoint/ with the current state, which "
        "--resume continues exactly (0: never)",
    )
    eval_before: bool = option(True, help="also evaluate before training, to report the change")
    overwrite: bool = option(
        False,
        help="replace the run already in output_dir (its checkpoint, metrics, model, eval.json); "
        "without it a used output_dir is refused unless resuming",
    )
    quiet: bool = option(False, help="no progress bar and no printed summary")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_config(self)


def _check_choices(config: Any) -> None:
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{field.name} must be one of {list(choices)}, got {value!r}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: TrainConfig) -> None:
    """Reject impossible settings before anything is loaded; each error names its field."""
    _check_choices(config)
    at_least = {
        "batch_size": (config.batch_size, 1),
        "gradient_accumulation_steps": (config.gradient_accumulation_steps, 1),
        "max_length": (config.max_length, 2),  # one prompt token and one to learn
        "max_prompt_tokens": (config.max_prompt_tokens, 1),
        "warmup_steps": (config.warmup_steps, 0),
        "save_every": (config.save_every, 0),
        "lora_r": (config.lora_r, 1),
        "lora_alpha": (config.lora_alpha, 1),
    }
    if config.max_steps is None:
        at_least["epochs"] = (config.epochs, 1)
    else:
        at_least["max_steps"] = (config.max_steps, 1)
    if config.eval_batch_size is not None:
        at_least["eval_batch_size"] = (config.eval_batch_size, 1)
    for name, (count, low) in at_least.items():
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {count!r}")
    if not (_finite_number(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {config.lr!r}")
    for name in ("weight_decay", "max_grad_norm"):
        value = getattr(config, name)
        if not (_finite_number(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (
        ("eval_fraction", config.eval_fraction),
        ("lora_dropout", config.lora_dropout),
    ):
        if not (_finite_number(value) and 0 <= value < 1):
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    fractions = config.split_fractions
    if (
        len(fractions) != 3
        or not all(_finite_number(f) and f >= 0 for f in fractions)
        or not sum(fractions) > 0
    ):
        raise ValueError(
            "split_fractions must be three numbers >= 0 (SFT,RM,RL) with a positive sum, "
            f"got {fractions!r}"
        )


def data_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of the ``pmrlhf.data`` loaders for the training data."""
    return {
        "split": config.split,
        "subset": config.subset,
        "fractions": config.split_fractions,
        "seed": config.split_seed,
        "max_prompt_tokens": config.max_prompt_tokens,
    }


def make_accelerator(config: TrainConfig) -> Any:
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


@dataclass
class RunStart:
    """What every SFT/RM/offline run begins with: the checkpoint to resume (if any), the
    accelerator, the resolved model path, its tokenizer and the validated data."""

    checkpoint: Checkpoint | None
    accelerator: Any
    model_path: str
    tokenizer: Any
    data: TrainData


def start_run(
    config: TrainConfig,
    name: str,
    kind: str,
    resume: str | Path | None,
    allow_config_change: bool,
) -> RunStart:
    """Check the config, read the checkpoint to resume from, seed, build the accelerator, then
    load the tokenizer and the ``kind`` records (all before any model is loaded)."""
    from pmrlhf.models import load_tokenizer
    from pmrlhf.runtime import set_seed

    check_config(config)
    checkpoint = (
        read_checkpoint(resume, config, name, allow_config_change) if resume is not None else None
    )
    set_seed(config.seed)
    accelerator = make_accelerator(config)
    model_path = resolve_model_path(config.model)
    with quiet_transformers(config.quiet or not accelerator.is_main_process):
        tokenizer = load_tokenizer(model_path)
        data = load_train_eval(config, tokenizer, kind)
    return RunStart(checkpoint, accelerator, model_path, tokenizer, data)


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


# --------------------------------------------------------------------------- finiteness
def _non_finite_entry(value: Any, key: str = "") -> str | None:
    """The key of the first non-finite number in a nested dict/list, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key or "value"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for name, item in items:
        found = _non_finite_entry(item, f"{key}.{name}" if key else str(name))
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- saving
@contextmanager
def _quiet_shared_tensor_warning() -> Iterator[None]:
    # Tied input/output embeddings are saved once; accelerate warns about that on every save,
    # and the resume tests check that they reload exactly.
    log = logging.getLogger("accelerate.utils.other")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _write_pretrained(
    unwrapped: Any, state_dict: Any, tokenizer: Any, directory: Path, merge: bool
) -> None:
    if merge:
        unwrapped.merge_and_unload().save_pretrained(directory)
    else:
        unwrapped.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def save_model(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    directory: Path,
    merge_lora: bool = False,
) -> None:
    """Save weights (safetensors) and tokenizer into ``directory``, atomically.

    Every process must call this (sharded setups assemble the state dict collectively); only
    the main process writes. Non-finite weights are refused. ``merge_lora`` folds a LoRA
    adapter into the weights first, which changes the in-memory model, so it is for the final
    save only.
    """
    check_finite_weights(accelerator, model, f"the model {directory}")
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    merge = merge_lora and hasattr(unwrapped, "merge_and_unload")
    state_dict = None if merge else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_directory(directory) as tmp:
            _write_pretrained(unwrapped, state_dict, tokenizer, tmp, merge)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """What a run resumes from: ``trainer_state.json`` and the data order of a checkpoint."""

    directory: Path
    step: int
    epoch_batches: int  # micro-batches of the current epoch already trained on
    processes: int
    scheduler: dict[str, Any]
    eval_before: dict[str, Any] | None
    generator_state: torch.Tensor  # the shuffling generator at the start of that epoch


def save_checkpoint(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    directory: Path,
    state: dict[str, Any],
    generator_state: torch.Tensor,
) -> None:
    """Atomically write ``directory``: accelerate's state (model, optimizer, RNG states), the
    loadable model in ``model/``, the data order and ``trainer_state.json``."""
    from safetensors.torch import save_file

    check_finite_weights(accelerator, model, f"the checkpoint at step {state['step']}")
    final = Path(directory)
    main = accelerator.is_main_process
    tmp = fresh_temp_directory(final) if main else final.with_name(final.name + ".tmp")
    accelerator.wait_for_everyone()
    with _quiet_shared_tensor_warning():
        accelerator.save_state(str(tmp), safe_serialization=True)
    state_dict = accelerator.get_state_dict(model)
    if main:
        _write_pretrained(
            accelerator.unwrap_model(model), state_dict, tokenizer, tmp / "model", merge=False
        )
        save_file({"generator": generator_state}, str(tmp / DATA_ORDER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if main:
        commit_directory(tmp, final)
    accelerator.wait_for_everyone()


def read_checkpoint(
    directory: str | Path, config: TrainConfig, kind: str, allow_changes: bool = False
) -> Checkpoint:
    """Check that ``directory`` is a complete ``kind`` checkpoint of a run with these settings.

    Settings that move the trajectory (data, model, optimisation, seed, ...) must be the same:
    an exact resume of a run under other settings does not exist, so that is refused and the
    changed fields are named.
    """
    from safetensors.torch import load_file

    path = Path(directory).expanduser()
    where = f"--resume {path}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        recover_directory(path)  # a save cut short between its renames
    if not path.exists():
        raise FileNotFoundError(f"{where}: checkpoint folder not found")
    if not path.is_dir():
        raise ValueError(f"{where}: not a folder (pass output_dir/{CHECKPOINT_DIR})")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        hint = (
            f"; did you mean {path / CHECKPOINT_DIR}?"
            if (path / CHECKPOINT_DIR / STATE_FILE).is_file()
            else ""
        )
        raise ValueError(f"{where}: not a pmrlhf {kind} checkpoint (no {STATE_FILE}){hint}")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: cannot read {STATE_FILE}: {err}") from None
    found = state.get("kind") if isinstance(state, dict) else None
    if found != kind:
        what = f"a pmrlhf {found} checkpoint" if isinstance(found, str) else "not from sft or rm"
        raise ValueError(f"{where}: {what}, not a pmrlhf {kind} checkpoint")
    processes = state.get("processes", 1) if isinstance(state.get("processes", 1), int) else 1
    for name in (DATA_ORDER_FILE, *(f"random_states_{i}.pkl" for i in range(processes))):
        if not (path / name).is_file():
            raise ValueError(f"{where}: incomplete checkpoint, {name} is missing")
    check_resume_settings(
        state.get("config", {}),
        to_dict(config),
        ignore=RESUMABLE_CHANGES | run_length_settings(config.lr_schedule),
        where=where,
        allow_changes=allow_changes,
    )
    try:
        generator_state = load_file(str(path / DATA_ORDER_FILE))["generator"]
        return Checkpoint(
            directory=path,
            step=int(state["step"]),
            epoch_batches=int(state["epoch_batches"]),
            processes=int(state["processes"]),
            scheduler=dict(state["scheduler"]),
            eval_before=state.get("eval_before"),
            generator_state=generator_state,
        )
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"{where}: damaged checkpoint ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    steps: int
    epochs: float
    train_loss: float
    seconds: float


def _gradient_norm(accelerator: Any, model: Any, max_grad_norm: float) -> float | None:
    """The gradient norm before clipping; clips to ``max_grad_norm`` when it is > 0."""
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    elif accelerator.scaler is None:
        norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)  # measures, scales by 1
    else:
        return None
    return None if norm is None else float(norm)


class GroupedRandomSampler(torch.utils.data.Sampler[int]):
    """A random order of example indices that keeps each group's examples together.

    Each pass puts the groups in a random order and shuffles the examples within each group,
    both drawn from ``generator``, so a run resumed from the generator's state at the start of
    an epoch sees the same order. Cut into batches, the order puts the examples of a group in
    as few batches as it can: with a collate that computes each distinct input once
    (:func:`pmrlhf.reward.rm_collate`), the rankings of one prompt share the forward passes of
    their responses.
    """

    def __init__(self, groups: Sequence[Hashable], generator: torch.Generator) -> None:
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        self.members = list(members.values())
        # accelerate finds a sampler's generator and keeps it in step across processes
        self.generator = generator
        self.size = len(groups)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        for g in torch.randperm(len(self.members), generator=self.generator).tolist():
            group = self.members[g]
            for i in torch.randperm(len(group), generator=self.generator).tolist():
                yield group[i]


@dataclass
class _Loop:
    """What :func:`train_loop` trains with, prepared by accelerate."""

    model: Any
    optimizer: Any
    loader: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    updates_per_epoch: int
    total: int


def _prepare_loop(
    config: TrainConfig,
    accelerator: Any,
    model: Any,
    train_examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    groups: Sequence[Hashable] | None = None,
) -> _Loop:
    """The shuffled loader (grouped by ``groups`` when given: :class:`GroupedRandomSampler`),
    AdamW and lr schedule, prepared with the model."""
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(config.seed)
    order: dict[str, Any] = {"shuffle": True, "generator": generator}
    if groups is not None:
        if len(groups) != len(train_examples):
            raise ValueError(f"{len(groups)} groups for {len(train_examples)} training examples")
        order = {"sampler": GroupedRandomSampler(groups, generator)}
    loader: Any = DataLoader(
        list(train_examples),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=config.batch_size,
        collate_fn=collate,
        **order,
    )
    adamw = build_optimizer([(model.parameters(), config.lr)], config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, adamw, loader)
    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    total = config.max_steps or config.epochs * updates_per_epoch
    # the schedule drives the AdamW built above: under DeepSpeed the prepared optimizer is
    # DeepSpeed's own wrapper, which is no torch Optimizer, and it shares these param groups
    scheduler = build_scheduler(adamw, config.lr_schedule, total, config.warmup_steps)
    return _Loop(model, optimizer, loader, scheduler, generator, updates_per_epoch, total)


def _restore(
    resume: Checkpoint, accelerator: Any, scheduler: Any, generator: torch.Generator
) -> tuple[int, int, int]:
    """Load a checkpoint's state; returns (step, micro-batches of its epoch done, step)."""
    if resume.processes != accelerator.num_processes:
        raise ValueError(
            f"--resume {resume.directory}: written by {resume.processes} process(es), "
            f"resumed on {accelerator.num_processes}; use the same number"
        )
    with _quiet_shared_tensor_warning():
        accelerator.load_state(str(resume.directory))
    scheduler.load_state_dict(resume.scheduler)
    generator.set_state(resume.generator_state)
    return resume.step, resume.epoch_batches, resume.step


def _non_finite_stop(
    config: TrainConfig,
    what: str,
    value: float | None,
    step: int,
    checkpoint_dir: Path,
    last_saved: int | None,
) -> NonFiniteError:
    """The error that stops a run at ``step``, saying which checkpoint is kept."""
    kept = (
        f"the last checkpoint, {checkpoint_dir} (step {last_saved}), is kept"
        if last_saved is not None
        else "no checkpoint had been saved (save_every writes one)"
    )
    return NonFiniteError(
        f"training stopped at step {step}: the {what} is {value}; that update was not "
        f"applied and nothing was saved, {kept}. The learning rate may be too high: try a "
        f"lower lr (now {config.lr:g})"
    )


def train_loop(
    *,
    config: TrainConfig,
    accelerator: Any,
    model: Any,
    train_examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    save_checkpoint: Callable[[Any, dict[str, Any], torch.Tensor], Path],
    logger: JsonlLogger,
    name: str,
    resume: Checkpoint | None = None,
    groups: Sequence[Hashable] | None = None,
) -> tuple[Any, LoopResult]:
    """Train ``model`` on ``train_examples``; returns the prepared model and a summary.

    ``loss_fn(model, batch)`` returns the loss and detached per-batch statistics, which are
    averaged over processes and written to ``logger`` with loss, lr, grad norm and step time
    once per optimizer step. ``save_checkpoint(model, state, generator_state)`` runs every
    ``save_every`` steps. With ``resume``, the run continues from that checkpoint exactly: the
    data order is the shuffling generator's state at the start of the checkpoint's epoch, and
    the micro-batches of that epoch already trained on are skipped.

    ``groups`` (one key per training example) keeps the examples of a key together in the
    shuffled order (:class:`GroupedRandomSampler`); without it the order is uniformly random.

    A non-finite loss or gradient norm raises :class:`NonFiniteError` before the update.
    """
    from tqdm.auto import tqdm

    loop = _prepare_loop(config, accelerator, model, train_examples, collate, groups)
    model, optimizer, loader, scheduler, generator = (
        loop.model, loop.optimizer, loop.loader, loop.scheduler, loop.generator
    )  # fmt: skip
    updates_per_epoch, total = loop.updates_per_epoch, loop.total
    step, skip, last_saved = 0, 0, None
    if resume is not None:
        step, skip, last_saved = _restore(resume, accelerator, scheduler, generator)
    checkpoint_dir = Path(config.output_dir) / CHECKPOINT_DIR

    def stop(what: str, value: float | None) -> NonFiniteError:
        return _non_finite_stop(config, what, value, step + 1, checkpoint_dir, last_saved)

    bar = tqdm(
        total=total,
        initial=step,
        desc=name,
        disable=config.quiet or not accelerator.is_main_process,
    )
    model.train()
    last_loss = float("nan")
    started = time.perf_counter()
    step_start = time.perf_counter()
    pending: list[torch.Tensor] = []
    stat_names: list[str] = []
    while step < total:
        epoch_start = generator.get_state()  # the data order of this epoch follows from it
        consumed = skip
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            consumed += 1
            with accelerator.accumulate(model):
                loss, stats = loss_fn(model, batch)
                accelerator.backward(loss)
                stat_names = ["loss", *stats]
                pending.append(
                    torch.stack([loss.detach().float(), *(v.float() for v in stats.values())])
                )
                if accelerator.sync_gradients:
                    grad_norm = _gradient_norm(accelerator, model, config.max_grad_norm)
                    # one collective per step: the stats of this step's micro-batches, averaged
                    values = accelerator.reduce(torch.stack(pending).mean(0), reduction="mean")
                    record = dict(zip(stat_names, values.tolist()))
                    pending = []
                    if not math.isfinite(record["loss"]):
                        raise stop("training loss", record["loss"])
                    # under fp16 the gradient scaler itself skips steps that overflow
                    overflow = grad_norm is not None and not math.isfinite(grad_norm)
                    if overflow and accelerator.scaler is None:
                        raise stop("gradient norm", grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            last_loss = record["loss"]
            now = time.perf_counter()
            line = {
                "step": step,
                "epoch": round(step / updates_per_epoch, 4),
                **record,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_seconds": now - step_start,
            }
            step_start = now
            if accelerator.is_main_process:
                logger.log(line)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            if config.save_every and step % config.save_every == 0 and step < total:
                state = {
                    "step": step,
                    "epoch_batches": consumed,
                    "processes": accelerator.num_processes,
                    "scheduler": scheduler.state_dict(),
                    "metrics": line,
                }
                checkpoint_dir = save_checkpoint(model, state, epoch_start)
                last_saved = step
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
    tmp.write_text(json.dumps(evaluation, indent=2, allow_nan=False) + "\n")
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
    resume: Checkpoint | None = None,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Evaluate, train, evaluate again, save; returns the run's result dict.

    ``evaluate(model, eval_loader)`` runs on the prepared eval loader of ``eval_examples`` and
    must gather across processes itself; it is skipped when there is nothing to evaluate.
    ``resume`` (see :func:`read_checkpoint`) continues an interrupted run exactly; its
    ``metrics.jsonl`` keeps the lines up to the checkpoint's step and continues from there.
    ``groups``: see :func:`train_loop`.
    """
    from torch.utils.data import DataLoader

    if not train_examples:
        raise ValueError(f"{config.data}: no training examples left after validation")
    out = Path(config.output_dir)
    metrics_file = out / "metrics.jsonl"
    main = accelerator.is_main_process
    claim = claim_output_dir_on_main(
        accelerator,
        out,
        overwrite=config.overwrite,
        resume=resume is not None,
        command=f"pmrlhf {name}",
    )
    try:
        logger = JsonlLogger(
            metrics_file if main else None, resume_step=resume.step if resume is not None else None
        )
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
        if resume is not None:
            before = resume.eval_before  # of the starting model, measured when the run began
        elif eval_loader is not None and config.eval_before:
            before = evaluate(model, eval_loader)
            bad = _non_finite_entry(before)
            if bad is not None:
                raise NonFiniteError(
                    f"the held-out {bad} of the starting model {config.model} is not finite"
                )
        else:
            before = None

        def checkpoint(current: Any, state: dict[str, Any], generator_state: torch.Tensor) -> Path:
            directory = out / CHECKPOINT_DIR
            state = {"kind": name, **state, "eval_before": before, "config": to_dict(config)}
            save_checkpoint(accelerator, current, tokenizer, directory, state, generator_state)
            return directory

        try:
            model, loop = train_loop(
                config=config,
                accelerator=accelerator,
                model=model,
                train_examples=train_examples,
                collate=collate,
                loss_fn=loss_fn,
                save_checkpoint=checkpoint,
                logger=logger,
                name=name,
                resume=resume,
                groups=groups,
            )
        finally:
            logger.close()
        after = evaluate(model, eval_loader) if eval_loader is not None else None
        evaluation = {"before": before, "after": after, "steps": loop.steps}
        bad = _non_finite_entry(after)
        if bad is not None:
            raise NonFiniteError(
                f"the held-out {bad} after training is not finite, so nothing was saved; "
                f"try a lower lr (now {config.lr:g})"
            )
        model_dir = out / "model"
        save_model(accelerator, model, tokenizer, model_dir, merge_lora=config.merge_lora)
        eval_file = out / "eval.json"
        if main:
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

    finally:
        if claim is not None:
            claim.release()
