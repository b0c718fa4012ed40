"""Prompt-length buckets: bounded shapes, and the same next-token distributions as without them."""

from __future__ import annotations

import pytest
import torch

from pmrlhf.models import load_causal_lm, load_tokenizer
from pmrlhf.rl.decoding import bucket_length, bucket_lengths, pad_to_bucket
from pmrlhf.rl.rollout import position_ids_from_mask

PROMPTS = [
    "Which drink do you prefer ?",
    "I like summer best . Which season do you like best ?",
    "tea",
]


def test_power_of_two_buckets():
    assert [bucket_length(n) for n in (0, 1, 15, 16, 17, 31, 32, 33, 100, 2048)] == [
        16, 16, 16, 16, 32, 32, 32, 64, 128, 2048,
    ]  # fmt: skip
    assert bucket_length(3, minimum=1) == 4 and bucket_length(5, minimum=4) == 8


def test_linear_buckets_and_cap():
    assert [bucket_length(n, multiple=16) for n in (1, 16, 17, 40)] == [16, 16, 32, 48]
    assert bucket_length(70, maximum=80) == 80  # 128, capped
    assert bucket_length(90, maximum=80) == 90  # never shorter than the prompt
    for n in range(1, 300):
        assert bucket_length(n) >= n and bucket_length(n) % 16 == 0


def test_number_of_buckets_is_logarithmic():
    # up to 2048 tokens: 16, 32, ..., 2048 — within dynamo's default recompile limit of 8
    assert bucket_lengths(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert len(bucket_lengths(256, multiple=16)) == 16


def test_bucket_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prompt length"):
        bucket_length(-1)
    with pytest.raises(ValueError, match="multiple"):
        bucket_length(3, multiple=0)


def test_pad_to_bucket_adds_masked_padding_in_front():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    new_ids, new_mask, added = pad_to_bucket(ids, mask, pad_id=0, minimum=8)
    assert added == 5 and new_ids.shape == (2, 8) and new_mask.shape == (2, 8)
    assert torch.equal(new_ids[:, added:], ids) and torch.equal(new_mask[:, added:], mask)
    assert not new_mask[:, :added].any() and (new_ids[:, :added] == 0).all()
    # real tokens keep their positions
    assert torch.equal(position_ids_from_mask(new_mask)[:, added:], position_ids_from_mask(mask))
    same = pad_to_bucket(new_ids, new_mask, pad_id=0, minimum=8)
    assert same[2] == 0 and same[0] is new_ids


def test_pad_to_bucket_rejects_right_padding():
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        pad_to_bucket(ids, torch.tensor([[1, 1, 0]]), pad_id=0)


def _encode(tokenizer, prompts):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    return encoded.input_ids, encoded.attention_mask


def test_bucketed_prompts_give_the_same_next_token_logits(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    ids, mask = _encode(tokenizer, PROMPTS)
    padded_ids, padded_mask, added = pad_to_bucket(ids, mask, tokenizer.pad_token_id)
    assert added > 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        bucketed = model(
            input_ids=padded_ids,
            attention_mask=padded_mask,
            position_ids=position_ids_from_mask(padded_mask),
        )
    real = mask.bool()
    torch.testing.assert_close(
        bucketed.logits[:, added:][real], plain.logits[real], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_bucketed_generate_samples_the_same_tokens(tiny_model_dir, cache):
    """HF generate (position ids from the mask) on a bucketed batch: same logits at every step,
    hence, with the same seed, the same samples."""
    from transformers import GenerationConfig

    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    ids, mask = _encode(tokenizer, PROMPTS)
    padded_ids, padded_mask, added = pad_to_bucket(ids, mask, tokenizer.pad_token_id)
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=6,
        min_new_tokens=6,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        cache_implementation=cache,
        return_dict_in_generate=True,
        output_logits=True,
    )
    runs = []
    for input_ids, attention_mask in ((ids, mask), (padded_ids, padded_mask)):
        torch.manual_seed(0)
        runs.append(
            model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
        )
    plain, bucketed = runs
    for a, b in zip(plain.logits, bucketed.logits, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert torch.equal(bucketed.sequences[:, added:], plain.sequences)
