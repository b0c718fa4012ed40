"""Datasets: readers, the four record formats, validation and the SFT/RM/RL split.

Typical use::

    from pmrlhf.data import load_rankings
    rankings = load_rankings("prefs.jsonl", tokenizer, subset="rm")  # RankingRecord, best first

Formats and their accepted layouts are documented in ``docs/data-formats.md`` and in
:mod:`pmrlhf.data.formats`.
"""

from pmrlhf.data.formats import (
    DataError,
    PairRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    parse_pair,
    parse_prompt,
    parse_ranking,
    parse_scored,
    parse_sft,
    split_hh,
)
from pmrlhf.data.loading import (
    DEFAULT_MAX_PROMPT_TOKENS,
    RecordSet,
    drop_long_prompts,
    load_pairs,
    load_prompts,
    load_rankings,
    load_scoring_records,
    load_sft_records,
    read_records,
)
from pmrlhf.data.readers import Table, load_records, read_table
from pmrlhf.data.splits import (
    PAPER_FRACTIONS,
    PAPER_SEED,
    STAGES,
    holdout_indices,
    split_indices,
    subset_indices,
)
from pmrlhf.data.text import ChatRenderer, encode_texts, pad_right, special_prefix_ids

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "PAPER_FRACTIONS",
    "PAPER_SEED",
    "STAGES",
    "ChatRenderer",
    "DataError",
    "PairRecord",
    "PromptRecord",
    "RankingRecord",
    "RecordSet",
    "SFTRecord",
    "Table",
    "drop_long_prompts",
    "encode_texts",
    "holdout_indices",
    "load_pairs",
    "load_prompts",
    "load_rankings",
    "load_records",
    "load_scoring_records",
    "load_sft_records",
    "pad_right",
    "parse_pair",
    "parse_prompt",
    "parse_ranking",
    "parse_scored",
    "parse_sft",
    "read_records",
    "read_table",
    "special_prefix_ids",
    "split_hh",
    "split_indices",
    "subset_indices",
]
