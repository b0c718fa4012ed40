"""Closed forms of docs/method.md §1–§4 against direct numerical maximisation and exact enumeration."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from pmrlhf.theory import (
    ODERegularizer,
    btl_log_likelihood,
    btl_probability,
    collapse_table,
    cpm_effective_objective,
    cpm_optimal_policy,
    default_collapse_reward,
    implied_preference,
    kl_objective,
    kl_optimal_policy,
    pl_log_likelihood,
    pl_probability,
    pm_objective,
    pm_optimal_policy,
    regularized_objective,
)

F64 = torch.float64
PROB_TOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)


def maximise(
    objective: Callable[[Tensor], Tensor], n: int, seed: int = 0, lr: float = 0.5
) -> Tensor:
    """Maximise ``objective(π)`` over the simplex by gradient ascent on softmax logits (float64).

    The logit step is the gradient preconditioned by the inverse Fisher information of the
    softmax, i.e. the logits move along ``∂J/∂π`` (mirror ascent). Plain logit gradients
    vanish for small probabilities, which stalls first-order methods; this step does not. The
    start is random, and the loop ends once ``∂J/∂π`` is constant across responses, the
    stationarity condition on the simplex.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=gen, dtype=F64)
    for _ in range(20_000):
        probs = torch.softmax(logits, dim=-1).requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(probs), probs)
        step = lr * (grad - grad.mean())
        logits = logits + step
        logits = logits - logits.max()
        if float(step.abs().max()) < 1e-13:
            break
    else:
        raise AssertionError("numerical maximisation did not converge")
    return torch.softmax(logits, dim=-1)


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def rewards(draw: st.DrawFn, min_n: int = 2, max_n: int = 6) -> Tensor:
    n = draw(st.integers(min_n, max_n))
    return torch.tensor(draw(st.lists(floats(-3.0, 3.0), min_size=n, max_size=n)), dtype=F64)


@st.composite
def reward_and_ref(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    reward = draw(rewards())
    n = reward.numel()
    weights = torch.tensor(draw(st.lists(floats(0.1, 1.0), min_size=n, max_size=n)), dtype=F64)
    return reward, weights / weights.sum()


@st.composite
def cpm_problem(draw: st.DrawFn) -> dict:
    reward = draw(rewards(max_n=5))
    n = reward.numel()
    t = draw(st.integers(1, 4))
    probs = draw(st.lists(floats(0.05, 0.95), min_size=n * t, max_size=n * t))
    mask = draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t))
    return {
        "reward": reward,
        "ref_token_probs": torch.tensor(probs, dtype=F64).reshape(n, t),
        "token_mask": torch.tensor(mask).reshape(n, t),
        "alpha": draw(floats(0.05, 0.95)),
        "beta": draw(floats(0.2, 2.0)),
    }


# --------------------------------------------------------------------------- closed forms
@SETTINGS
@given(problem=reward_and_ref(), beta=floats(0.2, 2.0), seed=st.integers(0, 2**16))
def test_kl_optimum_maximises_kl_objective(problem, beta, seed):
    reward, ref = problem
    numeric = maximise(lambda p: kl_objective(p, reward, ref, beta), reward.numel(), seed)
    closed = kl_optimal_policy(reward, ref, beta)
    torch.testing.assert_close(numeric, closed, atol=PROB_TOL, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
@settings(max_examples=10, deadline=None)
@given(reward=rewards(), seed=st.integers(0, 2**16))
def test_pm_optimum_maximises_pm_objective(beta, reward, seed):
    numeric = maximise(lambda p: pm_objective(p, reward, beta), reward.numel(), seed)
    closed = pm_optimal_policy(reward, beta)
    torch.testing.assert_close(numeric, closed, atol=PROB_TOL, rtol=0)
    torch.testing.assert_close(closed, torch.softmax(reward / beta, -1))


@SETTINGS
@given(problem=cpm_problem(), seed=st.integers(0, 2**16))
def test_cpm_optimum_maximises_cpm_effective_objective(problem, seed):
    reward = problem["reward"]
    numeric = maximise(lambda p: cpm_effective_objective(p, **problem), reward.numel(), seed)
    closed = cpm_optimal_policy(**problem)
    torch.testing.assert_close(numeric, closed, atol=PROB_TOL, rtol=0)


def test_cpm_optimum_by_hand():
    # Response 0: tokens with π_ref 0.5 (meaningful at α = 0.3) and 0.2 (not): factor 0.2.
    # Response 1: tokens 0.1 (not meaningful) and a padded position: factor 0.1.
    # Response 2: one token at exactly α = 0.3, not meaningful (strict >): factor 0.3.
    reward = torch.tensor([0.0, 1.0, 0.5], dtype=F64)
    ref = torch.tensor([[0.5, 0.2], [0.1, 0.01], [0.3, 0.9]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    beta = 0.5
    weights = torch.tensor(
        [math.exp(0.0) * 0.2, math.exp(2.0) * 0.1, math.exp(1.0) * 0.3], dtype=F64
    )
    expected = weights / weights.sum()
    torch.testing.assert_close(cpm_optimal_policy(reward, ref, mask, 0.3, beta), expected)


def test_cpm_limits_are_pm_and_kl():
    gen = torch.Generator().manual_seed(3)
    reward = torch.randn(2, 5, generator=gen, dtype=F64)
    ref = 0.05 + 0.9 * torch.rand(2, 5, 3, generator=gen, dtype=F64)
    mask = torch.ones(2, 5, 3, dtype=torch.bool)
    beta = 0.7
    # Every reference probability exceeds a tiny α: plain PM.
    torch.testing.assert_close(
        cpm_optimal_policy(reward, ref, mask, 1e-6, beta), pm_optimal_policy(reward, beta)
    )
    # None exceeds an α close to 1: KL-RLHF with the sequence reference Π_t π_ref(y_t|s_t).
    seq_ref = ref.prod(-1)
    torch.testing.assert_close(
        cpm_optimal_policy(reward, ref, mask, 0.999, beta),
        kl_optimal_policy(reward, seq_ref / seq_ref.sum(-1, keepdim=True), beta),
    )


@SETTINGS
@given(reward=rewards(), beta=floats(0.1, 3.0), weights=st.lists(floats(0.01, 1.0), min_size=6))
def test_pm_objective_is_reverse_kl_projection(reward, beta, weights):
    # J_PM(π) = β log Z − β KL(π ‖ softmax(r/β)) for every π (docs/method.md §3).
    n = reward.numel()
    w = torch.tensor(weights[:n], dtype=F64)
    probs = w / w.sum()
    target = pm_optimal_policy(reward, beta)
    log_z = torch.logsumexp(reward / beta, -1)
    kl = (probs * (probs.log() - target.log())).sum()
    torch.testing.assert_close(pm_objective(probs, reward, beta), beta * log_z - beta * kl)


def test_objectives_batch_over_leading_dims_and_handle_zero_probabilities():
    reward = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=F64)
    ref = torch.full_like(reward, 1 / 3)
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], dtype=F64)
    expected_pm = torch.tensor(
        [1.0, 0.25 * 0.5 - 0.25 + 1.5 - 2 * (0.5 * math.log(0.25) + 0.5 * math.log(0.5))],
        dtype=F64,
    )
    torch.testing.assert_close(pm_objective(probs, reward, 2.0), expected_pm)
    torch.testing.assert_close(
        kl_objective(probs, reward, ref, 2.0), expected_pm + 2.0 * math.log(1 / 3)
    )


def test_optimal_values_with_responses_the_reference_rules_out():
    # At the optimum, J_KL = β log Σ π_ref exp(r/β) and J_cPM = β log Σ exp(r/β) · bonus,
    # also when the reference gives a response (or one of its tokens) zero probability.
    reward = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    beta = 0.5
    ref = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    kl_policy = kl_optimal_policy(reward, ref, beta)
    assert float(kl_policy[2]) == 0.0
    torch.testing.assert_close(
        kl_objective(kl_policy, reward, ref, beta),
        beta * torch.log((ref * torch.exp(reward / beta)).sum()),
    )
    # Putting mass on the excluded response costs infinitely much.
    uniform = torch.full_like(reward, 1 / 3)
    assert float(kl_objective(uniform, reward, ref, beta)) == -math.inf

    ref_tokens = torch.tensor([[0.5], [0.0], [0.9]], dtype=F64)
    mask = torch.ones(3, 1, dtype=torch.bool)
    cpm_policy = cpm_optimal_policy(reward, ref_tokens, mask, 0.3, beta)
    assert float(cpm_policy[1]) == 0.0
    value = cpm_effective_objective(cpm_policy, reward, ref_tokens, mask, 0.3, beta)
    weights = torch.exp(reward / beta) * torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    torch.testing.assert_close(value, beta * torch.log(weights.sum()))


def test_kl_optimum_implied_preference_formula():
    # π*(1)/(π*(1)+π*(2)) = σ((r1 − r2)/β + log(π_ref1/π_ref2)) (docs/method.md §2).
    reward = torch.tensor([0.3, -0.4, 1.1], dtype=F64)
    ref = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    beta = 0.25
    pref = implied_preference(kl_optimal_policy(reward, ref, beta))
    expected = torch.sigmoid((reward[0] - reward[1]) / beta + torch.log(ref[0] / ref[1]))
    torch.testing.assert_close(pref[0, 1], expected)


@pytest.mark.parametrize(("beta", "expected"), [(1.0, 0.510), (0.1, 0.599), (0.01, 0.982)])
def test_collapse_example_51_49(beta, expected):
    reward = torch.tensor(default_collapse_reward(), dtype=F64)
    ref = torch.full_like(reward, 0.5)
    probs = kl_optimal_policy(reward, ref, beta)
    assert round(float(probs[0]), 3) == pytest.approx(expected, abs=1e-12)
    # PM stays at the labellers' 51% whatever the KL-RLHF β.
    assert float(pm_optimal_policy(reward)[0]) == pytest.approx(0.51, abs=1e-12)


def test_collapse_table_rows():
    reward = torch.tensor([0.0, 2.0, 1.0], dtype=F64)
    ref = torch.full_like(reward, 1 / 3)
    table = collapse_table(reward, ref, [1.0, 0.1])
    assert table["top_pair"] == [1, 2]
    assert [(r["method"], r["beta"]) for r in table["rows"]] == [
        ("kl", 1.0),
        ("kl", 0.1),
        ("pm", 1.0),
    ]
    pm_row = table["rows"][-1]
    assert pm_row["implied_preference"] == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))))
    assert pm_row["rm_preference"] == pytest.approx(pm_row["implied_preference"])
    assert pm_row["tv_to_pm_target"] == pytest.approx(0.0, abs=1e-12)
    sharp = table["rows"][1]
    assert sharp["implied_preference"] > pm_row["implied_preference"]
    assert sharp["minority_mass"] < table["target_minority_mass"]
    assert sharp["minority_mass"] == pytest.approx(1 - sharp["policy"][1])


@pytest.mark.parametrize(
    "call",
    [
        lambda: kl_optimal_policy(torch.zeros(2), torch.full((2,), 0.5), 0.0),
        lambda: pm_optimal_policy(torch.zeros(2), -1.0),
        lambda: pm_optimal_policy(torch.zeros(2), float("nan")),
    ],
)
def test_non_positive_beta_is_rejected(call):
    with pytest.raises(ValueError, match="beta"):
        call()


def test_shape_and_alpha_errors():
    with pytest.raises(ValueError, match="shape"):
        kl_optimal_policy(torch.zeros(3), torch.full((2,), 0.5), 1.0)
    ref = torch.full((2, 3), 0.5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        cpm_optimal_policy(torch.zeros(3), ref, mask, 0.1, 1.0)
    with pytest.raises(ValueError, match="token_mask shape"):
        cpm_optimal_policy(torch.zeros(2), ref, mask[:, :2], 0.1, 1.0)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            cpm_optimal_policy(torch.zeros(2), ref, mask, alpha, 1.0)


# --------------------------------------------------------------------------- ranking laws
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_pm_policy_ranking_law_equals_reward_plackett_luce_law(k):
    gen = torch.Generator().manual_seed(k)
    reward = 1.5 * torch.randn(k, generator=gen, dtype=F64)
    perms = torch.tensor(list(itertools.permutations(range(k))))

    pm_law = pl_probability(torch.log(pm_optimal_policy(reward))[perms])
    reward_law = pl_probability(reward[perms])
    torch.testing.assert_close(pm_law, reward_law, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(reward_law.sum(), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(pm_law.sum(), torch.tensor(1.0, dtype=F64))

    # The sharpened KL-RLHF optimum does not reproduce the reward's law.
    kl_policy = kl_optimal_policy(reward, torch.full_like(reward, 1 / k), 0.1)
    kl_law = pl_probability(torch.log(kl_policy)[perms])
    assert (kl_law - reward_law).abs().max() > 1e-2


def test_pl_by_hand():
    scores = torch.tensor([2.0, 1.0, 0.0], dtype=F64)
    e = math.e
    expected = e**2 / (e**2 + e + 1) * e / (e + 1)
    assert float(pl_probability(scores)) == pytest.approx(expected, rel=1e-12)


def test_pl_with_two_items_is_btl():
    winner = torch.tensor([0.3, 5.0, -100.0, 100.0, 0.0], dtype=F64)
    loser = torch.tensor([-1.2, 5.0, 100.0, -100.0, 40.0], dtype=F64)
    pl = pl_log_likelihood(torch.stack([winner, loser], dim=-1))
    torch.testing.assert_close(pl, btl_log_likelihood(winner, loser), atol=1e-12, rtol=1e-12)
    assert torch.isfinite(pl).all()
    torch.testing.assert_close(pl.exp(), btl_probability(winner, loser))


def test_padded_rankings_equal_unpadded():
    rankings = [[1.0, -0.5, 0.25, 2.0], [0.7, 0.1], [3.0, -1.0, 0.0], [0.4]]
    width = 5
    scores = torch.full((len(rankings), width), float("nan"), dtype=F64)
    scores[0, -1] = float("inf")  # padding may hold anything
    mask = torch.zeros(len(rankings), width, dtype=torch.bool)
    for i, ranking in enumerate(rankings):
        scores[i, : len(ranking)] = torch.tensor(ranking, dtype=F64)
        mask[i, : len(ranking)] = True
    padded = pl_log_likelihood(scores, mask)
    unpadded = torch.stack([pl_log_likelihood(torch.tensor(r, dtype=F64)) for r in rankings])
    torch.testing.assert_close(padded, unpadded)
    assert float(padded[-1]) == 0.0  # a one-item ranking is certain
    with pytest.raises(ValueError, match="mask shape"):
        pl_log_likelihood(scores, mask[:, :3])


# --------------------------------------------------------------------------- implied preference
@SETTINGS
@given(reward=rewards(max_n=7))
def test_implied_preference_properties(reward):
    n = reward.numel()
    probs = pm_optimal_policy(reward)
    pref = implied_preference(probs)
    assert pref.shape == (n, n)
    torch.testing.assert_close(pref + pref.T, torch.ones(n, n, dtype=F64))
    assert torch.equal(pref.diagonal(), torch.full((n,), 0.5, dtype=F64))
    torch.testing.assert_close(pref, torch.sigmoid(reward[:, None] - reward[None, :]))


def test_implied_preference_batched_and_zero_mass_pairs():
    probs = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]], dtype=F64)
    pref = implied_preference(probs)
    assert pref.shape == (2, 3, 3)
    assert not torch.isnan(pref).any()
    assert float(pref[0, 0, 1]) == 0.5
    assert float(pref[0, 2, 0]) == 1.0
    assert float(pref[1, 0, 1]) == pytest.approx(0.4)
    torch.testing.assert_close(pref + pref.transpose(-1, -2), torch.ones(2, 3, 3, dtype=F64))


# --------------------------------------------------------------------------- ODE family
MEMBERS = [(0.0, 0.0), (1.5, 0.0), (0.0, 2.0), (-1.0, -3.0), (2.5, 0.7)]


@pytest.mark.parametrize(("c1", "c2"), MEMBERS)
@settings(max_examples=5, deadline=None)
@given(reward=rewards(max_n=5), seed=st.integers(0, 2**16))
def test_ode_family_members_have_the_pm_optimum(c1, c2, reward, seed):
    regularizer = ODERegularizer(c1=c1, c2=c2)
    numeric = maximise(
        lambda p: regularized_objective(p, reward, regularizer), reward.numel(), seed
    )
    torch.testing.assert_close(numeric, torch.softmax(reward, -1), atol=PROB_TOL, rtol=0)


@pytest.mark.parametrize(("c1", "c2"), MEMBERS)
def test_ode_residual_is_constant(c1, c2):
    z = torch.linspace(0.001, 1.0, 50, dtype=F64)
    residual = ODERegularizer(c1=c1, c2=c2).ode_residual(z)
    torch.testing.assert_close(residual, torch.full_like(z, c1 - 1.0))


@dataclass(frozen=True)
class _DoubledLog(ODERegularizer):
    """R(z) = −2 log z: not a solution of the PM ODE."""

    def __call__(self, z: Tensor) -> Tensor:
        return -2.0 * torch.log(z)


def test_non_member_regularizer_gives_tempered_optimum():
    reward = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
    regularizer = _DoubledLog()
    numeric = maximise(lambda p: regularized_objective(p, reward, regularizer), 4)
    torch.testing.assert_close(numeric, torch.softmax(reward / 2, -1), atol=PROB_TOL, rtol=0)
    assert (numeric - torch.softmax(reward, -1)).abs().max() > 0.05
    residual = regularizer.ode_residual(torch.linspace(0.01, 1.0, 20, dtype=F64))
    assert float(residual.max() - residual.min()) > 1.0
