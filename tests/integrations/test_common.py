"""Framework-free parts of the integrations: penalty types, the registry, the replacement k1."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pmrlhf.integrations._common import build_regularizer, parse_penalty_type
from pmrlhf.integrations.openrlhf import make_compute_approx_kl
from pmrlhf.integrations.verl import penalty_forward
from pmrlhf.regularizers import REGULARIZERS, Regularizer, make_regularizer


@dataclass(frozen=True)
class HalfPM(Regularizer):
    """A user-defined regulariser: half the PM penalty."""

    name = "half_pm"
    needs_ref = False

    def penalty(self, logp, ref_logp, mask):
        return 0.5 * make_regularizer("pm", beta=1.0).penalty(logp, ref_logp, mask)


def test_parse_penalty_type():
    assert parse_penalty_type("pm") == ("pm", None)
    assert parse_penalty_type("cpm:0.25") == ("cpm", 0.25)
    with pytest.raises(ValueError, match="number after ':'"):
        parse_penalty_type("cpm:abc")
    with pytest.raises(ValueError, match="unknown regularizer 'k9'"):
        parse_penalty_type("k9")


def test_build_regularizer_checks_name_and_alpha():
    assert build_regularizer("cpm", 2.0, 0.1) == make_regularizer("cpm", beta=2.0, alpha=0.1)
    built = make_regularizer("pm", beta=1.0)
    assert build_regularizer(built, 5.0, None) is built
    with pytest.raises(ValueError, match="unknown regularizer"):
        build_regularizer("entropy", 1.0, None)
    with pytest.raises(ValueError, match="alpha"):
        build_regularizer("cpm", 1.0, 1.5)


def test_registered_regularizer_reaches_every_framework_path(monkeypatch):
    monkeypatch.setitem(REGULARIZERS, "half_pm", HalfPM)
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-0.1, -3.0, -0.2]])
    torch.testing.assert_close(penalty_forward(logp, ref, "half_pm"), 0.5 * logp)
    torch.testing.assert_close(make_compute_approx_kl("half_pm")(logp, ref), 0.5 * logp)


def test_cpm_type_matches_regularizers_on_both_sides_of_alpha():
    alpha = 0.3
    logp = torch.tensor([[-1.0, -2.0, -0.5, -4.0]])
    ref = torch.log(torch.tensor([[0.5, 0.1, 0.31, 0.29]]))
    expected = torch.tensor([[-1.0, -2.0 - ref[0, 1].item(), -0.5, -4.0 - ref[0, 3].item()]])
    torch.testing.assert_close(penalty_forward(logp, ref, f"cpm:{alpha}"), expected)
    torch.testing.assert_close(make_compute_approx_kl(f"cpm:{alpha}")(logp, ref), expected)
    with pytest.raises(ValueError, match="only k1"):
        make_compute_approx_kl("pm")(logp, ref, kl_estimator="k3")
