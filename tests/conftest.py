"""Shared fixtures: tiny local models (no network) built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are fastest on one thread, and one thread does not stall when cores are shared.
torch.set_num_threads(1)

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


def fit_tiny_world_model(folder):
    """A tiny model on the default world's vocabulary after 40 SFT steps on the valid answers of
    one held-out prompt: it answers validly most of the time, and its slips are unlikely tokens.
    Saved to ``folder``; returns ``(world, tokenizer, policy, prompt, folder)``."""
    from pmrlhf import models
    from pmrlhf.world import default_world

    world = default_world()
    model_dir = models.build_tiny_model(folder, world.vocabulary(), seed=3)
    tokenizer = models.load_tokenizer(str(model_dir))
    policy = models.load_causal_lm(str(model_dir))
    prompt = world.eval_prompts()[0]
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    texts = [f"{prompt} {text}{tokenizer.eos_token}" for _, text in world.valid_sequences(prompt)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(40):
        loss = policy(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    policy.save_pretrained(model_dir)
    return world, tokenizer, policy, prompt, model_dir


def two_process_launch(*args: str) -> tuple[list[str], dict[str, str]]:
    """An ``accelerate launch`` command and environment for a real two-process CPU run.

    accelerate 1.15's ``--cpu`` flag starts a single process; ``--multi_gpu`` starts two
    torchrun workers, which fall back to gloo on the CPU when no GPU is visible.
    """
    import sys
    from pathlib import Path

    launcher = str(Path(sys.executable).with_name("accelerate"))
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    return command, env
