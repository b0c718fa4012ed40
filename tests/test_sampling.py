"""The lean decoder samples exactly the distribution Hugging Face ``generate`` samples."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_tiny_world_model
from test_rollout import PROMPT, assert_same_distribution, next_token_probs

from pmrlhf.models import load_causal_lm, load_tokenizer
from pmrlhf.rl.rollout import (
    DECODERS,
    generate,
    resolve_decoder,
    response_mask_from_ids,
    token_logprobs,
)
from pmrlhf.rl.sampling import SamplingSettings, decode, next_token_logits, sample_categorical

PROMPTS = ["Which drink do you prefer ?", "Which season do you like best ?", "I like tea ."]


def hf_processed(logits, temperature=1.0, top_k=0, top_p=1.0, blocked=None, new_tokens=0):
    """The same settings through transformers' own logits processors, in generate's order."""
    from transformers.generation import logits_process as lp

    steps: list = []
    if blocked is not None:
        steps.append(lp.MinNewTokensLengthLogitsProcessor(0, new_tokens + 1, blocked))
    if temperature != 1.0:
        steps.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        steps.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        steps.append(lp.TopPLogitsWarper(top_p))
    ids = torch.zeros((logits.shape[0], new_tokens), dtype=torch.long)
    scores = logits.float()
    for step in steps:
        scores = step(ids, scores)
    return scores


SETTINGS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(top_p=0.3, temperature=1.5),
    dict(top_k=20, top_p=0.9, temperature=0.5),
    dict(top_p=0.999),
]


@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain"
)
def test_next_token_distribution_equals_transformers_processors(settings):
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    logits[3, :10] = 4.0  # ties at the top-k and top-p boundaries
    ours = torch.softmax(next_token_logits(logits, **settings), -1)
    theirs = torch.softmax(hf_processed(logits, **settings), -1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_blocked_tokens_and_allowed_set():
    torch.manual_seed(1)
    logits = torch.randn(4, 12)
    eos = torch.tensor([2, 5])
    ours = next_token_logits(logits, blocked=eos)
    theirs = hf_processed(logits, blocked=[2, 5], new_tokens=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[1, 2, 7]] = True
    probs = torch.softmax(next_token_logits(logits, allowed=allowed, blocked=eos), -1)
    assert set(probs.nonzero()[:, 1].tolist()) == {1, 7}
    expected = torch.softmax(logits[:, [1, 7]], -1)
    torch.testing.assert_close(probs[:, [1, 7]], expected)


def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.25, 0.05])
    generator = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.expand(40_000, -1), generator)
    counts = torch.bincount(draws, minlength=probs.numel())
    assert counts[1] == 0 and counts[3] == 0  # zero probability is never drawn
    assert_same_distribution(counts, probs.double())
    # unnormalised rows (masked softmax remainders) are normalised by their own sum
    draws = sample_categorical((probs * 3).expand(40_000, -1), generator)
    assert_same_distribution(torch.bincount(draws, minlength=probs.numel()), probs.double())


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A fitted tiny model and prompts of several lengths, whose answers end at different steps."""
    world, tokenizer, policy, fitted, _ = fit_tiny_world_model(tmp_path_factory.mktemp("world"))
    prompts = sorted(set(world.eval_prompts() + world.train_prompts()), key=len)
    chosen = [prompts[0], fitted, prompts[-1]]
    assert len({len(tokenizer(p).input_ids) for p in chosen}) > 1
    return world, tokenizer, policy, chosen


@pytest.mark.parametrize("repeats", [1, 3])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_a_single_allowed_path_gives_identical_rollouts_with_both_decoders(
    world_model, stop_at_eos, repeats
):
    """top_k=1 leaves one token per step: both decoders must then return the same rollout,
    for prompts of different lengths (left padding, positions), rows that end early, and
    repeated prompts (whose prefill the lean decoder shares)."""
    _, tokenizer, model, prompts = world_model
    prompts = [p for p in prompts for _ in range(repeats)]
    rollouts = {
        name: generate(
            model, tokenizer, prompts, max_new_tokens=9, top_k=1, stop_at_eos=stop_at_eos,
            decoder=name,
        )
        for name in DECODERS
    }  # fmt: skip
    hf, lean = rollouts["hf"], rollouts["lean"]
    if stop_at_eos:
        lengths = hf.response_mask.sum(1)
        assert int(lengths.min()) < int(lengths.max())
    assert torch.equal(hf.sequences, lean.sequences)
    assert torch.equal(hf.attention_mask, lean.attention_mask)
    assert hf.responses == lean.responses


def test_the_lean_decoder_stops_when_every_row_has_ended(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    # only EOS is allowed after the first step: every row ends at its first token
    rollout = generate(
        model, tokenizer, PROMPTS, max_new_tokens=6, allowed_token_ids=[eos], decoder="lean"
    )
    assert rollout.response_ids.shape[1] == 1
    assert rollout.response_ids[:, 0].tolist() == [eos] * len(PROMPTS)


def test_a_sharded_model_runs_every_step_and_returns_the_unsharded_rollout(model_and_tokenizer):
    """Processes decoding a sharded model together never stop early; the rollout is the same."""
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        rollouts, forward_counts = {}, {}
        for sharded in (False, True):
            forwards.clear()
            rollouts[sharded] = generate(
                model, tokenizer, PROMPTS, max_new_tokens=6, allowed_token_ids=[eos],
                decoder="lean", sharded=sharded,
            )  # fmt: skip
            forward_counts[sharded] = len(forwards)
    finally:
        hook.remove()
    # the prefill, then one forward per further step: every row ends at its first token
    assert forward_counts == {False: 1, True: 6}
    for rollout in rollouts.values():
        assert rollout.response_ids.tolist() == [[eos]] * len(PROMPTS)
        assert rollout.response_mask.sum(1).tolist() == [1] * len(PROMPTS)


def test_min_new_tokens_holds_eos_back_then_lets_it_through(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    words = tokenizer.convert_tokens_to_ids(["tea", "coffee"])
    torch.manual_seed(0)
    rollout = generate(
        model, tokenizer, [PROMPT] * 200, max_new_tokens=5, min_new_tokens=3,
        allowed_token_ids=[eos, *words], decoder="lean",
    )  # fmt: skip
    ids = rollout.response_ids
    assert not bool((ids[:, :3] == eos).any())
    assert bool((ids[:, 3:] == eos).any())  # allowed again from the fourth token
    lengths = rollout.response_mask.sum(1)
    assert int(lengths.min()) >= 3


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_two_token_joint_distribution_matches_the_model(model_and_tokenizer, decoder):
    """16 joint frequencies of two tokens over four allowed words, against π by teacher forcing."""
    model, tokenizer = model_and_tokenizer
    allowed = tokenizer.convert_tokens_to_ids(["drink", "prefer", "tea", "coffee"])
    first = next_token_probs(model, tokenizer, [], allowed)
    joint = torch.stack(
        [first[a] * next_token_probs(model, tokenizer, [a], allowed)[allowed] for a in allowed]
    )
    torch.manual_seed(3)
    rollout = generate(
        model, tokenizer, [PROMPT] * 4000, max_new_tokens=2, stop_at_eos=False,
        allowed_token_ids=allowed, decoder=decoder,
    )  # fmt: skip
    index = {tok: k for k, tok in enumerate(allowed)}
    counts = torch.zeros_like(joint)
    for a, b in rollout.response_ids.tolist():
        counts[index[a], index[b]] += 1
    assert_same_distribution(counts.flatten(), joint.flatten())


@pytest.mark.parametrize("restricted", [False, True])
def test_scoring_reproduces_the_probabilities_the_lean_decoder_sampled_with(
    world_model, restricted
):
    """Prompts of different lengths, rows that end at different steps: the log-prob of every
    sampled token, as the decoder drew it, equals the one a scoring forward gives it (over the
    same renormalised token set, where one is given)."""
    _, tokenizer, policy, prompts = world_model
    allowed = None
    if restricted:  # every token but the model's five likeliest first words
        with torch.no_grad():
            first = policy(**tokenizer(prompts[:1], return_tensors="pt")).logits[0, -1]
        likeliest = set(first.topk(6).indices.tolist()) - {tokenizer.eos_token_id}
        allowed = tuple(i for i in range(len(tokenizer)) if i not in list(likeliest)[:5])
    encoded = tokenizer(prompts * 4, return_tensors="pt", padding=True)
    torch.manual_seed(4)
    settings = SamplingSettings(
        max_new_tokens=8, eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id, allowed_token_ids=allowed,
    )  # fmt: skip
    ids, sampled_logp = decode(policy, encoded.input_ids, encoded.attention_mask, settings)
    mask = response_mask_from_ids(ids, [tokenizer.eos_token_id])
    assert int(mask.sum(1).min()) < int(mask.sum(1).max())  # rows end at different steps
    sequences = torch.cat([encoded.input_ids, ids], 1)
    attention = torch.cat([encoded.attention_mask, mask], 1)
    with torch.no_grad():
        scored, _ = token_logprobs(
            policy, sequences, attention, encoded.input_ids.shape[1],
            allowed_token_ids=None if allowed is None else list(allowed),
        )  # fmt: skip
    torch.testing.assert_close(sampled_logp * mask, scored, rtol=0, atol=2e-5)


def test_auto_picks_the_lean_decoder_on_a_cpu_only_and_unknown_names_are_refused():
    assert resolve_decoder("auto", torch.device("cpu")) == "lean"
    assert resolve_decoder("auto", torch.device("cuda")) == "hf"
    assert resolve_decoder("hf", torch.device("cpu")) == "hf"
    with pytest.raises(ValueError, match="decoder must be one of"):
        resolve_decoder("beam", torch.device("cpu"))


def test_the_decoder_option_is_checked_by_name():
    from pmrlhf.rl.config import RLConfig

    with pytest.raises(ValueError, match="decoder must be one of"):
        RLConfig(policy="model", decoder="beam")
    assert RLConfig(policy="model", decoder="lean").decoder == "lean"
