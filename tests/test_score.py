"""Scoring with a reward model: the RM input text, batching invariance and `pmrlhf score`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmrlhf.cli import main
from pmrlhf.data import load_scoring_records
from pmrlhf.models import build_tiny_model, load_reward_model, load_tokenizer
from pmrlhf.score import reward_input_text, score_texts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    texts = [line for path in FIXTURES.glob("*.jsonl") for line in path.read_text().splitlines()]
    folder = build_tiny_model(tmp_path_factory.mktemp("score_rm"), [*texts, "Human Assistant"])
    # a reward model folder: the fresh scalar head saved with the weights
    model = load_reward_model(str(folder))
    model.save_pretrained(folder)
    return folder


def test_reward_input_text_joins_without_fusing_words():
    assert reward_input_text("Q:", "yes") == "Q: yes"
    assert reward_input_text("\n\nHuman: hi\n\nAssistant:", " Sure.") == (
        "\n\nHuman: hi\n\nAssistant: Sure."
    )
    assert reward_input_text("<|im_start|>assistant\n", "Sure") == "<|im_start|>assistant\nSure"


def test_scores_do_not_depend_on_batching_or_padding(reward_model_dir):
    model = load_reward_model(str(reward_model_dir))
    tokenizer = load_tokenizer(str(reward_model_dir))
    prompts = ["What is two plus two?", "Name a fruit.", "What is two plus two?"]
    responses = ["Four.", "Apple. Pear. Rock.", "Five."]
    one_by_one = score_texts(model, tokenizer, prompts, responses, batch_size=1)
    batched = score_texts(model, tokenizer, prompts, responses, batch_size=3)
    assert one_by_one.shape == (3,) and one_by_one.dtype == torch.float32
    assert torch.allclose(one_by_one, batched, atol=1e-5)
    # scoring leaves the model's mode as it was
    model.train()
    score_texts(model, tokenizer, prompts[:1], responses[:1])
    assert model.training


@pytest.mark.parametrize(
    "fixture", ["rankings.jsonl", "hh_rlhf.jsonl", "dahoas.jsonl", "sft.jsonl"]
)
def test_score_command_writes_one_reward_per_response(reward_model_dir, tmp_path, fixture):
    out = tmp_path / "scores.jsonl"
    data = FIXTURES / fixture
    code = main(["score", "--model", str(reward_model_dir), "--data", str(data), "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records = load_scoring_records(data)
    assert len(lines) == len(records)
    for line, record in zip(lines, records):
        assert line["prompt"] == record.prompt
        assert line["responses"] == list(record.responses)
        assert len(line["rewards"]) == len(record.responses)
    # the file holds exactly what score_texts computes
    model = load_reward_model(str(reward_model_dir))
    tokenizer = load_tokenizer(str(reward_model_dir))
    first = lines[0]
    expected = score_texts(
        model, tokenizer, [first["prompt"]] * len(first["responses"]), first["responses"]
    )
    assert first["rewards"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_score_command_reports_bad_data(reward_model_dir, tmp_path, capsys):
    code = main([
        "score", "--model", str(reward_model_dir),
        "--data", str(FIXTURES / "bad" / "malformed.jsonl"), "--out", str(tmp_path / "o.jsonl"),
    ])  # fmt: skip
    assert code == 2
    assert "malformed.jsonl, line 3" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_score_command_loads_a_lora_adapter_folder(reward_model_dir, tmp_path):
    from pmrlhf.lora import apply_lora, load_scoring_model

    model = apply_lora(load_reward_model(str(reward_model_dir)), "seq_cls", r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)  # a non-zero adapter, so it visibly changes the scores
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(str(reward_model_dir)).save_pretrained(adapter)
    out = tmp_path / "scores.jsonl"
    data = FIXTURES / "pairs.jsonl"
    assert main(["score", "--model", str(adapter), "--data", str(data), "--out", str(out)]) == 0
    rewards = [json.loads(line)["rewards"] for line in out.read_text().splitlines()]
    reloaded = load_scoring_model(adapter)
    tokenizer = load_tokenizer(str(adapter))
    for record, values in zip(load_scoring_records(data), rewards):
        prompts = [record.prompt] * record.k
        assert values == pytest.approx(
            score_texts(reloaded, tokenizer, prompts, list(record.responses)).tolist(), abs=1e-5
        )
        base = score_texts(
            load_reward_model(str(reward_model_dir)), tokenizer, prompts, list(record.responses)
        )
        assert not torch.allclose(base, torch.tensor(values), atol=1e-4)


def test_nan_rewards_are_never_written(reward_model_dir, tmp_path, capsys):
    model = load_reward_model(str(reward_model_dir))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    nan_dir = tmp_path / "nan_rm"
    model.save_pretrained(nan_dir)
    load_tokenizer(str(reward_model_dir)).save_pretrained(nan_dir)
    out = tmp_path / "scores.jsonl"
    data = FIXTURES / "pairs.jsonl"
    code = main(["score", "--model", str(nan_dir), "--data", str(data), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "4 of 4 rewards are not finite (the first, nan, for " in err
    assert "pairs.jsonl, line 1, response 0); nothing was written" in err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_options_are_checked_before_any_work(tmp_path, capsys):
    # the model does not exist either, yet the output folder is what gets reported: no model or
    # data was loaded before the check
    for args, message in [
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(tmp_path / "s.jsonl"), "--max-length", "0"], "--max-length"),
    ]:
        code = main(["score", "--model", "./missing", "--data", "./missing.jsonl", *args])
        assert code == 2
        assert message in capsys.readouterr().err


def test_truncation_that_leaves_no_response_token_is_reported(reward_model_dir, tmp_path):
    from pmrlhf.score import empty_responses

    tokenizer = load_tokenizer(str(reward_model_dir))
    prompts = ["What is the capital of France?", "Q:"]
    responses = ["Paris.", "Paris."]
    # the first prompt is 7 word tokens (this tokenizer adds no BOS): a cut at 7 leaves nothing
    # of its response, a cut at 8 leaves one token
    assert len(tokenizer(prompts[0])["input_ids"]) == 7
    assert empty_responses(tokenizer, prompts, responses, 7) == [0]
    assert empty_responses(tokenizer, prompts, responses, 8) == []
    assert empty_responses(tokenizer, prompts, responses, 2) == [0, 1]
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--model", str(reward_model_dir), "--data", str(FIXTURES / "sft.jsonl")]
    with pytest.warns(UserWarning, match=r"responses have no tokens left after the cut to "
                      r"--max-length 3 \(the first: .*sft\.jsonl, line 1, response 0\)"):  # fmt: skip
        assert main([*argv, "--out", str(out), "--max-length", "3"]) == 0
    assert out.is_file()


def test_warnings_print_as_one_line_on_the_command_line(reward_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "scores.jsonl"
    src = str(Path(__file__).parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "pmrlhf", "score", "--model", str(reward_model_dir),
         "--data", str(FIXTURES / "sft.jsonl"), "--out", str(out), "--max-length", "3"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "no tokens left" in line]
    assert len(warning) == 1 and warning[0].startswith("pmrlhf score: warning: ")
    assert "warnings.warn(" not in result.stderr
