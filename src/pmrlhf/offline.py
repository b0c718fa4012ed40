"""Offline preference training: DPO and its preference-matching counterparts, PM and cPM.

Each loss reads the policy as a reward model through the optimum of an RLHF objective and
fits that implied reward to the comparisons by the Bradley–Terry–Luce likelihood, or to
rankings by the Plackett–Luce likelihood (BTL is its K = 2 case). With ``s(y)`` the implied
reward of response ``y`` (token log-probabilities summed over the response):

* ``dpo``: ``s = β (log π(y|x) − log π_ref(y|x))``, from the KL optimum ``π ∝ π_ref·exp(r/β)``;
* ``pm``: ``s = β log π(y|x)``, from the PM optimum ``π ∝ exp(r/β)``; no reference model;
* ``cpm``: ``s = β (log π(y|x) − log g(y))``, ``log g(y) = Σ_{t: π_ref(y_t|s_t) ≤ α} log
  π_ref(y_t|s_t)``, from the conditional-PM optimum ``π ∝ exp(r/β)·g``.

The fixed point of each loss is the matching closed form in :mod:`pmrlhf.theory` (see
docs/method.md §9). The reference model is loaded only for ``dpo`` and ``cpm``; its per-token
log-probabilities are computed in one pass over the data before training and kept with each
example. ``sft_weight`` adds the mean NLL per token of each ranking's best response.

Data: the reward model's data, prompt/chosen/rejected rows (also HH-RLHF and Dahoas layouts)
or prompt/responses rows ranked best first or with scores (docs/data-formats.md).

Examples:
  pmrlhf dpo --model runs/sft/model --data prefs.jsonl --loss dpo --beta 0.1
  pmrlhf dpo --config configs/dpo_example.yaml --set loss=cpm,beta=1,alpha=0.05
  pmrlhf dpo --config configs/dpo_example.yaml --resume runs/dpo/checkpoint   # after a crash
  accelerate launch -m pmrlhf dpo --config configs/dpo_example.yaml   # several processes
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmrlhf.config import add_config_arguments, add_resume_arguments, config_from_args, option
from pmrlhf.data.formats import RankingRecord
from pmrlhf.theory import pl_log_likelihood
from pmrlhf.training import TrainConfig

__all__ = [
    "OFFLINE_LOSSES",
    "OfflineConfig",
    "OfflineExample",
    "OfflineLoss",
    "add_arguments",
    "cpm_implied_reward",
    "dpo_implied_reward",
    "offline_collate",
    "pm_implied_reward",
    "preference_loss",
    "reference_token_logps",
    "run",
    "sequence_token_logps",
    "tokenize_offline",
    "train_offline",
]


# --------------------------------------------------------------------------- losses
def dpo_implied_reward(
    token_logps: Tensor, ref_token_logps: Tensor | None, mask: Tensor, beta: float, alpha: float
) -> Tensor:
    """``β Σ_t (log π − log π_ref)`` per response: the reward the KL optimum implies."""
    if ref_token_logps is None:
        raise ValueError("the dpo loss needs the reference model's token log-probabilities")
    return beta * ((token_logps - ref_token_logps) * mask).sum(-1)


def pm_implied_reward(
    token_logps: Tensor, ref_token_logps: Tensor | None, mask: Tensor, beta: float, alpha: float
) -> Tensor:
    """``β Σ_t log π`` per response: the reward the PM optimum implies (no reference)."""
    return beta * (token_logps * mask).sum(-1)


def cpm_implied_reward(
    token_logps: Tensor, ref_token_logps: Tensor | None, mask: Tensor, beta: float, alpha: float
) -> Tensor:
    """``β (Σ_t log π − log g)`` per response, ``log g`` summing log π_ref over the tokens the
    reference gives at most ``alpha``: the reward the conditional-PM optimum implies."""
    if ref_token_logps is None:
        raise ValueError("the cpm loss needs the reference model's token log-probabilities")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    # strict threshold, compared in log space as the RL engine does (docs/method.md §10)
    not_meaningful = mask.bool() & ~(ref_token_logps > math.log(alpha))
    log_g = torch.where(not_meaningful, ref_token_logps, torch.zeros_like(ref_token_logps))
    return beta * ((token_logps * mask).sum(-1) - log_g.sum(-1))


ImpliedReward = Callable[[Tensor, Tensor | None, Tensor, float, float], Tensor]


@dataclass(frozen=True)
class OfflineLoss:
    """One offline loss: the implied reward it fits, and whether it needs a reference model."""

    implied_reward: ImpliedReward
    needs_reference: bool
    fixed_point: str


OFFLINE_LOSSES: dict[str, OfflineLoss] = {
    "dpo": OfflineLoss(dpo_implied_reward, True, "π_ref·exp(r/β)"),
    "pm": OfflineLoss(pm_implied_reward, False, "exp(r/β)"),
    "cpm": OfflineLoss(cpm_implied_reward, True, "exp(r/β)·g"),
}


def preference_loss(scores: Tensor, mask: Tensor) -> Tensor:
    """Mean Plackett–Luce NLL of rankings of implied rewards, (B, K) best first; for K = 2
    it is the BTL loss ``−log σ(s_w − s_l)``."""
    return -pl_log_likelihood(scores, mask).mean()


# --------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class OfflineConfig(TrainConfig):
    """Settings of ``pmrlhf dpo``."""

    output_dir: str = option(
        "runs/dpo",
        help="run folder: model/ (final weights), checkpoint/ (the latest resumable state), "
        "metrics.jsonl, eval.json, config.yaml",
    )
    lr: float = option(1e-6, help="peak learning rate")
    epochs: int = option(1, help="passes over the training data (when max_steps is unset)")
    loss: str = option(
        "dpo",
        choices=list(OFFLINE_LOSSES),
        help="dpo: implied reward β(log π − log π_ref); pm: β log π (no reference); cpm: "
        "β(log π − log g), g the product of the reference's token probabilities ≤ alpha",
    )
    beta: float = option(0.1, help="β of the loss's RLHF objective (pm: 1 matches preferences)")
    alpha: float = option(
        0.05, help="cpm threshold: tokens the reference gives at most alpha enter g"
    )
    ref_model: str | None = option(
        None, help="reference model of dpo/cpm (default: model); pm loads none"
    )
    sft_weight: float = option(
        0.0,
        help="weight of an added NLL term (mean per token) on each ranking's best response; "
        "it moves the fixed point towards the distribution of preferred responses",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (_finite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not (_finite(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        if not (_finite(self.sft_weight) and self.sft_weight >= 0):
            raise ValueError(f"sft_weight must be a finite number >= 0, got {self.sft_weight!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class OfflineExample:
    """One ranking, best first: prompt + response ids of each response, where its response
    starts, and (for dpo/cpm) the reference's log-probability of each response token."""

    responses: tuple[list[int], ...]
    prompt_lens: tuple[int, ...]
    ref_logps: tuple[list[float], ...] | None = None


def tokenize_offline(
    tokenizer: Any, records: Sequence[RankingRecord], max_length: int
) -> tuple[list[OfflineExample], int]:
    """Examples of the rankings, each response tokenized as ``pmrlhf sft`` does (completion
    followed by EOS, cut to ``max_length``); also the count of rankings dropped because a
    prompt fills ``max_length`` and leaves a response no token."""
    from pmrlhf.data.text import encode_texts

    prompts = encode_texts(tokenizer, [r.prompt for r in records])
    flat = encode_texts(
        tokenizer, [resp for r in records for resp in r.responses], add_special_prefix=False
    )
    eos = tokenizer.eos_token_id
    examples, dropped, start = [], 0, 0
    for record, prompt in zip(records, prompts):
        ids, lens = [], []
        for completion in flat[start : start + record.k]:
            if eos is not None and (not completion or completion[-1] != eos):
                completion = [*completion, eos]
            ids.append((prompt + completion)[:max_length])
            lens.append(len(prompt))
        start += record.k
        if any(len(i) <= n for i, n in zip(ids, lens)):
            dropped += 1
            continue
        examples.append(OfflineExample(tuple(ids), tuple(lens)))
    return examples, dropped


def offline_collate(examples: list[OfflineExample], pad_id: int) -> dict[str, Tensor]:
    """Every response of the batch in one right-padded tensor, plus where each ranking's are.

    ``labels`` hold -100 on prompt and padding; ``index[b, k]`` is the row of ranking ``b``'s
    k-th best response and ``mask`` marks real entries; ``ref_logps`` (when cached) are the
    reference's log-probabilities aligned with ``labels[:, 1:]``.
    """
    from pmrlhf.data.text import pad_right

    flat = [ids for e in examples for ids in e.responses]
    starts = [n for e in examples for n in e.prompt_lens]
    input_ids, attention_mask = pad_right(flat, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, start in enumerate(starts):
        labels[row, :start] = -100
    width = max(len(e.responses) for e in examples)
    index = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    row = 0
    for b, example in enumerate(examples):
        k = len(example.responses)
        index[b, :k] = torch.arange(row, row + k)
        mask[b, :k] = True
        row += k
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": index,
        "mask": mask,
    }
    if examples[0].ref_logps is not None:
        ref = torch.zeros((len(flat), input_ids.shape[1] - 1), dtype=torch.float32)
        row = 0
        for example in examples:
            assert example.ref_logps is not None
            for start, values in zip(example.prompt_lens, example.ref_logps):
                ref[row, start - 1 : start - 1 + len(values)] = torch.tensor(values)
                row += 1
        batch["ref_logps"] = ref
    return batch


def sequence_token_logps(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token, (N, L − 1) zero elsewhere, and the label mask."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def reference_token_logps(
    model: Any, examples: Sequence[OfflineExample], pad_id: int, batch_size: int, device: Any
) -> list[OfflineExample]:
    """The examples with the reference's per-token log-probabilities of every response, from
    one pass over them without gradients."""
    from dataclasses import replace

    out: list[OfflineExample] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = list(examples[i : i + batch_size])
            batch = {k: v.to(device) for k, v in offline_collate(chunk, pad_id).items()}
            logps, _ = sequence_token_logps(model, batch)
            logps = logps.cpu()
            row = 0
            for example in chunk:
                values = []
                for ids, start in zip(example.responses, example.prompt_lens):
                    values.append(logps[row, start - 1 : len(ids) - 1].tolist())
                    row += 1
                out.append(replace(example, ref_logps=tuple(values)))
    return out


# --------------------------------------------------------------------------- scores, metrics
def _implied_scores(
    model: Any, batch: dict[str, Tensor], config: OfflineConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Implied rewards (B, K) best first, their mask, and the best responses' token
    log-probability sums and token counts."""
    token_logps, token_mask = sequence_token_logps(model, batch)
    spec = OFFLINE_LOSSES[config.loss]
    flat = spec.implied_reward(
        token_logps, batch.get("ref_logps"), token_mask.float(), config.beta, config.alpha
    )
    mask = batch["mask"]
    scores = flat[batch["index"]].masked_fill(~mask, 0.0)
    best = batch["index"][:, 0]
    return scores, mask, token_logps.sum(-1)[best], token_mask.sum(-1)[best].float()


def _pair_stats(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per ranking: pairs ordered right by the implied reward (ties half), pairs, margin sum."""
    k = mask.shape[-1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=mask.device), diagonal=1)
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2) & upper
    diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    right = ((diff > 0).float() + 0.5 * (diff == 0).float()) * pairs
    return right.sum((-1, -2)), pairs.sum((-1, -2)).float(), (diff * pairs).sum((-1, -2))


def _evaluate(model: Any, batches: Any, gather: Any, autocast: Any, config: OfflineConfig):
    was_training = model.training
    model.eval()
    rows: list[Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    scores, mask, best_logp, best_tokens = _implied_scores(model, batch, config)
                scores = scores.float()
                right, pairs, margin = _pair_stats(scores, mask)
                loglik = pl_log_likelihood(scores, mask)
                rows.append(gather(torch.stack([loglik, right, pairs, margin, best_logp,
                                                best_tokens], -1)))  # fmt: skip
    finally:
        model.train(was_training)
    total = torch.cat(rows).double()
    loglik, right, pairs, margin, best_logp, best_tokens = total.unbind(-1)
    n_pairs = max(float(pairs.sum()), 1.0)
    return {
        "rankings": int(total.shape[0]),
        "pairs": int(pairs.sum()),
        "loss": float(-loglik.mean()),
        "pairwise_accuracy": float(right.sum()) / n_pairs,
        "mean_margin": float(margin.sum()) / n_pairs,
        "best_response_nll": float(-best_logp.sum() / best_tokens.sum().clamp_min(1)),
    }


# --------------------------------------------------------------------------- training
def train_offline(
    config: OfflineConfig, resume: str | Path | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Train ``config.model`` on comparisons or rankings with ``config.loss``; returns the
    run's result dict (the keys of :func:`pmrlhf.sft.train_sft`, with ``eval`` holding the
    held-out loss, pairwise accuracy of the implied reward, mean margin and the best
    responses' NLL per token).

    ``resume``: a checkpoint folder (``output_dir/checkpoint``) of an interrupted run with the
    same settings; training continues from it exactly.
    """
    from functools import partial

    from pmrlhf.models import load_causal_lm
    from pmrlhf.training import (
        adapt_model,
        fit_and_save,
        quiet_transformers,
        resolve_model_path,
        start_run,
    )

    run = start_run(config, "dpo", "ranking", resume, allow_config_change)
    checkpoint, accelerator, model_path, tokenizer, data = (
        run.checkpoint, run.accelerator, run.model_path, run.tokenizer, run.data
    )  # fmt: skip
    spec = OFFLINE_LOSSES[config.loss]
    quiet = config.quiet or not accelerator.is_main_process
    pad = tokenizer.pad_token_id
    train_examples, dropped = tokenize_offline(tokenizer, data.train, config.max_length)
    eval_examples, _ = tokenize_offline(tokenizer, data.eval, config.max_length)
    if dropped and accelerator.is_main_process:
        import warnings

        warnings.warn(
            f"{config.data}: dropped {dropped} rankings with a prompt that fills max_length "
            f"({config.max_length} tokens), leaving a response no token to compare",
            UserWarning,
            stacklevel=2,
        )
    if spec.needs_reference:
        ref_path = resolve_model_path(config.ref_model or config.model)
        with quiet_transformers(quiet):
            ref = load_causal_lm(ref_path, dtype=torch.float32).to(accelerator.device)
        size = config.eval_batch_size or config.batch_size
        train_examples = reference_token_logps(ref, train_examples, pad, size, accelerator.device)
        eval_examples = reference_token_logps(ref, eval_examples, pad, size, accelerator.device)
        del ref
    with quiet_transformers(quiet):
        model = load_causal_lm(model_path, dtype=torch.float32)
    model = adapt_model(model, config, "causal_lm", base=model_path)

    def loss_fn(current: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores, mask, best_logp, best_tokens = _implied_scores(current, batch, config)
        loss = preference_loss(scores, mask)
        right, pairs, margin = _pair_stats(scores.detach(), mask)
        n_pairs = pairs.sum().clamp_min(1)
        stats = {"accuracy": right.sum() / n_pairs, "margin": margin.sum() / n_pairs}
        if config.sft_weight > 0:
            nll = -best_logp.sum() / best_tokens.sum().clamp_min(1)
            loss = loss + config.sft_weight * nll
            stats["sft_nll"] = nll.detach()
        return loss, stats

    def evaluate(current: Any, loader: Any) -> dict[str, Any]:
        return _evaluate(current, loader, accelerator.gather_for_metrics, accelerator.autocast,
                         config)  # fmt: skip

    with quiet_transformers(quiet):
        result = fit_and_save(
            config=config,
            accelerator=accelerator,
            model=model,
            tokenizer=tokenizer,
            data=data,
            train_examples=train_examples,
            eval_examples=eval_examples,
            collate=partial(offline_collate, pad_id=pad),
            loss_fn=loss_fn,
            evaluate=evaluate,
            name="dpo",
            resume=checkpoint,
        )
    if not config.quiet and accelerator.is_main_process:
        print(_summary(config, result))
    return result


def _summary(config: OfflineConfig, result: dict[str, Any]) -> str:
    lines = [
        f"dpo --loss {config.loss} (β={config.beta:g}, fixed point ∝ "
        f"{OFFLINE_LOSSES[config.loss].fixed_point}): {result['steps']} steps on "
        f"{result['n_train']} rankings"
    ]
    after, before = result["eval"], result["eval_before"]
    if after is not None:
        acc = f"{after['pairwise_accuracy']:.3f}"
        if before is not None:
            acc = f"{before['pairwise_accuracy']:.3f} -> {acc}"
        lines.append(
            f"held-out pairwise accuracy of the implied reward {acc}, loss {after['loss']:.4f}, "
            f"best-response NLL/token {after['best_response_nll']:.4f} "
            f"({after['rankings']} rankings)"
        )
    lines.append(f"model: {result['model_dir']}  eval: {result['eval_file']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_resume_arguments(parser)
    add_config_arguments(parser, OfflineConfig)


def run(args: argparse.Namespace) -> int:
    train_offline(
        config_from_args(OfflineConfig, args),
        resume=args.resume,
        allow_config_change=args.allow_config_change,
    )
    return 0
