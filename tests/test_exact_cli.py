"""`pmrlhf exact`: the closed-form preference-collapse table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pmrlhf.cli import main

COLLAPSE = ["0.510", "0.599", "0.982"]


def kl_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith("kl ")]


def test_default_table_shows_the_collapse(capsys):
    assert main(["exact"]) == 0
    out = capsys.readouterr().out
    rows = kl_rows(out)
    assert [row[1] for row in rows] == ["1", "0.1", "0.01"]
    # Column 2 is the implied preference P(top ≻ 2nd); column 3 the reward model's σ(Δr).
    assert [row[2] for row in rows] == COLLAPSE
    assert all(row[3] == "0.510" for row in rows)
    pm_row = next(line.split() for line in out.splitlines() if line.startswith("pm "))
    assert pm_row[2] == "0.510"


def test_json_output(capsys):
    assert main(["exact", "--json", "--beta", "1", "0.1", "0.01", "--pm-beta", "1"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = table["rows"]
    assert [(r["method"], r["beta"]) for r in rows] == [
        ("kl", 1.0),
        ("kl", 0.1),
        ("kl", 0.01),
        ("pm", 1.0),
    ]
    assert [round(r["implied_preference"], 3) for r in rows] == [0.51, 0.599, 0.982, 0.51]
    assert [round(r["policy"][0], 3) for r in rows] == [0.51, 0.599, 0.982, 0.51]
    for row in rows:
        assert sum(row["policy"]) == pytest.approx(1.0)
        assert row["rm_preference"] == pytest.approx(0.51)
    assert table["top_pair"] == [0, 1]
    assert table["ref"] == [0.5, 0.5]
    assert table["target_minority_mass"] == pytest.approx(0.49)


def test_custom_reward_and_reference(capsys):
    argv = ["exact", "--json", "--reward", "0,1,2", "--ref", "1,1,2", "--beta", "0.5"]
    assert main(argv) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["reward"] == [0.0, 1.0, 2.0]
    assert table["ref"] == pytest.approx([0.25, 0.25, 0.5])  # normalised
    assert table["top_pair"] == [2, 1]
    assert len(table["rows"]) == 2


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "figs" / "collapse.png"
    assert main(["exact", "--plot", str(path)]) == 0
    assert "plot written to" in capsys.readouterr().out
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reward", "1"], "--reward needs at least two responses"),
        (["--reward", "1,2,3", "--ref", "0.5,0.5"], "--ref has 2 values but --reward has 3"),
        (["--beta", "-0.1"], "--beta values must be > 0, got -0.1"),
        (["--beta", "1", "0"], "--beta values must be > 0, got 0"),
        (["--pm-beta", "0"], "must be > 0"),
        (["--ref", "1,0"], "--ref probabilities must all be > 0"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(["exact", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pmrlhf exact: error:")
    assert message in captured.err


def test_unparseable_numbers_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["exact", "--reward", "a,b"])
    assert exc.value.code == 2
    assert "--reward: expected comma-separated numbers" in capsys.readouterr().err


def test_runs_as_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "pmrlhf", "exact"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [row[2] for row in kl_rows(result.stdout)] == COLLAPSE
