"""The bandit trained by the real RL trainer reaches the closed-form optimum of each regulariser."""

from __future__ import annotations

import json

import pytest
import torch

from pmrlhf.cli import main
from pmrlhf.rl.bandit import make_problem, run_bandit

# Two prompts, three answers; a reference far from every optimum so that reaching the optimum
# is not an accident of the starting point.
PROBLEM = make_problem("2,0,-1;0,1,0.5", "0.1,0.3,0.6")


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "reinforce_pp"])
@pytest.mark.parametrize("regularizer", ["pm", "kl", "cpm"])
def test_bandit_converges_to_closed_form(algo, regularizer):
    result = run_bandit(PROBLEM, regularizer=regularizer, algo=algo, beta=0.7, alpha=0.25)
    # the fitted reference model reproduces --ref
    torch.testing.assert_close(result.reference, PROBLEM.ref, atol=2e-3, rtol=0)
    assert float(result.tv.max()) <= 0.03, result.to_json()
    # and training moved far from where it started
    assert float((result.learned - result.reference).abs().sum(-1).max()) > 0.3


def test_optima_differ_between_regularizers():
    """The three targets are distinct here, so converging to one is not converging to all."""
    from pmrlhf.rl.bandit import closed_form

    targets = {r: closed_form(PROBLEM, PROBLEM.ref, r, 0.7, 0.25) for r in ("pm", "kl", "cpm")}
    for a in targets:
        for b in targets:
            if a < b:
                assert float((targets[a] - targets[b]).abs().sum(-1).max()) > 0.1


def test_bandit_cli_json(capsys):
    assert (
        main(["bandit", "--rewards", "1,0", "--regularizer", "pm", "--max-steps", "60", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"learned", "optimum", "reference", "tv_max", "tv_per_prompt"}
    assert len(out["learned"][0]) == 2 and abs(sum(out["learned"][0]) - 1) < 1e-5


def test_bandit_rejects_bad_tables():
    with pytest.raises(ValueError, match="same number"):
        make_problem("1,0;1", None)
    with pytest.raises(ValueError, match="--ref"):
        make_problem("1,0", "0.5,0.3,0.2")
    with pytest.raises(ValueError, match="> 0"):
        make_problem("1,0", "1,0")
