"""Model locations (local path or hub id) and device checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pmrlhf.models import check_device, load_causal_lm, load_tokenizer, resolve_model_location


@pytest.mark.parametrize(
    "hub_id",
    ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B", "org_1/name.v2-x"],
)
def test_hub_ids_that_are_not_local_folders_stay_hub_ids(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_location(hub_id, "--policy") == hub_id


@pytest.mark.parametrize(
    "path",
    [
        "./model",
        "../runs/sft/model",
        "/no/such/model",
        "~/no_such_model_dir_x",
        "runs/sft/model",  # more than one '/': a path
        "org/name/",  # a trailing '/': a folder
        "model.gguf",
        "org/model.Q4_K_M.gguf",
        "weights.safetensors",
        "runs\\sft",
    ],
)
def test_paths_that_look_local_never_reach_the_hub(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--policy .*: no such file or folder"):
        resolve_model_location(path, "--policy")


@pytest.mark.parametrize("text", ["my model", "org/na me", "a:b", "-leading", "org/..x", ""])
def test_neither_a_path_nor_a_hub_id(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--model"):
        resolve_model_location(text, "--model")


def test_an_existing_folder_wins_over_the_hub(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_location("org/name") == "org/name"
    assert resolve_model_location("~") == str(Path("~").expanduser())


def test_loaders_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--policy '\./gone': no such file or folder"):
        load_causal_lm("./gone", option_name="--policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"the folder holds no model"):
        load_tokenizer(str(tmp_path / "empty"), option_name="--model")


def test_a_folder_with_a_tokenizer_but_no_weights_is_a_clear_error(tiny_model_dir, tmp_path):
    from pmrlhf.models import load_tokenizer as tok

    tok(str(tiny_model_dir)).save_pretrained(tmp_path / "only_tokenizer")
    with pytest.raises(
        FileNotFoundError, match=r"^--policy '.*only_tokenizer': .*no model weights"
    ):
        load_causal_lm(str(tmp_path / "only_tokenizer"), option_name="--policy")


def test_check_device():
    assert check_device("cpu") == "cpu"
    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu9"):
        with pytest.raises(ValueError, match=rf"--device '{bad}': not a device"):
            check_device(bad)
    if not torch.cuda.is_available():
        for text in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match=rf"--device {text}: CUDA is not available"):
                check_device(text)
    else:
        assert check_device("cuda") == "cuda"
        with pytest.raises(ValueError, match=r"there are only \d+ CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_a_folder_whose_weights_are_missing_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"^--policy '.*no_weights': could not load it \(") as info:
        load_causal_lm(str(folder), option_name="--policy")
    assert "\n" not in str(info.value)
