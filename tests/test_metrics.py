"""PMD (docs/method.md §6) and the distribution-matching metrics for enumerable response sets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pmrlhf.metrics import (
    kl_divergence,
    minority_mass,
    pmd,
    pmd_improvement,
    preference_calibration_error,
    total_variation,
)
from pmrlhf.theory import kl_optimal_policy, pm_optimal_policy

F64 = torch.float64


def pair_data(seed: int, n: int = 64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    r1, r2, shift, noise_1, noise_2 = torch.randn(5, n, generator=gen, dtype=F64)
    return r1, r2, shift, noise_1, noise_2


# --------------------------------------------------------------------------- PMD
def test_pmd_is_exactly_zero_when_log_odds_match_reward_differences():
    # logp = r + const per prompt, with values exact in binary floating point.
    r1 = torch.tensor([1.5, -0.25, 3.0, 0.0])
    r2 = torch.tensor([0.5, 0.75, -2.0, 0.0])
    const = torch.tensor([-4.0, -8.0, -16.0, -1.0])
    assert float(pmd(r1, r2, r1 + const, r2 + const)) == 0.0


def test_pmd_is_zero_for_any_per_prompt_offset():
    r1, r2, shift, _, _ = pair_data(0)
    value = float(pmd(r1, r2, r1 + 10 * shift - 7.0, r2 + 10 * shift - 7.0))
    assert value == pytest.approx(0.0, abs=1e-25)


def test_pmd_grows_with_the_mismatch():
    r1, r2, shift, noise_1, noise_2 = pair_data(1)
    scales = [0.0, 0.1, 0.5, 1.0, 2.0, 5.0]
    values = [
        float(pmd(r1, r2, r1 + shift + s * noise_1, r2 + shift + s * noise_2)) for s in scales
    ]
    assert values[0] == pytest.approx(0.0, abs=1e-25)
    assert all(a < b for a, b in itertools.pairwise(values))
    # The divergence is the mean squared log-odds error, so it scales quadratically.
    base = float(((noise_1 - noise_2) ** 2).mean())
    for s, v in zip(scales, values):
        assert v == pytest.approx(s**2 * base, rel=1e-9, abs=1e-25)


def test_pmd_by_hand_and_as_float64():
    r1 = torch.tensor([1.0, 0.0], dtype=torch.float32)
    r2 = torch.tensor([0.0, 0.0], dtype=torch.float32)
    logp1 = torch.tensor([-1.0, -2.0], dtype=torch.float32)
    logp2 = torch.tensor([-1.0, -1.0], dtype=torch.float32)
    # gaps: (1 − 0) − 0 = 1 and 0 − (−1) = 1 → mean of squares = 1
    value = pmd(r1, r2, logp1, logp2)
    assert value.dtype == F64
    assert float(value) == 1.0
    assert float(pmd(r1, r2, logp1, torch.tensor([-1.0, -5.0]))) == pytest.approx(5.0)


def test_pmd_shape_mismatch():
    with pytest.raises(ValueError, match="share one shape"):
        pmd(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(4))


def test_pmd_improvement():
    assert pmd_improvement(2.0, 1.3) == pytest.approx(0.35)
    assert pmd_improvement(torch.tensor(4.0), torch.tensor(1.0)) == pytest.approx(0.75)
    assert pmd_improvement(1.0, 1.5) == pytest.approx(-0.5)
    assert pmd_improvement(3.0, 3.0) == 0.0
    assert isinstance(pmd_improvement(torch.tensor(2.0), 1.0), float)
    for baseline in (0.0, -1.0, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="baseline PMD must be > 0"):
            pmd_improvement(baseline, 0.5)


# --------------------------------------------------------------------------- distributions
def test_total_variation():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=F64)
    q = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]], dtype=F64)
    assert total_variation(p, q).tolist() == [1.0, 0.0]
    a = torch.tensor([0.1, 0.6, 0.3], dtype=F64)
    b = torch.tensor([0.4, 0.4, 0.2], dtype=F64)
    assert float(total_variation(a, b)) == pytest.approx(0.3)
    assert float(total_variation(b, a)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="shape"):
        total_variation(a, b[:2])


def test_kl_divergence():
    p = torch.tensor([0.25, 0.75], dtype=F64)
    q = torch.tensor([0.5, 0.5], dtype=F64)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(kl_divergence(p, q)) == pytest.approx(expected)
    assert float(kl_divergence(p, p)) == 0.0
    # 0 log 0 = 0, also where q is zero too.
    assert float(kl_divergence(torch.tensor([0.0, 1.0]), q.float())) == pytest.approx(math.log(2))
    zero_both = kl_divergence(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert float(zero_both) == 0.0
    # Mass where q has none: infinite.
    assert math.isinf(float(kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))))
    batched = kl_divergence(
        torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    )
    assert batched.tolist() == [0.0, math.inf]
    with pytest.raises(ValueError, match="shape"):
        kl_divergence(p, torch.ones(3) / 3)


def test_kl_divergence_to_the_pm_target_is_zero_only_at_the_pm_optimum():
    reward = torch.tensor([1.0, 0.2, -0.5], dtype=F64)
    target = pm_optimal_policy(reward)
    assert float(kl_divergence(target, target)) == 0.0
    kl_policy = kl_optimal_policy(reward, torch.full_like(reward, 1 / 3), 0.1)
    assert float(kl_divergence(kl_policy, target)) > 0.1


def test_minority_mass_both_modes():
    target = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=F64)
    probs = torch.tensor([[0.9, 0.06, 0.04], [0.25, 0.25, 0.5]], dtype=F64)
    # Default: everything but the target's majority response.
    torch.testing.assert_close(minority_mass(probs, target), torch.tensor([0.1, 0.5], dtype=F64))
    # With a share: responses whose target share is below it.
    torch.testing.assert_close(
        minority_mass(probs, target, share=0.25), torch.tensor([0.04, 0.5], dtype=F64)
    )
    torch.testing.assert_close(
        minority_mass(probs, target, share=0.05), torch.tensor([0.0, 0.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="shape"):
        minority_mass(probs, target[:, :2])


def test_minority_mass_shows_collapse():
    reward = torch.tensor([math.log(0.51 / 0.49), 0.0], dtype=F64)
    target = pm_optimal_policy(reward)
    collapsed = kl_optimal_policy(reward, torch.full_like(reward, 0.5), 0.01)
    assert float(minority_mass(target, target)) == pytest.approx(0.49)
    assert float(minority_mass(collapsed, target)) == pytest.approx(0.018, abs=5e-4)


def test_preference_calibration_error():
    gen = torch.Generator().manual_seed(2)
    reward = torch.randn(3, 5, generator=gen, dtype=F64)
    pm = pm_optimal_policy(reward)
    error_pm = preference_calibration_error(pm, reward)
    assert error_pm.shape == (3,)
    torch.testing.assert_close(error_pm, torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)

    kl = kl_optimal_policy(reward, torch.full_like(reward, 1 / 5), 0.1)
    error_kl = preference_calibration_error(kl, reward)
    assert (error_kl > 0.1).all()

    # By hand: two responses, policy 0.75/0.25 while σ(r1 − r2) = 0.5.
    value = preference_calibration_error(
        torch.tensor([0.75, 0.25], dtype=F64), torch.zeros(2, dtype=F64)
    )
    assert float(value) == pytest.approx(0.25)

    with pytest.raises(ValueError, match="at least two"):
        preference_calibration_error(torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        preference_calibration_error(torch.ones(3) / 3, torch.zeros(2))


def test_pmd_over_all_pairs_is_zero_at_softmax_and_sees_collapse():
    from pmrlhf.metrics import pmd_all_pairs

    rewards = torch.tensor([1.0, 0.4, -0.3, -1.2])
    matched = torch.log_softmax(rewards, -1) - 2.0  # any shift: only differences count
    assert float(pmd_all_pairs(rewards, matched)) == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.log(torch.tensor([0.997, 0.001, 0.001, 0.001]))
    brute = (
        sum(
            ((rewards[i] - rewards[j]) - (collapsed[i] - collapsed[j])).item() ** 2
            for i, j in itertools.combinations(range(4), 2)
        )
        / 6
    )
    assert float(pmd_all_pairs(rewards, collapsed)) == pytest.approx(brute)
    assert brute > 10
    # leading dimensions (prompts) are averaged with the pairs
    both = pmd_all_pairs(torch.stack([rewards, rewards]), torch.stack([matched, collapsed]))
    assert float(both) == pytest.approx(brute / 2)
    with pytest.raises(ValueError, match="at least 2 responses"):
        pmd_all_pairs(rewards[:1], matched[:1])
