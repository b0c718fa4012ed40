"""Shared fixtures: tiny local models (no network) built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXTS = [
    "Which season do you like best ?",
    "Which drink do you prefer ?",
    "I like summer best . I like winter best . I like spring best .",
    "I prefer tea . I prefer coffee . I prefer water .",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 64) with a word tokenizer, saved to disk."""
    from pmrlhf.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TINY_TEXTS, seed=0)
