"""Per-token penalties of docs/method.md §4: values, thresholds, masking, dtypes and errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pmrlhf.regularizers import (
    REGULARIZERS,
    CPMRegularizer,
    KLRegularizer,
    PMRegularizer,
    Regularizer,
    cpm_penalty,
    kl_penalty,
    make_regularizer,
    meaningful_tokens,
    pm_penalty,
    register_regularizer,
    sequence_probs,
)
from pmrlhf.theory import (
    cpm_effective_objective,
    cpm_optimal_policy,
    kl_optimal_policy,
    pm_optimal_policy,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# A hand-checked example. Every number is exactly representable in all four dtypes.
# α = 0.3, log α ≈ −1.204: positions 0 and 2 are meaningful (π_ref above α), position 1 is
# not, position 3 is padding.
LOGP = [-0.5, -1.0, -2.0, -0.25]
REF_LOGP = [-0.25, -3.0, -1.0, -0.75]
MASK = [True, True, True, False]
ALPHA = 0.3
KL_EXPECTED = [-0.25, 2.0, -1.0, 0.0]  # logp − ref_logp
PM_EXPECTED = [-0.5, -1.0, -2.0, 0.0]  # logp
CPM_EXPECTED = [-0.5, 2.0, -2.0, 0.0]  # logp where meaningful, logp − ref_logp elsewhere


def example(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(LOGP, dtype=dtype),
        torch.tensor(REF_LOGP, dtype=dtype),
        torch.tensor(MASK),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_computed_penalties_keep_dtype(dtype):
    logp, ref_logp, mask = example(dtype)
    cases = {
        "kl": (kl_penalty(logp, ref_logp, mask), KL_EXPECTED),
        "pm": (pm_penalty(logp, mask), PM_EXPECTED),
        "cpm": (cpm_penalty(logp, ref_logp, mask, ALPHA), CPM_EXPECTED),
    }
    for name, (got, expected) in cases.items():
        assert got.dtype == dtype, name
        assert got.tolist() == expected, name
    assert meaningful_tokens(ref_logp, mask, ALPHA).tolist() == [True, False, True, False]


@pytest.mark.parametrize("dtype", DTYPES)
def test_regularizer_objects_and_token_rewards(dtype):
    logp, ref_logp, mask = example(dtype)
    beta = 0.5
    regs = {
        "kl": (KLRegularizer(beta=beta), KL_EXPECTED),
        "pm": (PMRegularizer(beta=beta), PM_EXPECTED),
        "cpm": (CPMRegularizer(beta=beta, alpha=ALPHA), CPM_EXPECTED),
    }
    for name, (reg, expected) in regs.items():
        penalty = reg.penalty(logp, ref_logp, mask)
        rewards = reg.token_rewards(logp, ref_logp, mask)
        assert penalty.tolist() == expected, name
        assert rewards.dtype == dtype, name
        assert rewards.tolist() == [-beta * p for p in expected], name
        torch.testing.assert_close(rewards, -beta * penalty)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.9])
def test_threshold_is_strict_in_the_inputs_dtype(dtype, alpha):
    at = torch.tensor(math.log(alpha), dtype=dtype)
    above = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype))
    below = torch.nextafter(at, torch.tensor(-math.inf, dtype=dtype))
    assert below < at < above
    ref_logp = torch.stack([below, at, above])
    mask = torch.ones(3, dtype=torch.bool)
    assert meaningful_tokens(ref_logp, mask, alpha).tolist() == [False, False, True]

    logp = torch.full((3,), -0.5, dtype=dtype)
    penalty = cpm_penalty(logp, ref_logp, mask, alpha)
    assert penalty.dtype == dtype
    assert torch.equal(penalty[:2], (logp - ref_logp)[:2])
    assert float(penalty[2]) == -0.5


def test_fully_masked_row_is_zero_without_nan():
    nan, inf = math.nan, math.inf
    logp = torch.tensor([[-inf, nan, 0.0, -1.0], [-0.5, -1.0, -inf, nan]], dtype=torch.float32)
    ref_logp = torch.tensor([[nan, -inf, -inf, -2.0], [-0.25, -3.0, nan, -inf]])
    mask = torch.tensor([[False] * 4, [True, True, False, False]])
    outputs = {
        "kl": kl_penalty(logp, ref_logp, mask),
        "pm": pm_penalty(logp, mask),
        "cpm": cpm_penalty(logp, ref_logp, mask, ALPHA),
        "cpm-rewards": CPMRegularizer(beta=0.1, alpha=ALPHA).token_rewards(logp, ref_logp, mask),
    }
    for name, out in outputs.items():
        assert not torch.isnan(out).any(), name
        assert torch.isfinite(out).all(), name
        assert out[0].tolist() == [0.0] * 4, name
        assert out[1, 2:].tolist() == [0.0, 0.0], name
    assert outputs["kl"][1, :2].tolist() == [-0.25, 2.0]
    assert outputs["cpm"][1, :2].tolist() == [-0.5, 2.0]


def test_masked_non_finite_values_do_not_poison_gradients():
    logp = torch.tensor([-0.5, -math.inf, math.nan]).requires_grad_(True)
    ref_logp = torch.tensor([-0.25, -math.inf, -math.inf])
    mask = torch.tensor([True, False, False])
    for penalty in (
        kl_penalty(logp, ref_logp, mask),
        pm_penalty(logp, mask),
        cpm_penalty(logp, ref_logp, mask, ALPHA),
    ):
        (grad,) = torch.autograd.grad(penalty.sum(), logp)
        assert grad.tolist() == [1.0, 0.0, 0.0]


def test_cpm_decomposes_into_kl_plus_reference_bonus():
    # −β Σ p_t(cPM) = −β Σ (log π − log π_ref) − β Σ_{meaningful} log π_ref (docs/method.md §4).
    gen = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(3, 7, generator=gen, dtype=torch.float64))
    ref_logp = torch.log(torch.rand(3, 7, generator=gen, dtype=torch.float64))
    mask = torch.rand(3, 7, generator=gen) > 0.3
    beta, alpha = 0.4, 0.35
    meaningful = meaningful_tokens(ref_logp, mask, alpha)
    assert meaningful.any() and (mask & ~meaningful).any()
    lhs = -beta * cpm_penalty(logp, ref_logp, mask, alpha).sum(-1)
    rhs = -beta * kl_penalty(logp, ref_logp, mask).sum(-1) - beta * torch.where(
        meaningful, ref_logp, 0.0
    ).sum(-1)
    torch.testing.assert_close(lhs, rhs)


def test_expected_shaped_return_is_the_cpm_effective_objective():
    # For a finite set of responses, E_{y~π}[r(y) − β Σ_t p_t(y)] is the sequence-level
    # objective that theory.cpm_effective_objective maximises.
    gen = torch.Generator().manual_seed(1)
    n, t = 4, 5
    reward = torch.randn(n, generator=gen, dtype=torch.float64)
    ref_probs = 0.05 + 0.9 * torch.rand(n, t, generator=gen, dtype=torch.float64)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    probs = torch.softmax(torch.randn(n, generator=gen, dtype=torch.float64), -1)
    # Spread each response's log-probability over its real tokens.
    lengths = mask.sum(-1, keepdim=True)
    token_logp = torch.where(mask, torch.log(probs)[:, None] / lengths, 0.0)
    alpha, beta = 0.4, 0.7
    penalty = cpm_penalty(token_logp, torch.log(ref_probs), mask, alpha)
    expected_return = (probs * (reward - beta * penalty.sum(-1))).sum()
    torch.testing.assert_close(
        expected_return,
        cpm_effective_objective(probs, reward, ref_probs, mask, alpha, beta),
    )


@pytest.mark.parametrize("alpha", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan])
def test_invalid_alpha_is_rejected(alpha):
    logp, ref_logp, mask = example(torch.float32)
    calls = [
        lambda: CPMRegularizer(beta=1.0, alpha=alpha),
        lambda: make_regularizer("cpm", 1.0, alpha),
        lambda: cpm_penalty(logp, ref_logp, mask, alpha),
        lambda: meaningful_tokens(ref_logp, mask, alpha),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="alpha"):
            call()


@pytest.mark.parametrize("beta", [0.0, -0.1, -1, math.nan, math.inf])
@pytest.mark.parametrize("name", ["kl", "pm", "cpm"])
def test_invalid_beta_is_rejected(name, beta):
    with pytest.raises(ValueError, match="beta"):
        make_regularizer(name, beta, alpha=0.1)
    params = {"alpha": 0.1} if name == "cpm" else {}  # cpm's α has no default
    with pytest.raises(ValueError, match="beta"):
        REGULARIZERS[name](beta=beta, **params)


def test_shape_mismatch_is_rejected_with_the_shapes():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"shape mismatch.*ref_logp=\(2, 4\)"):
        kl_penalty(logp, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match=r"shape mismatch.*mask=\(3,\)"):
        pm_penalty(logp, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape mismatch"):
        cpm_penalty(logp, torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        CPMRegularizer(alpha=0.1).penalty(logp, torch.zeros(3, 2), mask)


def test_needs_ref_and_missing_reference():
    assert KLRegularizer.needs_ref is True
    assert CPMRegularizer.needs_ref is True
    assert PMRegularizer.needs_ref is False
    logp = torch.tensor([-0.5, -1.0])
    mask = torch.ones(2, dtype=torch.bool)
    for reg in (KLRegularizer(beta=0.1), CPMRegularizer(beta=0.1, alpha=0.2)):
        assert reg.needs_ref
        with pytest.raises(ValueError, match="ref_logp"):
            reg.penalty(logp, None, mask)
    pm = PMRegularizer(beta=0.1)
    assert not pm.needs_ref
    assert pm.penalty(logp, None, mask).tolist() == [-0.5, -1.0]


def test_make_regularizer_by_name():
    kl = make_regularizer("kl", 0.1)
    pm = make_regularizer("pm", 0.5)
    cpm = make_regularizer("cpm", 1.0, alpha=0.3)
    assert type(kl) is KLRegularizer and kl.name == "kl" and kl.beta == 0.1
    assert type(pm) is PMRegularizer and pm.name == "pm" and pm.beta == 0.5
    assert type(cpm) is CPMRegularizer and cpm.name == "cpm"
    assert (cpm.beta, cpm.alpha) == (1.0, 0.3)
    assert sorted(REGULARIZERS) == ["cpm", "kl", "pm"]
    with pytest.raises(ValueError, match=r"unknown regularizer 'dpo'.*\['cpm', 'kl', 'pm'\]"):
        make_regularizer("dpo", 0.1)
    with pytest.raises(ValueError, match="alpha"):
        make_regularizer("cpm", 0.1)


def test_make_regularizer_passes_only_the_fields_a_class_declares():
    assert make_regularizer("kl", 0.1, alpha=0.3) == KLRegularizer(beta=0.1)  # α ignored
    assert make_regularizer("cpm", 0.5, alpha=0.3) == CPMRegularizer(beta=0.5, alpha=0.3)
    with pytest.raises(ValueError, match=r"'pm' regularizer has no parameter\(s\) \['gamma'\]"):
        make_regularizer("pm", 1.0, gamma=2.0)
    with pytest.raises(TypeError, match="alpha"):
        CPMRegularizer(beta=1.0)  # type: ignore[call-arg]


def test_register_regularizer_checks_what_it_registers():
    with pytest.raises(TypeError, match="Regularizer subclass"):
        register_regularizer("not-a-regularizer")(int)  # type: ignore[type-var]

    class Undecorated(PMRegularizer):
        pass

    with pytest.raises(TypeError, match="dataclass"):
        register_regularizer("undecorated")(Undecorated)

    @dataclasses.dataclass(frozen=True)
    class Impostor(PMRegularizer):
        pass

    with pytest.raises(ValueError, match="'pm' is already taken by PMRegularizer"):
        register_regularizer("pm")(Impostor)
    assert REGULARIZERS["pm"] is PMRegularizer


REWARD = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
REF = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.2, 0.3]], dtype=torch.float64)


def test_builtin_optima_are_the_closed_forms_of_theory():
    beta, alpha = 0.7, 0.25
    token_probs = REF.unsqueeze(-1)
    torch.testing.assert_close(
        make_regularizer("pm", beta).optimal_policy(REWARD, token_probs),
        pm_optimal_policy(REWARD, beta),
    )
    torch.testing.assert_close(
        make_regularizer("kl", beta).optimal_policy(REWARD, token_probs),
        kl_optimal_policy(REWARD, REF, beta),
    )
    torch.testing.assert_close(
        make_regularizer("cpm", beta, alpha).optimal_policy(REWARD, token_probs),
        cpm_optimal_policy(REWARD, token_probs, torch.ones_like(token_probs), alpha, beta),
    )


def test_kl_optimum_of_multi_token_responses_uses_the_sequence_probability():
    token_probs = torch.tensor([[[0.5, 0.2], [0.9, 0.7], [0.3, 0.25]]], dtype=torch.float64)
    token_mask = torch.tensor([[[1, 1], [1, 0], [1, 1]]], dtype=torch.bool)
    ref = torch.tensor([[0.5 * 0.2, 0.9, 0.3 * 0.25]], dtype=torch.float64)
    torch.testing.assert_close(sequence_probs(token_probs, token_mask), ref)
    reward = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        make_regularizer("kl", 0.5).optimal_policy(reward, token_probs, token_mask),
        kl_optimal_policy(reward, ref, 0.5),
    )


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_each_registered_optimum_is_a_fixed_point_of_its_penalty(name):
    """At π*, the shaped return ``r_y − β p_y`` of every one-token response is the same
    constant: the stationarity condition of ``max_π E_π[r − β p]`` on the simplex."""
    regularizer = make_regularizer(name, 0.7, alpha=0.25)
    optimum = regularizer.optimal_policy(REWARD, REF.unsqueeze(-1))
    torch.testing.assert_close(optimum.sum(-1), torch.ones(2, dtype=torch.float64))
    mask = torch.ones_like(REWARD, dtype=torch.bool)
    shaped = REWARD + regularizer.token_rewards(optimum.log(), REF.log(), mask)
    torch.testing.assert_close(shaped - shaped[:, :1], torch.zeros_like(shaped))


def test_the_base_class_has_no_optimum():
    with pytest.raises(NotImplementedError, match="closed-form"):
        Regularizer(beta=1.0).optimal_policy(REWARD, REF.unsqueeze(-1))
