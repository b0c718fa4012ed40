"""Score every response of a dataset with a trained reward model.

Reads any supported data file or hub dataset (listwise ``responses``, pairwise
``chosen``/``rejected`` including HH-RLHF and Dahoas rows, or SFT ``completion``s) and writes
one JSON line per input row:

    {"row": "data.jsonl, line 1", "prompt": "...", "responses": ["...", "..."],
     "rewards": [1.23, -0.45]}

Rewards are the model's raw, unclipped scalar scores. Responses keep their ranked order
(best first) for ranked data, and chosen-then-rejected order for pairs.

Example:
  pmrlhf score --model runs/rm/model --data prefs.jsonl --out scores.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "add_arguments",
    "check_output_file",
    "empty_responses",
    "encode_reward_inputs",
    "reward_forward",
    "reward_input_text",
    "reward_pad_id",
    "run",
    "score_file",
    "score_texts",
]


def reward_input_text(prompt: str, response: str) -> str:
    """The one text a reward model reads for (prompt, response), in training and scoring alike.

    The response follows the prompt directly; a single space is put between them only when
    neither side has whitespace at the join, so that the last prompt word and the first
    response word do not fuse into one token (``"Q:" + "yes"`` -> ``"Q: yes"``, while HH-RLHF
    ``"…Assistant:" + " Sure"`` stays as it is).
    """
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return prompt + " " + response
    return prompt + response


def encode_reward_inputs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None = None,
) -> list[list[int]]:
    """Token ids of each reward input, cut to ``max_length`` tokens from the right."""
    from pmrlhf.data.text import encode_texts

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ids = encode_texts(tokenizer, [reward_input_text(p, r) for p, r in zip(prompts, responses)])
    if max_length is not None:
        ids = [x[:max_length] for x in ids]
    return ids


def empty_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[int]:
    """Indices of the pairs whose response has no token left after the cut to ``max_length``.

    A response is cut away when the tokens it shares with its prompt-only encoding (the prompt,
    and BOS) already fill ``max_length``; the reward of such a pair sees only the prompt.
    """
    from pmrlhf.data.text import encode_texts

    full = encode_reward_inputs(tokenizer, prompts, responses)
    alone = encode_texts(tokenizer, list(prompts))
    out = []
    for i, (ids, prompt_ids) in enumerate(zip(full, alone)):
        shared = 0
        for a, b in zip(ids, prompt_ids):
            if a != b:
                break
            shared += 1
        if len(ids) > max_length and shared >= max_length:
            out.append(i)
    return out


def check_output_file(path: str | Path, option_name: str = "--out") -> Path:
    """Fail early, before any work, when ``path`` cannot be written as a file.

    A folder at ``path``, or a file where one of its parent folders should be, raises
    ValueError naming ``option_name``.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{option_name} {str(path)!r} is a folder; give a file path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"{option_name} {str(path)!r}: {str(parent)!r} is a file, not a folder"
                )
            break
    return out


def reward_pad_id(model: Any, tokenizer: Any) -> int:
    """The pad id the model's last-token pooling skips (its config's, else the tokenizer's)."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the reward model and its tokenizer define no pad token")
    return int(pad)


def reward_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Scalar rewards (N,) read at each sequence's last non-pad token (right padding)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0]


def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reward of each (prompt, response) pair as a float32 CPU tensor of shape (N,).

    ``model`` is a scalar reward model (``AutoModelForSequenceClassification`` with one label,
    or a peft wrapper of one). Inputs are joined by :func:`reward_input_text`, sorted by
    length so batches carry little padding, and scored under ``torch.inference_mode``; the
    model's train/eval mode is restored afterwards.
    """
    from pmrlhf.data.text import pad_right

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    ids = encode_reward_inputs(tokenizer, prompts, responses, max_length)
    if not ids:
        return torch.zeros(0, dtype=torch.float32)
    pad = reward_pad_id(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out = torch.empty(len(ids), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids, mask = pad_right([ids[i] for i in chunk], pad)
                scores = reward_forward(model, input_ids.to(device), mask.to(device))
                out[torch.as_tensor(chunk)] = scores.float().cpu()
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="reward model: a folder written by `pmrlhf rm` (full model or LoRA adapter) or a hub id",
    )
    parser.add_argument(
        "--data", required=True, help="data file (.jsonl/.json/.parquet/.csv) or hub dataset name"
    )
    parser.add_argument("--out", required=True, type=Path, help="output JSON Lines file")
    parser.add_argument(
        "--split", default=None, help="hub split or slice to read, e.g. test[:500] (default: train)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="texts per forward pass (default: 16)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="tokens per prompt+response; longer inputs are cut from the right (default: 512)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto: cuda if present)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights dtype (default: auto: bf16 on a GPU that supports it, fp32 elsewhere)",
    )


def score_file(
    model_path: str,
    data: str,
    out: str | Path,
    split: str | None = None,
    batch_size: int = 16,
    max_length: int | None = 512,
    device: str = "auto",
    dtype: str = "auto",
) -> int:
    """Score every row of ``data`` and write one JSON line per row to ``out``; returns rows.

    Every option is checked before anything is loaded. Non-finite rewards raise ValueError
    naming the row and nothing is written; responses cut away entirely by ``max_length`` are
    reported with a warning.
    """
    import warnings

    from pmrlhf.data import load_scoring_records
    from pmrlhf.lora import load_scoring_model
    from pmrlhf.models import check_device, load_tokenizer, resolve_model_location
    from pmrlhf.optim import compute_dtype

    if max_length is not None and max_length < 1:
        raise ValueError(f"--max-length must be at least 1 token, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out = check_output_file(out)
    device = check_device(device)
    resolve_model_location(model_path, "--model")
    tokenizer = load_tokenizer(model_path, option_name="--model")
    records = load_scoring_records(data, tokenizer, split=split)
    model = load_scoring_model(model_path, dtype=compute_dtype(dtype, device), device=device)
    prompts = [r.prompt for r in records for _ in r.responses]
    responses = [resp for r in records for resp in r.responses]
    owner = [(where, j) for r, where in zip(records, records.locations) for j in range(r.k)]
    if max_length is not None:
        cut = empty_responses(tokenizer, prompts, responses, max_length)
        if cut:
            where, j = owner[cut[0]]
            warnings.warn(
                f"{len(cut)} of {len(responses)} responses have no tokens left after the cut "
                f"to --max-length {max_length} (the first: {where}, response {j}); their "
                "rewards see only the prompt",
                UserWarning,
                stacklevel=2,
            )
    scores = score_texts(model, tokenizer, prompts, responses, batch_size, max_length)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        where, j = owner[bad[0]]
        raise ValueError(
            f"--model {model_path}: {len(bad)} of {len(responses)} rewards are not finite (the "
            f"first, {scores[bad[0]].item()}, for {where}, response {j}); nothing was written"
        )
    rewards = scores.tolist()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    position = 0
    with tmp.open("w") as f:
        for record, where in zip(records, records.locations):
            values = rewards[position : position + record.k]
            position += record.k
            line = {
                "row": where,
                "prompt": record.prompt,
                "responses": list(record.responses),
                "rewards": values,
            }
            f.write(json.dumps(line) + "\n")
    tmp.replace(out)  # a half-written file never takes the output's name
    return len(records)


def run(args: argparse.Namespace) -> int:
    rows = score_file(
        args.model,
        args.data,
        args.out,
        split=args.split,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
    )
    print(f"scored {rows} rows -> {args.out}")
    return 0
