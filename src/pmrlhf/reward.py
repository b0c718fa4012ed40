"""Reward-model training: a last-token scalar head fitted to comparisons or rankings.

The model is ``AutoModelForSequenceClassification`` with one output, read at the last
non-padding token of ``reward_input_text(prompt, response)`` (see ``pmrlhf.score``). Pairs are
fitted by the Bradley–Terry–Luce likelihood, ``−log σ(r_chosen − r_rejected)``; rankings of K
responses by the Plackett–Luce negative log-likelihood, of which BTL is the K = 2 case.

Evaluation on held-out data reports pairwise accuracy, the PL and BTL log-likelihoods and a
calibration table: the predicted σ(Δr) of each held-out comparison, in bins, against how often
the first response really won (the paper's PM target is only as good as this calibration).

Data: prompt/chosen/rejected rows (also HH-RLHF and Dahoas layouts) or prompt/responses rows,
ranked best first or with scores (see docs/data-formats.md).

Examples:
  pmrlhf rm --model runs/sft/model --data prefs.jsonl --output-dir runs/rm
  pmrlhf rm --config configs/rm_example.yaml --set lora=true
  pmrlhf rm --config configs/rm_example.yaml --resume runs/rm/checkpoint   # after a crash
  accelerate launch -m pmrlhf rm --config configs/rm_example.yaml   # several processes
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmrlhf.config import add_config_arguments, add_resume_arguments, config_from_args, option
from pmrlhf.data.formats import RankingRecord
from pmrlhf.theory import btl_log_likelihood, pl_log_likelihood
from pmrlhf.training import TrainConfig

__all__ = [
    "RMConfig",
    "RankingExample",
    "add_arguments",
    "calibration_table",
    "evaluate_reward_model",
    "ranking_loss",
    "ranking_metrics",
    "rm_collate",
    "run",
    "tokenize_rankings",
    "train_reward_model",
]


@dataclass(kw_only=True)
class RMConfig(TrainConfig):
    """Settings of ``pmrlhf rm`` (the paper: lr 1e-5, weight decay 0.1, 2 epochs)."""

    output_dir: str = option(
        "runs/rm",
        help="run folder: model/ (final weights), checkpoint/ (the latest resumable state), "
        "metrics.jsonl, eval.json, config.yaml",
    )
    weight_decay: float = option(
        0.1, help="AdamW weight decay on weight matrices (biases and norm scales never decay)"
    )
    loss: str = option(
        "pl",
        choices=["pl", "btl"],
        help="pl: Plackett-Luce NLL of each ranking (exactly the BTL loss for pairs); btl: mean "
        "BTL loss over every pair a ranking implies",
    )
    calibration_bins: int = option(
        10, help="bins of predicted σ(Δr) in the evaluation's calibration table"
    )
    group_by_prompt: bool = option(
        False,
        help="shuffle the rankings a prompt at a time, so that a batch holds all rankings of "
        "few prompts; each distinct response is scored once per batch, so where prompts have "
        "many rankings a large batch costs about its distinct responses",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.calibration_bins, bool) or not (
            isinstance(self.calibration_bins, int) and self.calibration_bins >= 1
        ):
            raise ValueError(
                f"calibration_bins must be an integer >= 1, got {self.calibration_bins!r}"
            )


@dataclass(frozen=True)
class RankingExample:
    """Token ids of each response's reward input, best response first."""

    responses: tuple[list[int], ...]


# --------------------------------------------------------------------------- losses, metrics
def _pair_mask(mask: Tensor) -> Tensor:
    """(B, K, K) mask of pairs i < j where both responses are present (i ranked above j)."""
    k = mask.shape[-1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=mask.device), diagonal=1)
    return mask.unsqueeze(-1) & mask.unsqueeze(-2) & upper


def ranking_loss(scores: Tensor, mask: Tensor, kind: str = "pl") -> Tensor:
    """Mean loss of a batch of rankings; ``scores``: (B, K) best first, ``mask``: present items.

    ``pl`` is −log P_PL(ranking), which for K = 2 is −log σ(r_1 − r_2), the BTL loss; ``btl``
    averages the BTL loss over every pair implied by each ranking.
    """
    if kind == "pl":
        return -pl_log_likelihood(scores, mask).mean()
    if kind == "btl":
        pairs = _pair_mask(mask.bool())
        loglik = btl_log_likelihood(scores.unsqueeze(-1), scores.unsqueeze(-2))
        return -loglik[pairs].mean()
    raise ValueError(f"loss must be 'pl' or 'btl', got {kind!r}")


def _pairwise_accuracy(scores: Tensor, mask: Tensor) -> Tensor:
    pairs = _pair_mask(mask.bool())
    diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    right = (diff > 0).float() + 0.5 * (diff == 0).float()  # a tie is half right
    return right[pairs].mean()


def calibration_table(
    predicted: Tensor, outcome: Tensor, bins: int = 10
) -> tuple[list[dict[str, float]], float]:
    """Bins of predicted win probability against the observed win rate, and the ECE.

    ``predicted``: P(first wins) per comparison; ``outcome``: 1.0 where the first won. The
    expected calibration error is the count-weighted mean |mean predicted − observed|.
    """
    if bins <= 0:
        raise ValueError(f"bins must be > 0, got {bins}")
    predicted, outcome = predicted.double().flatten(), outcome.double().flatten()
    which = (predicted * bins).long().clamp_(0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        chosen = which == b
        count = int(chosen.sum())
        row: dict[str, Any] = {"low": b / bins, "high": (b + 1) / bins, "count": count}
        if count:
            mean_p, observed = float(predicted[chosen].mean()), float(outcome[chosen].mean())
            row.update(mean_predicted=mean_p, observed_win_rate=observed)
            error += count * abs(mean_p - observed)
        else:
            row.update(mean_predicted=None, observed_win_rate=None)
        table.append(row)
    total = predicted.numel()
    return table, (error / total if total else 0.0)


def ranking_metrics(scores: Tensor, mask: Tensor, bins: int = 10) -> dict[str, Any]:
    """Held-out metrics of reward scores on rankings ((B, K) best first, ``mask`` present).

    Each comparison is entered in the calibration table in both orders, (σ(Δr), won) and
    (1 − σ(Δr), lost), so the table does not depend on how the data orders its pairs.
    """
    scores, mask = scores.double(), mask.bool()
    pairs = _pair_mask(mask)
    diff = (scores.unsqueeze(-1) - scores.unsqueeze(-2))[pairs]
    p_first = torch.sigmoid(diff)
    table, ece = calibration_table(
        torch.cat([p_first, 1 - p_first]),
        torch.cat([torch.ones_like(p_first), torch.zeros_like(p_first)]),
        bins,
    )
    present = scores[mask]
    return {
        "rankings": int(scores.shape[0]),
        "pairs": int(diff.numel()),
        "pairwise_accuracy": float(_pairwise_accuracy(scores, mask)),
        "pl_log_likelihood": float(pl_log_likelihood(scores, mask).mean()),
        "btl_log_likelihood": float(torch.nn.functional.logsigmoid(diff).mean()),
        "mean_margin": float(diff.mean()),
        "reward_mean": float(present.mean()),
        "reward_std": float(present.std()) if present.numel() > 1 else 0.0,
        "calibration_error": ece,
        "calibration": table,
    }


# --------------------------------------------------------------------------- tokenisation
def tokenize_rankings(
    tokenizer: Any, records: Sequence[RankingRecord], max_length: int
) -> list[RankingExample]:
    """Reward-input ids of every response, tokenized in one batched call."""
    from pmrlhf.score import encode_reward_inputs

    prompts = [r.prompt for r in records for _ in r.responses]
    responses = [resp for r in records for resp in r.responses]
    ids = encode_reward_inputs(tokenizer, prompts, responses, max_length)
    examples, start = [], 0
    for record in records:
        examples.append(RankingExample(tuple(ids[start : start + record.k])))
        start += record.k
    return examples


def rm_collate(examples: list[RankingExample], pad_id: int) -> dict[str, Tensor]:
    """The batch's distinct reward inputs in one right-padded tensor, and where each ranking's
    responses are among them.

    ``index[b, k]`` is the row of ranking ``b``'s k-th best response; ``mask`` marks real
    entries of rankings shorter than the longest one. A reward input that several rankings
    share (the same response to the same prompt) is one row, scored once.
    """
    from pmrlhf.data.text import pad_right

    rows: dict[tuple[int, ...], int] = {}
    width = max(len(e.responses) for e in examples)
    index = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, example in enumerate(examples):
        for k, ids in enumerate(example.responses):
            index[b, k] = rows.setdefault(tuple(ids), len(rows))
        mask[b, : len(example.responses)] = True
    input_ids, attention_mask = pad_right([list(ids) for ids in rows], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index, "mask": mask}


def _ranked_scores(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    from pmrlhf.score import reward_forward

    flat = reward_forward(model, batch["input_ids"], batch["attention_mask"]).float()
    mask = batch["mask"]
    return flat[batch["index"]].masked_fill(~mask, 0.0), mask


# --------------------------------------------------------------------------- evaluation
def _evaluate(model: Any, batches: Any, gather: Any, autocast: Any, bins: int) -> dict[str, Any]:
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    chunks: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    scores, mask = _ranked_scores(model, batch)
                chunks.append(gather(scores, mask))
    finally:
        model.train(was_training)
    width = max(s.shape[1] for s, _ in chunks)
    scores = torch.cat([F.pad(s.cpu(), (0, width - s.shape[1])) for s, _ in chunks])
    mask = torch.cat([F.pad(m.cpu(), (0, width - m.shape[1])) for _, m in chunks])
    return ranking_metrics(scores, mask, bins)


def evaluate_reward_model(
    model: Any,
    tokenizer: Any,
    records: Sequence[RankingRecord],
    max_length: int = 512,
    batch_size: int = 16,
    bins: int = 10,
) -> dict[str, Any]:
    """:func:`ranking_metrics` of a reward model on rankings or pairs, on one process."""
    from contextlib import nullcontext

    from pmrlhf.score import reward_pad_id

    examples = tokenize_rankings(tokenizer, records, max_length)
    pad = reward_pad_id(model, tokenizer)
    device = next(model.parameters()).device
    batches = (
        {k: v.to(device) for k, v in rm_collate(examples[i : i + batch_size], pad).items()}
        for i in range(0, len(examples), batch_size)
    )
    return _evaluate(model, batches, lambda s, m: (s, m), nullcontext, bins)


# --------------------------------------------------------------------------- training
def train_reward_model(
    config: RMConfig, resume: str | Path | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Train a scalar reward model on ``config.data``; returns the run's result dict.

    ``resume``: a checkpoint folder (``output_dir/checkpoint``) of an interrupted run with the
    same settings; training continues from it exactly (``allow_config_change`` accepts
    changed settings, with a warning naming them).

    Keys: ``model_dir`` (load it with :func:`pmrlhf.lora.load_scoring_model`, or
    :func:`pmrlhf.models.load_reward_model` when LoRA is off or merged), ``eval`` and
    ``eval_before`` (:func:`ranking_metrics`), ``steps``, ``train_loss``, ``n_train``,
    ``n_eval``, ``dropped_long_prompts``, ``metrics_file``, ``eval_file``, ``seconds``.
    """
    from functools import partial

    from pmrlhf.models import load_reward_model
    from pmrlhf.score import reward_pad_id
    from pmrlhf.training import (
        adapt_model,
        fit_and_save,
        quiet_transformers,
        start_run,
    )

    run = start_run(config, "rm", "ranking", resume, allow_config_change)
    checkpoint, accelerator, model_path, tokenizer, data = (
        run.checkpoint, run.accelerator, run.model_path, run.tokenizer, run.data
    )  # fmt: skip
    with quiet_transformers(config.quiet or not accelerator.is_main_process):
        model = load_reward_model(model_path, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pad = reward_pad_id(model, tokenizer)
    train_examples = tokenize_rankings(tokenizer, data.train, config.max_length)
    eval_examples = tokenize_rankings(tokenizer, data.eval, config.max_length)
    model = adapt_model(model, config, "seq_cls", base=model_path)

    def loss_fn(current: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores, mask = _ranked_scores(current, batch)
        loss = ranking_loss(scores, mask, config.loss)
        return loss, {"accuracy": _pairwise_accuracy(scores.detach(), mask)}

    def gather(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # rankings on different processes may differ in K: pad to a common width first
        scores = accelerator.pad_across_processes(scores, dim=1)
        mask = accelerator.pad_across_processes(mask, dim=1)
        return accelerator.gather_for_metrics((scores, mask))

    def evaluate(current: Any, loader: Any) -> dict[str, Any]:
        return _evaluate(current, loader, gather, accelerator.autocast, config.calibration_bins)

    with quiet_transformers(config.quiet or not accelerator.is_main_process):
        result = fit_and_save(
            config=config,
            accelerator=accelerator,
            model=model,
            tokenizer=tokenizer,
            data=data,
            train_examples=train_examples,
            eval_examples=eval_examples,
            collate=partial(rm_collate, pad_id=pad),
            loss_fn=loss_fn,
            evaluate=evaluate,
            name="rm",
            resume=checkpoint,
            groups=[r.prompt for r in data.train] if config.group_by_prompt else None,
        )
    if not config.quiet and accelerator.is_main_process:
        print(_summary(result))
    return result


def _summary(result: dict[str, Any]) -> str:
    lines = [f"rm: {result['steps']} steps on {result['n_train']} rankings"]
    after, before = result["eval"], result["eval_before"]
    if after is not None:
        acc = f"{after['pairwise_accuracy']:.3f}"
        if before is not None:
            acc = f"{before['pairwise_accuracy']:.3f} -> {acc}"
        lines.append(
            f"held-out pairwise accuracy {acc}, PL log-likelihood "
            f"{after['pl_log_likelihood']:.4f}, calibration error {after['calibration_error']:.3f} "
            f"({after['rankings']} rankings)"
        )
        lines.append("  predicted σ(Δr)  observed win rate  comparisons")
        for row in after["calibration"]:
            if row["count"]:
                lines.append(
                    f"  {row['low']:.1f}-{row['high']:.1f}: {row['mean_predicted']:.3f}"
                    f"            {row['observed_win_rate']:.3f}             {row['count']}"
                )
    lines.append(f"model: {result['model_dir']}  eval: {result['eval_file']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_resume_arguments(parser)
    add_config_arguments(parser, RMConfig)


def run(args: argparse.Namespace) -> int:
    train_reward_model(
        config_from_args(RMConfig, args),
        resume=args.resume,
        allow_config_change=args.allow_config_change,
    )
    return 0
