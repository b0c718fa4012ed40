"""Typed configs: defaults < YAML file < --field < --set, with validation and --help text."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pmrlhf.config import add_config_arguments, config_from_args, load_config, option, to_dict


@dataclasses.dataclass
class ToyConfig:
    beta: float = option(0.1, help="regularisation strength beta")
    epochs: int = option(2, help="passes over the prompt set")
    regularizer: str = option("kl", help="which penalty to apply", choices=["kl", "pm", "cpm"])
    alpha: float | None = option(None, help="conditional-PM threshold on the reference prob")
    bf16: bool = option(False, help="train in bfloat16")
    betas: list[float] = option([0.1, 0.5], help="values for a sweep")
    top_p: float = option(1.0, help="nucleus mass kept in rollouts (100% = off)")
    run_name: str = option("run", help="label of the output folder")


@dataclasses.dataclass
class RequiredConfig:
    model: str = option(help="model to fine-tune")
    seed: int = option(0, help="random seed")


def parser_for(cls: type = ToyConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, cls)
    return parser


def resolve(argv: list[str], cls: type = ToyConfig):
    return config_from_args(cls, parser_for(cls).parse_args(argv))


def test_defaults():
    config = resolve([])
    assert config == ToyConfig()
    assert (config.beta, config.epochs, config.regularizer) == (0.1, 2, "kl")
    assert config.alpha is None and config.bf16 is False and config.betas == [0.1, 0.5]


def test_list_default_is_not_shared_between_instances():
    a, b = ToyConfig(), ToyConfig()
    a.betas.append(9.0)
    assert b.betas == [0.1, 0.5]


def test_resolution_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.2\nepochs: 3\nregularizer: pm\nbf16: true\nrun_name: from-file\n")
    assert resolve(["--config", str(path)]) == ToyConfig(
        beta=0.2, epochs=3, regularizer="pm", bf16=True, run_name="from-file"
    )
    config = resolve(["--config", str(path), "--beta", "0.3", "--epochs", "4", "--set", "beta=0.4"])
    assert config.beta == 0.4  # --set beats --field and the file
    assert config.epochs == 4  # --field beats the file
    assert config.regularizer == "pm"  # from the file
    assert config.bf16 is True
    assert config.alpha is None  # default
    # The position of the options on the command line does not change the order.
    config = resolve(["--set", "epochs=7", "--epochs", "5", "--config", str(path)])
    assert config.epochs == 7


def test_value_conversion_from_the_command_line():
    config = resolve(
        [
            "--alpha",
            "0.3",
            "--bf16",
            "yes",
            "--betas",
            "0.1,1",
            "--epochs",
            "3",
            "--run-name",
            "abc",
            "--set",
            "top_p=0.9",
            "--set",
            "regularizer=cpm",
        ]
    )
    assert config.alpha == 0.3
    assert config.bf16 is True
    assert config.betas == [0.1, 1.0]
    assert isinstance(config.epochs, int) and config.epochs == 3
    assert config.run_name == "abc"
    assert config.top_p == 0.9
    assert config.regularizer == "cpm"
    assert resolve(["--alpha", "0.3", "--set", "alpha=null"]).alpha is None
    assert resolve(["--set", "betas=[1, 2]"]).betas == [1.0, 2.0]
    assert resolve(["--set", "top-p=0.5"]).top_p == 0.5


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("beta: 0.2\nbeat: 0.3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['beat'\]") as exc:
        resolve(["--config", str(path)])
    assert str(path) in str(exc.value)
    with pytest.raises(ValueError, match="'learning_rate'"):
        resolve(["--set", "learning_rate=1e-5"])
    with pytest.raises(ValueError, match="'nope'"):
        load_config(ToyConfig, {"nope": 1})


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--epochs", "many"], "'epochs'"),
        (["--set", "epochs=1.5"], "'epochs'"),
        (["--beta", "high"], "'beta'"),
        (["--bf16", "maybe"], "'bf16'"),
        (["--betas", "0.1,x"], "'betas'"),
        (["--set", "beta=null"], "beta"),
    ],
)
def test_bad_type_names_the_field(argv, field):
    with pytest.raises(ValueError, match=field):
        resolve(argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: two\n", "config field 'epochs': invalid literal"),
        ("epochs: true\n", "config field 'epochs': expected a number, got True"),
        ("beta: off\n", "config field 'beta': expected a number, got False"),
        ("epochs: 2.5\n", "config field 'epochs': expected an integer, got 2.5"),
        ("betas: [0.1, fast]\n", "config field 'betas': could not convert"),
    ],
)
def test_bad_type_in_yaml_names_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        resolve(["--config", str(path)])
    assert str(exc.value).startswith(message)
    assert str(exc.value).count("config field") == 1


def test_choices_are_enforced():
    with pytest.raises(ValueError, match=r"'regularizer' must be one of \['kl', 'pm', 'cpm'\]"):
        resolve(["--regularizer", "dpo"])
    with pytest.raises(ValueError, match="'regularizer'"):
        resolve(["--set", "regularizer=ppo"])
    assert resolve(["--regularizer", "cpm"]).regularizer == "cpm"


def test_help_lists_every_field_with_its_help_and_default():
    text = " ".join(parser_for().format_help().split())
    for field in dataclasses.fields(ToyConfig):
        assert "--" + field.name.replace("_", "-") in text
        assert field.metadata["help"] in text
    assert "(default: 0.1)" in text
    assert "{kl,pm,cpm}" in text
    assert "--config" in text and "--set" in text


def test_help_with_percent_signs_in_help_and_defaults():
    @dataclasses.dataclass
    class Percent:
        share: str = option("10%", help="share of prompts held out, e.g. 10%")

    text = parser_for(Percent).format_help()
    assert "share of prompts held out, e.g. 10% (default: 10%)" in " ".join(text.split())


def test_missing_required_value():
    with pytest.raises(ValueError, match=r"missing required config value\(s\) \['model'\]"):
        resolve([], RequiredConfig)
    config = resolve(["--model", "gpt2"], RequiredConfig)
    assert config == RequiredConfig(model="gpt2", seed=0)
    assert "(default: required)" in parser_for(RequiredConfig).format_help()


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        resolve(["--config", str(tmp_path / "absent.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve(["--config", str(listed)])
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert resolve(["--config", str(empty)]) == ToyConfig()
    with pytest.raises(ValueError, match="KEY=VALUE"):
        resolve(["--set", "beta"])


def test_to_dict_round_trips_through_load_config():
    config = ToyConfig(beta=0.5, regularizer="pm", betas=[1.0])
    data = to_dict(config)
    assert data["beta"] == 0.5 and data["betas"] == [1.0]
    assert load_config(ToyConfig, data) == config


# --------------------------------------------------------------------------- YAML errors
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("beta: 0.2\n\tepochs: 3\n", r"line 2: invalid YAML: .*'\\t'.*replace the tab"),
        ("beta: [0.2\nepochs: 3\n", r"line 2: invalid YAML: while parsing a flow sequence"),
        ("run_name: 'open\n", r"line 2: invalid YAML: .*quoted scalar"),
        ("beta: 0.2\nepochs: 3\nbeta: 0.5\n", r"line 3: invalid YAML: duplicate key 'beta' \(first given on line 1\)"),
        ("betas: {a: 1, a: 2}\n", r"line 1: invalid YAML: duplicate key 'a'"),
    ],
)  # fmt: skip
def test_yaml_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"run\.yaml, " + message) as info:
        resolve(["--config", str(path)])
    assert "\n" not in str(info.value)


def test_config_file_encoding(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xef\xbb\xbfbeta: 0.2\n")  # a byte-order mark is fine
    assert resolve(["--config", str(path)]).beta == 0.2
    path.write_bytes(b"beta: 0.2\nrun_name: caf\xe9\n")
    with pytest.raises(ValueError, match=r"run\.yaml, line 2: not UTF-8 text \(byte 0xe9\)"):
        resolve(["--config", str(path)])


def test_set_values_are_yaml_and_their_errors_name_the_option():
    config = resolve(["--set", "betas=[0.2, 0.3]", "--set", "beta=1e-2"])
    assert config.betas == [0.2, 0.3] and config.beta == 0.01
    with pytest.raises(ValueError, match=r"--set betas=\[0\.2, line 1: invalid YAML"):
        resolve(["--set", "betas=[0.2"])
