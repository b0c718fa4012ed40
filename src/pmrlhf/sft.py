"""Supervised fine-tuning of a causal LM on demonstrations (the first stage of RLHF).

The loss is the mean negative log-likelihood of the completion tokens only; prompt tokens are
context. An end-of-sequence token follows each plain-text completion so the model learns to
stop. Chat data is rendered with the tokenizer's chat template when it has one.

Data: prompt/completion rows, chat "messages", Dahoas prompt/chosen rows or HH-RLHF "chosen"
text (see docs/data-formats.md). The run folder gets model/ (safetensors weights, or a LoRA
adapter), metrics.jsonl (one line per step), eval.json (held-out loss before and after) and
config.yaml; with save_every, checkpoint/ holds the latest resumable state.

Examples:
  pmrlhf sft --model HuggingFaceTB/SmolLM2-135M-Instruct --data demos.jsonl --output-dir runs/sft
  pmrlhf sft --config configs/sft_example.yaml --set lora=true
  pmrlhf sft --config configs/sft_example.yaml --resume runs/sft/checkpoint   # after a crash
  accelerate launch -m pmrlhf sft --config configs/sft_example.yaml   # several processes
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmrlhf.config import add_config_arguments, add_resume_arguments, config_from_args, option
from pmrlhf.data.formats import SFTRecord
from pmrlhf.training import TrainConfig

__all__ = [
    "SFTConfig",
    "SFTExample",
    "add_arguments",
    "evaluate_sft",
    "run",
    "sft_collate",
    "sft_loss",
    "tokenize_sft",
    "train_sft",
]


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Settings of ``pmrlhf sft`` (the paper: lr 1e-5, 2 epochs, max length 512)."""

    output_dir: str = option(
        "runs/sft",
        help="run folder: model/ (final weights), checkpoint/ (the latest resumable state), "
        "metrics.jsonl, eval.json, config.yaml",
    )


@dataclass(frozen=True)
class SFTExample:
    """Token ids of prompt + completion; the loss covers positions ``prompt_len`` onwards."""

    input_ids: list[int]
    prompt_len: int


def tokenize_sft(
    tokenizer: Any, records: Sequence[SFTRecord], max_length: int
) -> tuple[list[SFTExample], int]:
    """Examples of the records, cut to ``max_length``; also the count that kept no completion.

    Prompt and completion are tokenized apart so the loss mask falls exactly on the boundary.
    """
    from pmrlhf.data.text import encode_texts

    prompts = encode_texts(tokenizer, [r.prompt for r in records])
    completions = encode_texts(tokenizer, [r.completion for r in records], add_special_prefix=False)
    eos = tokenizer.eos_token_id
    examples, skipped = [], 0
    for prompt, completion in zip(prompts, completions):
        if eos is not None and (not completion or completion[-1] != eos):
            completion = [*completion, eos]
        ids = (prompt + completion)[:max_length]
        if len(ids) <= len(prompt):
            skipped += 1
            continue
        examples.append(SFTExample(ids, len(prompt)))
    return examples, skipped


def sft_collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    from pmrlhf.data.text import pad_right

    input_ids, mask = pad_right([e.input_ids for e in examples], pad_id)
    labels = input_ids.masked_fill(mask == 0, -100)
    for row, example in enumerate(examples):
        labels[row, : example.prompt_len] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _token_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL of the labelled tokens, and their counts."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return nll.sum(-1), (labels != -100).sum(-1)


def sft_loss(model: Any, batch: dict[str, torch.Tensor]):
    """Mean NLL per completion token of the batch, with the token count as a statistic."""
    nll, tokens = _token_nll(model, batch)
    total = tokens.sum()
    return nll.sum() / total.clamp_min(1), {"tokens": total.float()}


def _evaluate(model: Any, batches: Any, gather: Any, autocast: Any) -> dict[str, float]:
    was_training = model.training
    model.eval()
    nll_sum, token_sum, examples = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    nll, tokens = _token_nll(model, batch)
                nll, tokens = gather(nll), gather(tokens)
                nll_sum += float(nll.double().sum())
                token_sum += int(tokens.sum())
                examples += int(nll.numel())
    finally:
        model.train(was_training)
    loss = nll_sum / max(token_sum, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": token_sum,
        "examples": examples,
    }


def evaluate_sft(
    model: Any,
    tokenizer: Any,
    records: Sequence[SFTRecord],
    max_length: int = 512,
    batch_size: int = 16,
) -> dict[str, float]:
    """Held-out completion loss (mean NLL per token) and perplexity, on one process."""
    from contextlib import nullcontext

    examples, _ = tokenize_sft(tokenizer, records, max_length)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    batches = (
        {k: v.to(device) for k, v in sft_collate(examples[i : i + batch_size], pad).items()}
        for i in range(0, len(examples), batch_size)
    )
    return _evaluate(model, batches, lambda t: t, nullcontext)


def train_sft(
    config: SFTConfig, resume: str | Path | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Fine-tune ``config.model`` on ``config.data``; returns the run's result dict.

    ``resume``: a checkpoint folder (``output_dir/checkpoint``) of an interrupted run with the
    same settings; training continues from it exactly (``allow_config_change`` accepts
    changed settings, with a warning naming them).

    Keys: ``model_dir`` (load it with :func:`pmrlhf.lora.load_policy_model`, or
    :func:`pmrlhf.models.load_causal_lm` when LoRA is off or merged), ``eval`` and
    ``eval_before`` (held-out loss, perplexity), ``steps``, ``train_loss``, ``n_train``,
    ``n_eval``, ``dropped_long_prompts``, ``metrics_file``, ``eval_file``, ``seconds``.
    """
    from functools import partial

    from pmrlhf.models import load_causal_lm
    from pmrlhf.training import (
        adapt_model,
        fit_and_save,
        quiet_transformers,
        start_run,
    )

    run = start_run(config, "sft", "sft", resume, allow_config_change)
    checkpoint, accelerator, model_path, tokenizer, data = (
        run.checkpoint, run.accelerator, run.model_path, run.tokenizer, run.data
    )  # fmt: skip
    with quiet_transformers(config.quiet or not accelerator.is_main_process):
        model = load_causal_lm(model_path, dtype=torch.float32)
    train_examples, skipped = tokenize_sft(tokenizer, data.train, config.max_length)
    eval_examples, _ = tokenize_sft(tokenizer, data.eval, config.max_length)
    if skipped and accelerator.is_main_process:
        import warnings

        warnings.warn(
            f"{config.data}: skipped {skipped} rows whose prompt fills max_length "
            f"({config.max_length} tokens), leaving no completion token to learn",
            UserWarning,
            stacklevel=2,
        )
    model = adapt_model(model, config, "causal_lm", base=model_path)
    collate = partial(sft_collate, pad_id=tokenizer.pad_token_id)

    def evaluate(current: Any, loader: Any) -> dict[str, float]:
        return _evaluate(current, loader, accelerator.gather_for_metrics, accelerator.autocast)

    with quiet_transformers(config.quiet or not accelerator.is_main_process):
        result = fit_and_save(
            config=config,
            accelerator=accelerator,
            model=model,
            tokenizer=tokenizer,
            data=data,
            train_examples=train_examples,
            eval_examples=eval_examples,
            collate=collate,
            loss_fn=sft_loss,
            evaluate=evaluate,
            name="sft",
            resume=checkpoint,
        )
    if not config.quiet and accelerator.is_main_process:
        print(_summary(result))
    return result


def _summary(result: dict[str, Any]) -> str:
    lines = [f"sft: {result['steps']} steps on {result['n_train']} examples"]
    after, before = result["eval"], result["eval_before"]
    if after is not None:
        change = f"{before['loss']:.4f} -> " if before is not None else ""
        lines.append(
            f"held-out loss {change}{after['loss']:.4f} (perplexity {after['perplexity']:.3f}, "
            f"{after['examples']} examples)"
        )
    lines.append(f"model: {result['model_dir']}  eval: {result['eval_file']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_resume_arguments(parser)
    add_config_arguments(parser, SFTConfig)


def run(args: argparse.Namespace) -> int:
    train_sft(
        config_from_args(SFTConfig, args),
        resume=args.resume,
        allow_config_change=args.allow_config_change,
    )
    return 0
