"""Prompt-length buckets for compiled static-cache decoding.

With ``cache_implementation="static"``, Hugging Face ``generate`` allocates a key/value cache of
``prompt_length + max_new_tokens`` positions (transformers 5.23 keeps the longest length seen so
far on the model) and runs every decoding step through one ``torch.compile``'d forward whose
shapes include that cache length. A batch whose padded prompts are longer than any before is
therefore a new shape for the compiled decoder: a full recompile under static-shape compilation
(``dynamic=False``; past dynamo's recompile limit, a silent fall-back to eager decoding), and a
new CUDA-graph recording under HF's default ``reduce-overhead`` mode (whose automatic dynamic
shapes bound the recompiles themselves to about two). In random order that happens about
ln(steps) times; in length-sorted or length-grouped batches, or with a transformers version that
sizes the cache per call, on every new length.

:func:`pad_to_bucket` left-pads a batch to a bucketed length so that the number of distinct
shapes is bounded by the number of buckets, whatever the prompts and their order. The extra columns are padding
with attention mask 0. Position ids are derived from the attention mask (by ``generate`` and by
:func:`pmrlhf.rl.rollout.token_logprobs` alike), so every real token keeps its position and
attends to the same keys: the next-token distributions, hence the sampled distribution, are
unchanged.

Buckets are powers of two, at least ``minimum`` (16) tokens: 16, 32, 64, ..., 2048. This keeps
the number of shapes logarithmic in the longest prompt: prompts of up to 2048 tokens need at most
8 buckets, which is within dynamo's default recompile limit (8), so no bucket ever falls back to
eager decoding. The price is padding: at most twice the prompt length. Padding costs one eager
prefill over the extra columns and, in each decoding step, attention over those cache slots;
the step's weight reads, which dominate decoding, do not depend on it. Every bucket is a
multiple of 16, a shape that tensor-core kernels handle without remainder tiles. Pass
``multiple`` for linear buckets (the next multiple of ``multiple``) when less padding matters
more than fewer shapes, and ``maximum`` to cap the bucket (a prompt longer than the cap keeps
its own length).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_MINIMUM = 16


def bucket_length(
    n: int, multiple: int | None = None, minimum: int = DEFAULT_MINIMUM, maximum: int | None = None
) -> int:
    """The padded length for a batch whose longest prompt has ``n`` tokens.

    Powers of two from ``minimum`` up by default, or the next multiple of ``multiple``. Never
    less than ``n``; never more than ``max(n, maximum)`` when ``maximum`` is given.
    """
    if n < 0:
        raise ValueError(f"bucket_length: prompt length must be >= 0, got {n}")
    if minimum < 1:
        raise ValueError(f"bucket_length: minimum must be >= 1, got {minimum}")
    if multiple is not None:
        if multiple < 1:
            raise ValueError(f"bucket_length: multiple must be >= 1, got {multiple}")
        length = max(minimum, -(-n // multiple) * multiple)
    else:
        length = max(minimum, 1 << max(0, n - 1).bit_length())
    if maximum is not None:
        length = min(length, max(n, maximum))
    return length


def bucket_lengths(
    max_length: int,
    multiple: int | None = None,
    minimum: int = DEFAULT_MINIMUM,
    maximum: int | None = None,
) -> list[int]:
    """Every distinct bucket that prompts of 1..``max_length`` tokens can fall into, ascending."""
    seen = {bucket_length(n, multiple, minimum, maximum) for n in range(1, max_length + 1)}
    return sorted(seen)


def pad_to_bucket(
    input_ids: Tensor,
    attention_mask: Tensor,
    pad_id: int,
    multiple: int | None = None,
    minimum: int = DEFAULT_MINIMUM,
    maximum: int | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Left-pad a left-padded batch ``(B, P)`` to ``(B, bucket_length(P))``.

    Returns ``(input_ids, attention_mask, added)``, where ``added`` is the number of padding
    columns put in front; ``sequences[:, added:]`` turns anything generated from the bucketed
    batch back into the layout of the original one.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            "pad_to_bucket: input_ids and attention_mask must both be (batch, length), got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    length = input_ids.shape[1]
    if length and not bool(attention_mask[:, -1].bool().all()):
        raise ValueError(
            "pad_to_bucket: prompts must be left-padded (the last column of attention_mask is "
            "all ones); load the tokenizer with padding_side='left'"
        )
    added = bucket_length(length, multiple, minimum, maximum) - length
    if added == 0:
        return input_ids, attention_mask, 0
    batch = input_ids.shape[0]
    pad_ids = torch.full((batch, added), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    pad_mask = torch.zeros((batch, added), dtype=attention_mask.dtype, device=input_ids.device)
    return (
        torch.cat([pad_ids, input_ids], dim=1),
        torch.cat([pad_mask, attention_mask], dim=1),
        added,
    )
