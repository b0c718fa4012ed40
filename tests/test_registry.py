"""The extension story: a regulariser defined outside the package, registered by name, is
trained by the RL engine to its own closed-form optimum and offered by every command."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from pmrlhf.cli import build_command_parser
from pmrlhf.config import load_config
from pmrlhf.regularizers import (
    REGULARIZERS,
    Regularizer,
    kl_penalty,
    register_regularizer,
    sequence_probs,
)
from pmrlhf.rl.advantages import ADVANTAGE_ESTIMATORS, register_advantage, rloo_estimator
from pmrlhf.rl.bandit import closed_form, make_problem, run_bandit
from pmrlhf.rl.config import RLConfig

PROBLEM = make_problem("2,0,-1;0,1,0.5", "0.1,0.3,0.6")


@dataclass(frozen=True)
class HalfKLRegularizer(Regularizer):
    """Half-way between pm and kl: ``p_t = log π − w·log π_ref``.

    Its optimum is ``π_ref^w · exp(r/β) / Z``: w = 0 is pm, w = 1 is kl.
    """

    weight: float = 0.5
    needs_ref = True

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        ref = self._require_ref(ref_logp)
        return kl_penalty(logp, self.weight * ref, mask)

    def optimal_policy(
        self, reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor | None = None
    ) -> Tensor:
        ref = sequence_probs(ref_token_probs, token_mask)
        return torch.softmax(reward / self.beta + self.weight * ref.log(), -1)


@pytest.fixture
def half_kl():
    """Register the user's class for one test, then leave the registry as it was."""
    register_regularizer("half-kl")(HalfKLRegularizer)
    yield "half-kl"
    del REGULARIZERS["half-kl"]


def test_a_user_regularizer_trains_to_its_closed_form(half_kl):
    result = run_bandit(PROBLEM, regularizer=half_kl, algo="rloo", beta=0.7)
    expected = torch.softmax(PROBLEM.rewards / 0.7 + 0.5 * result.reference.log(), -1)
    torch.testing.assert_close(result.optimum, expected)
    assert float(result.tv.max()) <= 0.03, result.to_json()
    # its optimum lies away from both neighbours, so reaching it is not reaching theirs
    for other in ("pm", "kl"):
        target = closed_form(PROBLEM, result.reference, other, 0.7, 0.25)
        assert float((target - result.optimum).abs().sum(-1).max()) > 0.1


def test_a_user_regularizer_is_offered_by_every_command(half_kl):
    for command in ("rl", "bandit"):
        _, parser = build_command_parser(command)
        assert "half-kl" in parser.format_help(), command
    _, parser = build_command_parser("bandit")
    assert parser.parse_args(["--regularizer", "half-kl"]).regularizer == "half-kl"
    config = load_config(RLConfig, {"policy": "x", "regularizer": "half-kl"})
    assert config.regularizer == "half-kl"


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"'regularizer' must be one of \['kl', 'pm', 'cpm'\]"):
        load_config(RLConfig, {"policy": "x", "regularizer": "half-kl"})


def test_a_user_advantage_estimator_becomes_an_algo():
    register_advantage("rloo-again", min_group_size=2)(rloo_estimator)
    try:
        _, parser = build_command_parser("rl")
        assert "rloo-again" in parser.format_help()
        assert RLConfig(policy="x", algo="rloo-again").algo == "rloo-again"
        with pytest.raises(ValueError, match="rloo-again needs samples_per_prompt >= 2"):
            RLConfig(policy="x", algo="rloo-again", samples_per_prompt=1)
    finally:
        del ADVANTAGE_ESTIMATORS["rloo-again"]
