"""The paper's full-size recipes (configs/paper/) run end to end, 2 steps per stage.

Each recipe is run as a user runs it, `pmrlhf sft|rm|rl --config configs/paper/MODEL/STAGE.yaml`
from a working folder, with only what a CPU test cannot have swapped out through `--set`: the
hub model of the SFT stage becomes a tiny local model of the same family, Dahoas/full-hh-rlhf
becomes a dozen-row fixture file in the Dahoas (`prompt`/`response`/`chosen`/`rejected`) or the
raw HH-RLHF (`chosen`/`rejected` transcripts) layout, and the run stops after 2 steps. Every
other value comes from the recipe: the RM and RL stages find the earlier stages' models through
the recipes' own relative paths, and each run folder's saved config must hold the recipe's
values. A field renamed in a config dataclass, a broken chain of folders or a recipe value the
trainer rejects fails here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate.state import AcceleratorState

from pmrlhf.cli import main
from pmrlhf.models import build_tiny_model, build_word_tokenizer
from pmrlhf.rl.config import OptimumShiftWarning

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "configs" / "paper"
FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("opt-1.3b", "llama-2-7b")
STAGES = ("sft", "rm", "rl_kl", "rl_cpm")
LAYOUTS = {"dahoas": FIXTURES / "paper_dahoas.jsonl", "hh-rlhf": FIXTURES / "paper_hh_rlhf.jsonl"}
STEPS = 2


def _recipe(model: str, stage: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / model / f"{stage}.yaml").read_text())


def _fixture_texts() -> list[str]:
    texts: list[str] = []
    for path in LAYOUTS.values():
        for line in path.read_text().splitlines():
            texts.extend(str(value) for value in json.loads(line).values())
    return texts


def _build_tiny_opt(out: Path) -> Path:
    """A randomly initialised 2-layer OPT (hidden 64, learned positions) with a word tokenizer."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = build_word_tokenizer(_fixture_texts())
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=1024,  # the recipes' 512-token prompt + answer fits
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = OPTForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny stand-in for each recipe's hub model, of the same architecture family."""
    root = tmp_path_factory.mktemp("paper-models")
    return {
        "opt-1.3b": _build_tiny_opt(root / "opt"),
        "llama-2-7b": build_tiny_model(root / "llama", _fixture_texts(), seed=0),
    }


def _swaps(stage: str, data: Path, base_model: Path) -> dict[str, str]:
    """What a CPU test replaces: the hub model and dataset, and the run length."""
    if stage.startswith("rl"):
        return {"prompts": str(data), "prompt_split": "train", "max_steps": str(STEPS)}
    swaps = {
        "data": str(data),
        "split": "train",
        "eval_data": str(data),
        "eval_split": "train",
        "max_steps": str(STEPS),
    }
    if stage == "sft":
        swaps["model"] = str(base_model)
    return swaps


def _run(model: str, stage: str, swaps: dict[str, str]) -> list[warnings.WarningMessage]:
    command = "rl" if stage.startswith("rl") else stage
    argv = [command, "--config", str(RECIPES / model / f"{stage}.yaml"), "--set", "quiet=true"]
    for key, value in swaps.items():
        argv += ["--set", f"{key}={value}"]
    # Each command runs in a process of its own in real use; here they share the test process,
    # whose accelerate state an earlier test may have set up with other precision settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 0, f"pmrlhf {' '.join(argv)} exited with {code}"
    return list(caught)


def _run_chain(model: str, data: Path, base_model: Path) -> dict[str, list[Any]]:
    caught: dict[str, list[Any]] = {}
    for stage in STAGES:
        caught[stage] = _run(model, stage, _swaps(stage, data, base_model))
    return caught


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _check_chain(model: str, caught: dict[str, list[Any]], base_model: Path) -> None:
    for stage in ("sft", "rm"):
        recipe = _recipe(model, stage)
        folder = Path(recipe["output_dir"])
        assert (folder / "model" / "config.json").is_file(), f"{stage}: no model in {folder}"
        assert len(_metrics(folder)) == STEPS
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        swapped = _swaps(stage, Path("x"), base_model)
        kept = {k: v for k, v in recipe.items() if k not in swapped and k != "quiet"}
        # every recipe value reached the trainer's config unchanged (lists come back as lists)
        assert {k: saved[k] for k in kept} == kept, stage

    sft, rm = (Path(_recipe(model, s)["output_dir"]) / "model" for s in ("sft", "rm"))
    for stage in ("rl_kl", "rl_cpm"):
        recipe = _recipe(model, stage)
        # the RL stages start from the SFT model and the RM through the recipes' relative paths
        assert Path(recipe["policy"]) == sft and Path(recipe["reward"]) == rm
        folder = Path(recipe["output_dir"])
        rows = _metrics(folder)
        assert len(rows) == STEPS
        assert all(row["step"] == i + 1 for i, row in enumerate(rows)), rows
        assert (folder / "policy" / "config.json").is_file(), f"{stage}: no policy in {folder}"
        state = json.loads((folder / "checkpoint" / "trainer_state.json").read_text())
        swapped = _swaps(stage, Path("x"), base_model)
        kept = {k: v for k, v in recipe.items() if k not in swapped}
        assert {k: state["config"][k] for k in kept} == kept, stage

    # kl keeps the paper's top-p 0.9 rollouts and is told that they move its optimum; cpm
    # follows the PM safety rules (no reward clip, no top-p) and draws no PM safety warning
    kl_shift = [w for w in caught["rl_kl"] if issubclass(w.category, OptimumShiftWarning)]
    assert any("top_p=0.9" in str(w.message) for w in kl_shift), [str(w.message) for w in kl_shift]
    shift = [w for w in caught["rl_cpm"] if issubclass(w.category, OptimumShiftWarning)]
    assert not shift, [str(w.message) for w in shift]  # PMSafetyWarning is one of these


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_recipe_chain_runs_stage_after_stage(model, layout, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative run folders land here
    caught = _run_chain(model, LAYOUTS[layout], tiny_models[model])
    _check_chain(model, caught, tiny_models[model])


def test_recipes_share_everything_but_the_model_and_its_batch():
    """kl and cpm differ only in the regulariser and the paper's target-moving settings, and
    the two models' recipes only in model, folders, batch and run length."""
    for model in MODELS:
        kl, cpm = _recipe(model, "rl_kl"), _recipe(model, "rl_cpm")
        differ = {k for k in kl.keys() | cpm.keys() if kl.get(k) != cpm.get(k)}
        assert differ == {"regularizer", "beta", "alpha", "reward_clip", "top_p", "output_dir"}
        assert (kl["regularizer"], kl["beta"], kl["reward_clip"], kl["top_p"]) == (
            "kl",
            0.1,
            5.0,
            0.9,
        )
        assert cpm["regularizer"] == "cpm" and cpm["beta"] in (0.1, 0.5, 1.0)
        assert cpm["alpha"] in (0.1, 0.3, 0.5)
        assert cpm["reward_clip"] is None and cpm["top_p"] == 1.0
    allowed = {
        "sft": {"model", "output_dir", "batch_size", "gradient_accumulation_steps",
                "gradient_checkpointing"},
        "rm": {"model", "output_dir", "batch_size", "gradient_accumulation_steps",
               "gradient_checkpointing"},
        "rl_kl": {"policy", "reward", "output_dir", "prompts_per_step", "max_steps"},
        "rl_cpm": {"policy", "reward", "output_dir", "prompts_per_step", "max_steps"},
    }  # fmt: skip
    for stage in STAGES:
        opt, llama = _recipe("opt-1.3b", stage), _recipe("llama-2-7b", stage)
        differ = {k for k in opt.keys() | llama.keys() if opt.get(k) != llama.get(k)}
        assert differ <= allowed[stage], (stage, differ - allowed[stage])


def test_recipes_clip_gradients_as_deepspeed_does():
    """Under DeepSpeed, its gradient_clipping replaces pmrlhf's max_grad_norm: keep them equal."""
    launch = yaml.safe_load((RECIPES / "accelerate_8gpu_zero2.yaml").read_text())
    assert launch["deepspeed_config"]["zero_stage"] == 2
    for model in MODELS:
        for stage in STAGES:
            recipe = _recipe(model, stage)
            assert recipe["max_grad_norm"] == launch["deepspeed_config"]["gradient_clipping"]
            assert recipe["dtype"] == launch["mixed_precision"] == "bf16", (model, stage)
