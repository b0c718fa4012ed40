"""`pmrlhf eval` and the evaluation metrics on real (tiny) models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pmrlhf.cli import main
from pmrlhf.evaluate import (
    PromptSamples,
    alpha_evidence,
    distinct_n,
    evaluate_policy,
    exact_answer_distribution,
    pmd_from_samples,
    valid_sequence_logprobs,
)
from pmrlhf.world import default_world

REWARD_SPEC = f"{Path(__file__).parent / 'scripts' / 'reward_fns.py'}:likes_tea"


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n([""], 2) == 0.0


def test_pmd_from_samples_pairs_consecutive_samples():
    samples = [
        PromptSamples("q", ["a", "b", "c", "d"], rewards=torch.tensor([1.0, 0.0, 2.0, 2.0]),
                      logp=torch.tensor([-1.0, -2.0, -3.0, -1.0]), entropy=torch.zeros(4)),
    ]  # fmt: skip
    # pairs (a,b): (1-0) - (-1+2) = 0 ; (c,d): 0 - (-3+1) = 2  ->  mean of [0, 4] = 2
    assert pmd_from_samples(samples) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model after a few SFT steps on the valid answers of one held-out prompt."""
    from conftest import fit_tiny_world_model

    world, tokenizer, policy, prompt, _ = fit_tiny_world_model(tmp_path_factory.mktemp("m"))
    return world, tokenizer, policy, prompt


def test_exact_answer_distribution_is_a_distribution_and_matches_sampling(fitted):
    """Teacher-forced answer probabilities agree with the frequencies of sampled answers."""
    world, tokenizer, policy, prompt = fitted
    exact = exact_answer_distribution(policy, tokenizer, world, prompt)
    assert exact.shape == (len(world.answers(prompt)) + 1,)
    assert float(exact.sum()) == pytest.approx(1.0) and (exact >= 0).all()
    assert float(exact[:-1].sum()) > 0.5  # the fitted model mostly answers validly

    def zero_reward(prompts, completions):
        return [0.0] * len(completions)

    metrics = evaluate_policy(policy, tokenizer, zero_reward, [prompt], n_samples=2000,
                              max_new_tokens=12, world=world, seed=0)  # fmt: skip
    assert metrics.world is not None
    row = metrics.world.per_prompt[0]
    sampled = torch.tensor(row.distribution, dtype=torch.float64)
    assert float((sampled - exact).abs().max()) < 0.04  # 2000 samples: a few standard errors
    assert row.exact_distribution == exact.tolist()
    saved = metrics.to_dict()
    assert saved["per_prompt"][0]["distribution"] == row.distribution
    assert saved["exact"]["invalid_rate"] == pytest.approx(float(exact[-1]))
    assert saved["tv_to_target"] == metrics.metrics["tv_to_target"]


def test_alpha_evidence_places_alpha_between_answers_and_slips(fitted):
    world, tokenizer, policy, prompt = fitted
    logp, mask = valid_sequence_logprobs(policy, tokenizer, world, prompt)
    lowest = float(logp.exp()[mask.bool()].min())
    torch.manual_seed(0)
    low = alpha_evidence(policy, tokenizer, world, [prompt], alpha=1e-6, max_new_tokens=12,
                         samples=100)  # fmt: skip
    assert low.lowest_valid_token_probability == pytest.approx(lowest)
    assert 0 < low.invalid_samples <= 101  # the fitted model still slips on some samples
    q90 = low.invalid_slip_probability_q90
    assert 0 < q90 < lowest
    between = (q90 + lowest) / 2
    torch.manual_seed(0)
    mid = alpha_evidence(policy, tokenizer, world, [prompt], alpha=between, max_new_tokens=12,
                         samples=100)  # fmt: skip
    assert mid.separated and "(α separates them)" in mid.summary
    assert mid.invalid_slip_probability_q90 == q90  # same seed, same samples
    too_high = alpha_evidence(policy, tokenizer, world, [prompt], alpha=min(1.0, 2 * lowest),
                              max_new_tokens=12, samples=100)  # fmt: skip
    assert not too_high.separated and "does NOT separate" in too_high.summary
    assert mid.to_dict()["summary"] == mid.summary


def test_eval_cli_on_plain_prompts(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Which drink do you prefer ?"}\n{"prompt": "tea"}\n')
    out = tmp_path / "eval.json"
    args = ["eval", "--policy", str(tiny_model_dir), "--reward", REWARD_SPEC, "--prompts", str(prompts),
            "--ref", str(tiny_model_dir), "--samples", "8", "--max-new-tokens", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    for key in ("pmd", "mean_reward", "kl_to_ref", "entropy", "distinct_1", "distinct_2"):
        assert key in printed and key in saved
    assert printed["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
    assert "tv_to_target" not in printed  # real data: no enumerable answers


def test_eval_cli_with_a_world_file(tiny_model_dir, tmp_path, capsys):
    files = default_world().write_files(tmp_path / "data", n_pairs=0, n_rankings=0, n_sft=0)
    out = tmp_path / "eval.json"
    args = ["eval", "--policy", str(tiny_model_dir), "--reward", REWARD_SPEC,
            "--prompts", str(files["prompts_eval"]), "--world", str(files["world"]),
            "--samples", "8", "--max-new-tokens", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert 0.0 <= printed["tv_to_target"] <= 1.0 and 0.0 <= printed["invalid_rate"] <= 1.0
    saved = json.loads(out.read_text())
    assert [row["prompt"] for row in saved["per_prompt"]] == default_world().eval_prompts()
    assert all(len(row["exact_distribution"]) == 4 for row in saved["per_prompt"])
    args[args.index("--world") + 1] = str(tmp_path / "missing.json")
    assert main(args) == 2
    assert "missing.json" in capsys.readouterr().err


def test_eval_cli_rejects_missing_prompt_file(tiny_model_dir, tmp_path, capsys):
    args = ["eval", "--policy", str(tiny_model_dir), "--reward", REWARD_SPEC,
            "--prompts", str(tmp_path / "missing.jsonl")]  # fmt: skip
    assert main(args) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_eval_with_a_world_refuses_prompts_that_are_not_its_own(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me a joke ."}\n')
    args = ["eval", "--policy", str(tiny_model_dir), "--reward", REWARD_SPEC, "--prompts", str(prompts),
            "--world", "default", "--samples", "4", "--max-new-tokens", "3"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of the 1 prompts" in err and "Tell me a joke ." in err
    assert "Traceback" not in err


def test_world_metrics_split_the_mean_reward_between_valid_and_invalid_samples():
    """The pooled mean reward of each kind, and NaN for a kind with no sample."""
    from pmrlhf.evaluate import world_metrics

    world = default_world()
    first, second = world.eval_prompts()[:2]
    (_, valid_one), (_, valid_two) = world.valid_sequences(first)[:2]

    def zero_reward(prompts, completions):
        return torch.zeros(len(completions))

    def samples(prompt, texts, rewards):
        n = len(texts)
        return PromptSamples(prompt, texts, rewards=torch.tensor(rewards),
                             logp=torch.zeros(n), entropy=torch.zeros(n))  # fmt: skip

    mixed = world_metrics(
        [samples(first, [valid_one, "tea tea tea", valid_two], [1.0, 5.0, 2.0]),
         samples(second, ["nonsense words"], [-3.0])],
        world, zero_reward,
    ).means  # fmt: skip
    assert mixed["mean_reward_valid"] == pytest.approx(1.5)
    assert mixed["mean_reward_invalid"] == pytest.approx(1.0)
    only_valid = world_metrics([samples(first, [valid_one], [0.5])], world, zero_reward).means
    assert only_valid["mean_reward_valid"] == pytest.approx(0.5)
    assert math.isnan(only_valid["mean_reward_invalid"])
