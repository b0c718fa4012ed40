"""Bad input on the command line: one clear `pmrlhf CMD: error: ...` line, exit code 2.

Each case is one realistic mistake. The command runs in-process through ``pmrlhf.cli.main``, so
an exception that escapes it (what a user would see as a traceback) fails the test.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pmrlhf import cli
from pmrlhf.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Inputs shared by the cases: a good model and data file, and a set of bad files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    out: dict[str, Path] = {"model": Path(tiny_model_dir), "root": root}
    out["pairs"] = FIXTURES / "pairs.jsonl"
    out["prompts"] = FIXTURES / "prompts.jsonl"
    out["empty_dir"] = root / "empty_dir"
    out["empty_dir"].mkdir()
    out["a_file"] = root / "a_file.txt"
    out["a_file"].write_text("not a folder\n")
    out["rewards_py"] = root / "rewards.py"
    out["rewards_py"].write_text(
        textwrap.dedent(
            """
            def fine(prompts, completions):
                return [1.0 for _ in completions]
            def gives_none(prompts, completions):
                return None
            def gives_dict(prompts, completions):
                return {"reward": 1.0}
            def gives_generator(prompts, completions):
                return (1.0 for _ in completions)
            def gives_strings(prompts, completions):
                return ["1.0" for _ in completions]
            def gives_one(prompts, completions):
                return [1.0]
            def gives_nan(prompts, completions):
                return [float("nan") for _ in completions]
            def raises(prompts, completions):
                return 1 / 0
            """
        )
    )
    out["syntax_py"] = root / "broken.py"
    out["syntax_py"].write_text("def fn(prompts, completions)\n    return []\n")
    return out


def data_file(root: Path, name: str, content: bytes) -> Path:
    path = root / name
    path.write_bytes(content)
    return path


# Each case: (id, argv builder, text the error must contain). The builder gets the shared files.
Argv = Callable[[dict[str, Path]], list[str]]


def _score(**overrides: str) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        values = {
            "--model": str(f["model"]),
            "--data": str(f["pairs"]),
            "--out": str(f["root"] / "scores.jsonl"),
        }
        values.update(
            {k: v.format(**{n: str(p) for n, p in f.items()}) for k, v in overrides.items()}
        )
        return ["score", *[x for kv in values.items() for x in kv]]

    return build


def _score_data(name: str, content: bytes) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        path = data_file(f["root"], name, content)
        return [*_score()(f)[:3], "--data", str(path), "--out", str(f["root"] / "s.jsonl")]

    return build


def _eval(**overrides: str) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        values = {
            "--policy": str(f["model"]),
            "--reward": f"{f['rewards_py']}:fine",
            "--prompts": str(f["prompts"]),
            "--samples": "2",
            "--max-new-tokens": "2",
            "--max-prompts": "1",
        }
        values.update(
            {k: v.format(**{n: str(p) for n, p in f.items()}) for k, v in overrides.items()}
        )
        return ["eval", *[x for kv in values.items() for x in kv]]

    return build


def _config(command: str, text: bytes, *extra: str) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        path = data_file(f["root"], f"{command}_config.yaml", text)
        return [command, "--config", str(path), *extra]

    return build


def _sft(**overrides: str) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        values = {
            "--model": str(f["model"]),
            "--data": str(FIXTURES / "sft.jsonl"),
            "--output-dir": str(f["root"] / "sft_run"),
        }
        values.update(
            {k: v.format(**{n: str(p) for n, p in f.items()}) for k, v in overrides.items()}
        )
        return ["sft", *[x for kv in values.items() for x in kv]]

    return build


def _rl(**overrides: str) -> Argv:
    def build(f: dict[str, Path]) -> list[str]:
        values = {
            "--policy": str(f["model"]),
            "--reward": f"{f['rewards_py']}:fine",
            "--prompts": str(f["prompts"]),
            "--output-dir": str(f["root"] / "rl_run"),
        }
        values.update(
            {k: v.format(**{n: str(p) for n, p in f.items()}) for k, v in overrides.items()}
        )
        return ["rl", *[x for kv in values.items() for x in kv]]

    return build


def case(name: str, argv: Argv, expected: str, **kwargs):
    return pytest.param(argv, expected, id=name, **kwargs)


CASES = [
    # --- model locations (item 11, 14)
    case(
        "score-model-dot-missing",
        _score(**{"--model": "./no_such_model"}),
        "no such file or folder",
    ),
    case(
        "score-model-nested-missing",
        _score(**{"--model": "runs/rm/model"}),
        "no such file or folder",
    ),
    case("score-model-abs-missing", _score(**{"--model": "{root}/gone"}), "no such file or folder"),
    case("score-model-home-missing", _score(**{"--model": "~/no_such_model_x"}), "no such file"),
    case(
        "score-model-gguf-missing", _score(**{"--model": "model.Q4.gguf"}), "no such file or folder"
    ),
    case("score-model-not-hub-id", _score(**{"--model": "my model!"}), "not a Hugging Face hub id"),
    case("score-model-empty-folder", _score(**{"--model": "{empty_dir}"}), "holds no model"),
    case(
        "score-model-hub-offline", _score(**{"--model": "nobody-xyz/no-such-model"}), "Hub failed"
    ),
    case("eval-policy-missing", _eval(**{"--policy": "./missing_policy"}), "--policy './missing"),
    case("eval-ref-missing", _eval(**{"--ref": "runs/sft/missing"}), "--ref 'runs/sft/missing'"),
    case("sft-model-missing", _sft(**{"--model": "./missing_model"}), "no such file or folder"),
    case("rl-policy-missing", _rl(**{"--policy": "runs/sft/model"}), "no such file or folder"),
    case("rl-reward-no-colon-missing", _rl(**{"--reward": "runs/rm/missing"}), "--reward"),
    # --- output folders (item 11)
    case("rl-output-dir-is-file", _rl(**{"--output-dir": "{a_file}"}), "a_file.txt"),
    case("sft-output-dir-is-file", _sft(**{"--output-dir": "{a_file}"}), "a_file.txt"),
    # --- reward callables (item 11)
    case("eval-reward-none", _eval(**{"--reward": "{rewards_py}:gives_none"}), "returned None"),
    case("eval-reward-dict", _eval(**{"--reward": "{rewards_py}:gives_dict"}), "returned a dict"),
    case(
        "eval-reward-generator", _eval(**{"--reward": "{rewards_py}:gives_generator"}), "generator"
    ),
    case(
        "eval-reward-strings", _eval(**{"--reward": "{rewards_py}:gives_strings"}), "string '1.0'"
    ),
    case("eval-reward-wrong-length", _eval(**{"--reward": "{rewards_py}:gives_one"}), "1 rewards"),
    case("eval-reward-nan", _eval(**{"--reward": "{rewards_py}:gives_nan"}), "non-finite"),
    case("eval-reward-raises", _eval(**{"--reward": "{rewards_py}:raises"}), "ZeroDivisionError"),
    case("eval-reward-no-function", _eval(**{"--reward": "{rewards_py}:absent"}), "no callable"),
    case("eval-reward-no-file", _eval(**{"--reward": "{root}/absent.py:fn"}), "not found"),
    case(
        "eval-reward-no-module", _eval(**{"--reward": "no_such_module_xyz:fn"}), "no module named"
    ),
    case("eval-reward-syntax", _eval(**{"--reward": "{syntax_py}:fn"}), "SyntaxError"),
    case("eval-reward-no-colon-py", _eval(**{"--reward": "{rewards_py}"}), "module:function"),
    # --- score options (item 11)
    case("score-max-length-0", _score(**{"--max-length": "0"}), "--max-length must be at least 1"),
    case(
        "score-max-length-neg", _score(**{"--max-length": "-1"}), "--max-length must be at least 1"
    ),
    case("score-batch-size-0", _score(**{"--batch-size": "0"}), "--batch-size must be at least 1"),
    case("score-out-is-folder", _score(**{"--out": "{empty_dir}"}), "is a folder"),
    case("score-out-under-file", _score(**{"--out": "{a_file}/s.jsonl"}), "is a file"),
    case("score-device-bogus", _score(**{"--device": "tpu9"}), "not a device"),
    case(
        "score-device-cuda",
        _score(**{"--device": "cuda"}),
        "CUDA is not available",
        marks=pytest.mark.skipif(not NO_CUDA, reason="a GPU is present"),
    ),
    # --- eval options (item 11)
    case("eval-samples-0", _eval(**{"--samples": "0"}), "--samples must be at least 2"),
    case("eval-samples-1", _eval(**{"--samples": "1"}), "--samples must be at least 2"),
    case("eval-max-prompts-neg", _eval(**{"--max-prompts": "-1"}), "--max-prompts must be"),
    case("eval-max-prompts-0", _eval(**{"--max-prompts": "0"}), "--max-prompts must be"),
    case("eval-max-new-tokens-0", _eval(**{"--max-new-tokens": "0"}), "--max-new-tokens must be"),
    case("eval-out-is-folder", _eval(**{"--out": "{empty_dir}"}), "is a folder"),
    # --- YAML configs (item 11, 12)
    case("sft-yaml-tab", _config("sft", b"model: m\n\tdata: d\n"), "line 2: invalid YAML"),
    case("sft-yaml-syntax", _config("sft", b"model: [m\ndata: d\n"), "line 2: invalid YAML"),
    case("sft-yaml-quote", _config("sft", b"model: 'm\n"), "invalid YAML"),
    case(
        "rl-yaml-duplicate",
        _config("rl", b"beta: 0.1\nalgo: ppo\nbeta: 1\n"),
        "duplicate key 'beta'",
    ),
    case("rm-yaml-nested-dup", _config("rm", b"a:\n  x: 1\n  x: 2\n"), "duplicate key 'x'"),
    case("rl-yaml-not-utf8", _config("rl", b"beta: 0.1\npolicy: caf\xe9\n"), "line 2: not UTF-8"),
    case("rl-yaml-list", _config("rl", b"- beta\n- 0.1\n"), "mapping"),
    case("sft-set-bad-yaml", _config("sft", b"model: m\n", "--set", "lr=[1"), "--set lr=[1"),
    case("sft-set-no-equals", _config("sft", b"model: m\n", "--set", "lr"), "KEY=VALUE"),
    case(
        "sft-config-missing", lambda f: ["sft", "--config", str(f["root"] / "no.yaml")], "not found"
    ),
    # --- data files (item 13)
    case("data-missing-folder", _score(**{"--data": "./no_such_data"}), "data file or folder not"),
    case("data-missing-nested", _score(**{"--data": "data/rl/prompts"}), "data file or folder not"),
    case("data-missing-file", _score(**{"--data": "{root}/absent.jsonl"}), "data file not found"),
    case(
        "data-jsonl-latin1",
        _score_data(
            "l1.jsonl",
            b'{"prompt": "q", "completion": "ok"}\n{"prompt": "caf\xe9", "completion": "a"}\n',
        ),
        "line 2: not UTF-8",
    ),
    case(
        "data-json-latin1",
        _score_data("l1.json", b'[{"prompt": "caf\xe9", "completion": "a"}]'),
        "line 1: not UTF-8",
    ),
    case(
        "data-csv-latin1",
        _score_data("l1.csv", b"prompt,completion\nq,a\ncaf\xe9,b\n"),
        "line 3: not UTF-8",
    ),
    case(
        "data-csv-extra-field",
        _score_data("x.csv", b"prompt,chosen,rejected\nq,a,b\nq,a,b,c\n"),
        "line 3: expected 3 fields",
    ),
    case(
        "data-csv-short-row",
        _score_data("s.csv", b"prompt,chosen,rejected\nq,a\n"),
        "line 2: expected 3 fields",
    ),
    case(
        "data-csv-open-quote",
        _score_data("q.csv", b'prompt,completion\nq,"a\nq,b\n'),
        "malformed CSV",
    ),
    case(
        "data-csv-dup-header",
        _score_data("d.csv", b"prompt,completion,completion\nq,a,b\n"),
        "appears twice",
    ),
    case("data-csv-header-only", _score_data("h.csv", b"prompt,completion\n"), "no rows"),
    case("data-jsonl-empty", _score_data("e.jsonl", b"\n\n"), "no rows"),
    case(
        "data-json-not-objects",
        _score_data("n.json", b"[1, 2]"),
        "record 1: expected a JSON object",
    ),
    case(
        "data-json-not-array",
        _score_data("o.json", b'[{"prompt": "q", "completion": "a"}'),
        "malformed JSON",
    ),
    case("data-jsonl-malformed", _score(**{"--data": str(BAD / "malformed.jsonl")}), "line 3"),
    case(
        "data-scores-mixed-in-row",
        _score_data("m.jsonl", b'{"prompt": "q", "responses": ["a", "b"], "scores": [1, "2"]}\n'),
        "scores[1]",
    ),
    case(
        "data-scores-mixed-rows",
        _score_data(
            "m2.jsonl",
            b'{"prompt": "q", "responses": ["a", "b"], '
            b'"scores": [1, 2]}\n{"prompt": "q", "responses": '
            b'["a", "b"], "scores": ["1", "2"]}\n',
        ),
        "line 2, field 'scores[0]'",
    ),
    case("data-unsupported-suffix", _score(**{"--data": "{a_file}"}), "unsupported data file type"),
    case("data-empty-folder", _score(**{"--data": "{empty_dir}"}), "could not be read"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bad_input_gives_one_clear_line(files, argv, expected, capsys):
    args = argv(files)
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"pmrlhf {args[0]}: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    # Only user errors become one line; anything else propagates for a bug report.
    module = types.ModuleType("pmrlhf_test_buggy_command")
    module.add_arguments = lambda parser: None  # type: ignore[attr-defined]

    def run(args):
        raise RuntimeError("an internal bug")

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "buggy", (module.__name__, "raises a bug"))
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["buggy"])


def test_bom_data_is_accepted_by_score(files, tmp_path):
    data = data_file(
        tmp_path,
        "bom.jsonl",
        b"\xef\xbb\xbf"
        + json.dumps({"prompt": "Which season do you like best ?", "completion": "summer"}).encode()
        + b"\n",
    )
    out = tmp_path / "scores.jsonl"
    assert (
        main(["score", "--model", str(files["model"]), "--data", str(data), "--out", str(out)]) == 0
    )
    assert json.loads(out.read_text())["prompt"] == "Which season do you like best ?"


def test_hub_id_shaped_folder_that_exists_locally_loads(files, tmp_path, monkeypatch):
    # "org/name" is a hub id only when no such folder exists here
    local = tmp_path / "org" / "name"
    shutil.copytree(files["model"], local)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.jsonl"
    code = main(["score", "--model", "org/name", "--data", str(files["pairs"]), "--out", str(out)])
    assert code == 0 and out.is_file()
