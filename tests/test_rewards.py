"""RL rewards: what a reward callable may return, errors that name it, and module loading."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from pmrlhf.rl.rewards import (
    CallableReward,
    ModelReward,
    RewardError,
    check_finite_rewards,
    load_callable,
    load_reward,
)

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["a", "b", "c"]


def my_score(prompts, completions):
    return [0.0, 0.0]  # one value too few for three completions


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1, 2.5, -3], [1.0, 2.5, -3.0]),
        ((1.0, 2.0, 3.0), [1.0, 2.0, 3.0]),
        (np.array([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]),
        (np.array([1, 0, 1], dtype=np.int64), [1.0, 0.0, 1.0]),
        ([np.float32(0.5), np.int64(2), torch.tensor(1.5)], [0.5, 2.0, 1.5]),
        (torch.tensor([[1.0], [2.0], [3.0]]), [1.0, 2.0, 3.0]),  # a (N, 1) head output
        ([[1.0], [2.0], [3.0]], [1.0, 2.0, 3.0]),  # the same as nested lists
        ([True, False, True], [1.0, 0.0, 1.0]),  # a verifier's pass/fail
    ],
)
def test_accepted_reward_values(value, expected):
    out = CallableReward(lambda p, c: value)(PROMPTS, COMPLETIONS)
    assert out.dtype == torch.float32 and out.tolist() == expected


def _gen(prompts, completions):
    return (1.0 for _ in completions)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"returned None"),
        ({"reward": [1, 2, 3]}, r"returned a dict \(keys \['reward'\]\)"),
        ("1.0", r"returned the string '1\.0'"),
        (["1", "2", "3"], r"returned the string '1' at position 0"),
        ([1.0, None, 2.0], r"returned None at position 1"),
        ([[1.0, 2.0], [2.0], [3.0]], r"returned a list at position 0"),
        ([1.0, 2.0], r"returned 2 rewards of shape \(2,\) for 3 completions"),
        (torch.ones(3, 2), r"returned 6 rewards of shape \(3, 2\)"),
        (np.array(["a", "b", "c"]), r"returned an array of <U1 values"),
        (3.0, r"returned a float"),
        (torch.tensor(3.0), r"returned a single number \(a 0-d tensor\)"),
        ([1.0, float("nan"), 2.0], r"returned non-finite rewards \(1 NaN, 0 infinite of 3\).*'b'"),
        (
            torch.tensor([1.0, 2.0, float("inf")]),
            r"returned non-finite rewards \(0 NaN, 1 infinite of 3\)",
        ),
    ],
)
def test_bad_reward_values_name_the_reward_function(value, message):
    reward = CallableReward(lambda p, c: value, name="reward function my.py:score")
    with pytest.raises(RewardError, match=r"^reward function my\.py:score " + message):
        reward(PROMPTS, COMPLETIONS)


def test_a_generator_is_named():
    with pytest.raises(RewardError, match=r"returned a generator"):
        CallableReward(_gen)(PROMPTS, COMPLETIONS)


def test_an_exception_in_the_reward_function_is_reported_with_its_line(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def score(prompts, completions):\n    return [len(c) / 0 for c in completions]\n"
    )
    reward = load_reward(f"{path}:score", torch.device("cpu"), torch.float32)
    with pytest.raises(
        RewardError,
        match=r"my_reward\.py:score raised ZeroDivisionError: division by zero "
        r"\(my_reward\.py, line 2\)",
    ):
        reward(PROMPTS, COMPLETIONS)


def test_an_exception_in_a_python_callable_keeps_its_type():
    # from Python the caller gets its own exception and traceback back
    def broken(prompts, completions):
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        CallableReward(broken)(PROMPTS, COMPLETIONS)


def test_default_name_is_the_function():
    with pytest.raises(RewardError, match=r"^reward function my_score returned 2 rewards .* 3 "):
        CallableReward(my_score)(PROMPTS, COMPLETIONS)


def test_check_finite_rewards():
    ok = torch.tensor([1.0, -2.0])
    assert check_finite_rewards(ok, "reward model rm") is ok
    with pytest.raises(
        RewardError,
        match=r"reward model rm returned non-finite rewards \(2 NaN, 1 infinite of 4\); "
        r"the first is nan at position 1",
    ):
        check_finite_rewards(
            torch.tensor([0.0, float("nan"), float("-inf"), float("nan")]), "reward model rm"
        )


def test_a_file_reward_does_not_shadow_a_library(tmp_path):
    import json

    import datasets

    for name in ("datasets", "json"):
        (tmp_path / f"{name}.py").write_text(
            "def fn(prompts, completions):\n    return [1.0] * len(completions)\n"
        )
        fn = load_callable(f"{tmp_path / name}.py:fn")
        assert fn(["p"], ["c"]) == [1.0]
    assert sys.modules["datasets"] is datasets and sys.modules["json"] is json
    assert fn.__module__.startswith("_pmrlhf_reward_json_")
    # the same file loads under the same private name
    assert load_callable(f"{tmp_path / 'json'}.py:fn").__module__ == fn.__module__


def test_a_file_reward_can_define_dataclasses(tmp_path):
    # dataclasses look their module up in sys.modules while the file is imported
    path = tmp_path / "with_dataclass.py"
    path.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            @dataclass
            class Weights:
                tea: float = 1.0

            def fn(prompts, completions):
                return [Weights().tea * c.count("tea") for c in completions]
            """
        )
    )
    assert load_callable(f"{path}:fn")(["p"], ["tea tea"]) == [2.0]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("runs/rm/missing", FileNotFoundError, r"--reward 'runs/rm/missing': no such reward-model folder"),
        ("./rm", FileNotFoundError, r"--reward '\./rm': no such reward-model folder"),
        ("my rm", FileNotFoundError, r"no such reward-model folder"),
        ("no_such_module_xyz:fn", ValueError, r"no module named 'no_such_module_xyz'"),
        ("json:no_such_fn", ValueError, r"'json' has no callable named 'no_such_fn'"),
        (":fn", ValueError, r"must look like 'module:function'"),
    ],
)  # fmt: skip
def test_bad_reward_specs(spec, error, message):
    with pytest.raises(error, match=message):
        load_reward(spec, torch.device("cpu"), torch.float32)


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_lib.py").write_text(
        "import no_such_lib_xyz\n\ndef fn(p, c):\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        RewardError,
        match=r"reward needs_missing_lib:fn: importing needs_missing_lib raised "
        r"ModuleNotFoundError: No module named 'no_such_lib_xyz' \(needs_missing_lib\.py, line 1\)",
    ):
        load_callable("needs_missing_lib:fn")


def test_a_reward_model_that_outputs_nan_is_stopped(tiny_model_dir, tmp_path):
    from pmrlhf.models import load_reward_model, load_tokenizer

    model = load_reward_model(str(tiny_model_dir))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_rm")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "nan_rm")
    reward = ModelReward(str(tmp_path / "nan_rm"), torch.device("cpu"), torch.float32)
    with pytest.raises(
        RewardError, match=r"reward model .*nan_rm returned non-finite rewards \(2 NaN"
    ):
        reward(["Which drink do you prefer ?"] * 2, ["I prefer tea .", "I prefer water ."])
    # wrapped again (as the trainer and evaluation do), the check still holds
    with pytest.raises(RewardError, match=r"non-finite"):
        CallableReward(reward)(["Which drink do you prefer ?"], ["I prefer tea ."])


def test_a_reward_model_scores_each_distinct_pair_once(tiny_model_dir, tmp_path):
    from pmrlhf.models import load_reward_model, load_tokenizer

    load_reward_model(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    reward = ModelReward(str(tmp_path / "rm"), torch.device("cpu"), torch.float32)
    scored: list[int] = []
    reward.model.register_forward_pre_hook(
        lambda _module, args, kwargs: scored.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    drink, season = "Which drink do you prefer ?", "Which season do you like best ?"
    prompts = [drink, drink, season, drink, season]
    completions = ["I prefer tea .", "I prefer water .", "I prefer tea .", "I prefer tea .",
                   "I prefer tea ."]  # fmt: skip
    together = reward(prompts, completions)
    assert scored == [3]  # (drink, tea), (drink, water), (season, tea)
    alone = torch.cat([reward([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert together[0] == together[3] and together[2] == together[4]
    assert not torch.isclose(together[0], together[2])  # the prompt is part of the input
