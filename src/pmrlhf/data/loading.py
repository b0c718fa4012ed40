"""Read, split, validate and filter a dataset into records, all before any training starts.

``load_sft_records(source, tokenizer)`` and its siblings run the whole pipeline:

1. read the rows (:func:`pmrlhf.data.readers.read_table`);
2. keep one stage of the deterministic SFT/RM/RL split if ``subset`` asks for it;
3. parse and check every row (a bad row raises ValueError naming file, row and field);
4. drop rows whose prompt is longer than ``max_prompt_tokens`` tokens, with a warning that
   says how many (the paper's limit is 256; needs a tokenizer).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pmrlhf.data.formats import (
    DataError,
    PairRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    parse_rows,
)
from pmrlhf.data.readers import read_table
from pmrlhf.data.splits import PAPER_FRACTIONS, PAPER_SEED, subset_indices
from pmrlhf.data.text import ChatRenderer, encode_texts

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "RecordSet",
    "check_token_duplicates",
    "drop_long_prompts",
    "load_pairs",
    "load_prompts",
    "load_rankings",
    "load_scoring_records",
    "load_sft_records",
    "read_records",
]

DEFAULT_MAX_PROMPT_TOKENS = 256  # the paper's prompt limit
R = TypeVar("R")


@dataclass
class RecordSet(Sequence[R]):
    """Parsed records (a sequence) plus what happened on the way.

    ``rows``: rows read after the stage split; ``dropped``: rows dropped for a too-long
    prompt; ``locations[i]``: the file and row record ``i`` came from.
    """

    records: list[R]
    source: str
    rows: int
    dropped: int = 0
    locations: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)


def read_records(
    source: str | os.PathLike,
    kind: str,
    tokenizer: Any = None,
    *,
    split: str | None = None,
    subset: str = "all",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    seed: int = PAPER_SEED,
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
) -> RecordSet[Any]:
    """Records of one ``kind`` (``prompt``, ``sft``, ``pair``, ``ranking`` or ``score``).

    ``tokenizer`` renders chat messages with its chat template (if it has one) and measures
    prompt length; without it, chats use the HH-RLHF layout and no prompt is dropped.
    ``split`` is the hub split or slice to read; ``subset`` picks ``all`` rows or one stage
    (``sft``, ``rm``, ``rl``) of the split given by ``fractions`` and ``seed``.
    """
    table = read_table(source, split)
    indices = subset_indices(len(table), subset, fractions, seed)
    rows = table.row_values(indices if subset != "all" else None)
    where = [table.where(i) for i in indices]
    records = parse_rows(rows, where, kind, ChatRenderer(tokenizer))
    if tokenizer is not None and kind in ("pair", "ranking"):
        check_token_duplicates(records, where, tokenizer)
    result: RecordSet[Any] = RecordSet(records, table.source, rows=len(records), locations=where)
    if tokenizer is not None and max_prompt_tokens is not None:
        result = drop_long_prompts(result, tokenizer, max_prompt_tokens)
    if not result.records:
        raise ValueError(f"{table.source}: no rows to use (subset {subset!r} is empty)")
    return result


def check_token_duplicates(records: Sequence[Any], where: Sequence[str], tokenizer: Any) -> None:
    """Reject a pair or ranking two of whose responses tokenize to the same ids.

    Different strings can be the same token sequence (whitespace a tokenizer drops, words it
    maps to one unknown token); a model cannot prefer one of them over the other, so such
    responses count as duplicates. Raises DataError naming the row and the two items.
    """
    texts: list[str] = []
    for record in records:
        texts.extend(_responses(record))
    ids = encode_texts(tokenizer, texts, add_special_prefix=False)
    position = 0
    for record, location in zip(records, where):
        responses = _responses(record)
        seen: dict[tuple[int, ...], int] = {}
        for i in range(len(responses)):
            key = tuple(ids[position + i])
            if key in seen:
                j = seen[key]
                if isinstance(record, PairRecord):
                    field, problem = "rejected", "tokenizes to the same tokens as 'chosen'"
                else:
                    field, problem = "responses", f"items {j} and {i} tokenize to the same tokens"
                raise DataError(
                    f"{location}, field {field!r}: {problem} ({len(key)} tokens: "
                    f"{responses[j]!r} and {responses[i]!r}); the model cannot tell them apart"
                )
            seen[key] = i
        position += len(responses)


def _responses(record: Any) -> tuple[str, ...]:
    if isinstance(record, PairRecord):
        return (record.chosen, record.rejected)
    return record.responses


def drop_long_prompts(records: RecordSet[R], tokenizer: Any, max_tokens: int) -> RecordSet[R]:
    """Drop records whose prompt has more than ``max_tokens`` tokens, warning with the count."""
    prompts = [r.prompt for r in records.records]  # type: ignore[attr-defined]
    lengths = [len(ids) for ids in encode_texts(tokenizer, prompts)]
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    dropped = len(prompts) - len(keep)
    if dropped == 0:
        return records
    if not keep:
        raise ValueError(
            f"{records.source}: all {len(prompts)} prompts are longer than {max_tokens} tokens "
            f"(the longest has {max(lengths)}); raise max_prompt_tokens to keep them"
        )
    warnings.warn(
        f"{records.source}: dropped {dropped} of {len(prompts)} rows whose prompt is longer "
        f"than {max_tokens} tokens",
        UserWarning,
        stacklevel=3,
    )
    return RecordSet(
        [records.records[i] for i in keep],
        records.source,
        rows=records.rows,
        dropped=records.dropped + dropped,
        locations=[records.locations[i] for i in keep] if records.locations else [],
    )


def load_prompts(
    source: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
) -> RecordSet[PromptRecord]:
    """Prompts for RL (see :func:`read_records` for the keyword arguments)."""
    return read_records(source, "prompt", tokenizer, **kwargs)


def load_sft_records(
    source: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
) -> RecordSet[SFTRecord]:
    """Prompt/completion demonstrations (see :func:`read_records`)."""
    return read_records(source, "sft", tokenizer, **kwargs)


def load_pairs(
    source: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
) -> RecordSet[PairRecord]:
    """Pairwise comparisons (see :func:`read_records`)."""
    return read_records(source, "pair", tokenizer, **kwargs)


def load_rankings(
    source: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
) -> RecordSet[RankingRecord]:
    """Rankings, best first; pairwise rows become rankings with K = 2 (see :func:`read_records`)."""
    return read_records(source, "ranking", tokenizer, **kwargs)


def load_scoring_records(
    source: str | os.PathLike, tokenizer: Any = None, **kwargs: Any
) -> RecordSet[RankingRecord]:
    """Every row's responses, as given, for scoring; no prompt is dropped unless asked."""
    kwargs.setdefault("max_prompt_tokens", None)
    return read_records(source, "score", tokenizer, **kwargs)
