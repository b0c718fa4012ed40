"""Advantage estimators and losses against hand-computed values and closed forms."""

from __future__ import annotations

import pytest
import torch

from pmrlhf.rl import advantages as adv
from pmrlhf.rl.losses import aggregate, clipped_policy_loss, clipped_value_loss
from pmrlhf.rl.rollout import response_mask_from_ids

# two responses: lengths 3 and 2 (right-padded)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, 99.0]])  # 99 sits on padding


def test_sequence_returns_and_rewards_to_go_ignore_padding():
    torch.testing.assert_close(adv.sequence_returns(REWARDS, MASK), torch.tensor([0.9, 2.5]))
    togo = adv.rewards_to_go(REWARDS, MASK, gamma=0.5)
    expected = torch.tensor([[0.1 - 0.1 + 0.25, -0.2 + 0.5, 1.0], [0.5 + 1.0, 2.0, 0.0]])
    torch.testing.assert_close(togo, expected)


def test_gae_limits():
    values = torch.tensor([[0.3, 0.1, -0.4], [0.2, 0.7, 5.0]])
    # λ = 1, γ = 1: advantage = reward-to-go − value
    advantages, returns = adv.gae(REWARDS, values, MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, (adv.rewards_to_go(REWARDS, MASK) - values) * MASK)
    torch.testing.assert_close(returns, adv.rewards_to_go(REWARDS, MASK))
    # λ = 0: the one-step TD error r_t + γ V_{t+1} − V_t, with V = 0 after the last token
    advantages, _ = adv.gae(REWARDS, values, MASK, gamma=0.9, lam=0.0)
    expected = torch.tensor(
        [
            [0.1 + 0.9 * 0.1 - 0.3, -0.2 + 0.9 * -0.4 - 0.1, 1.0 + 0.4],
            [0.5 + 0.9 * 0.7 - 0.2, 2.0 - 0.7, 0.0],
        ]
    )
    torch.testing.assert_close(advantages, expected)


def test_rloo_and_group_mean_baselines():
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts × 3 samples
    rloo = adv.rloo_advantages(returns, group_size=3)
    torch.testing.assert_close(
        rloo, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    )
    grpo = adv.group_mean_advantages(returns, group_size=3)
    torch.testing.assert_close(grpo, torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))
    # RLOO is the group-mean advantage rescaled by k/(k−1): no std normalisation anywhere
    torch.testing.assert_close(rloo, grpo * 3 / 2)
    with pytest.raises(ValueError, match="at least 2"):
        adv.rloo_advantages(returns, group_size=1)
    with pytest.raises(ValueError, match="multiple"):
        adv.rloo_advantages(returns, group_size=4)


def test_reinforce_pp_uses_a_leave_one_out_global_baseline():
    a = adv.reinforce_pp_advantages(REWARDS, MASK)
    # rewards-to-go: [0.9, 0.8, 1.0] and [2.5, 2.0, -]; each sequence's baseline is the token
    # mean of the *other* sequence's rewards-to-go: 2.25 for the first, 0.9 for the second
    expected = torch.tensor([[0.9 - 2.25, 0.8 - 2.25, 1.0 - 2.25], [2.5 - 0.9, 2.0 - 0.9, 0.0]])
    torch.testing.assert_close(a, expected)
    # a batch of one has no other sample: baseline 0
    one = adv.reinforce_pp_advantages(REWARDS[:1], MASK[:1])
    torch.testing.assert_close(one, adv.rewards_to_go(REWARDS[:1], MASK[:1]))


@pytest.mark.parametrize("batch", [2, 3, 4])
@pytest.mark.parametrize("lengths", [(1, 1), (1, 2)])
def test_reinforce_pp_gradient_estimate_is_unbiased_on_a_two_token_bandit(batch, lengths):
    """E[mean_i Σ_t A_it ∇log π(y_it)] equals ∇ E_π[return] exactly, by enumerating every batch.

    The first token picks one of two responses; with lengths (1, 2) the second response has a
    further, deterministic token (∇log π = 0 there) that carries part of its reward. A global
    baseline that includes the sample's own return scales the estimate by (1 − 1/B) for equal
    lengths, and by a factor that depends on the lengths and returns for unequal ones.
    """
    import itertools

    beta = 0.5
    logits = torch.tensor([0.3, -0.4], dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    reward = torch.tensor([1.0, -0.5], dtype=torch.float64)
    first = reward - beta * probs.log()  # −β log π of the choice, plus the reward ...
    rows = torch.zeros(2, 2, dtype=torch.float64)
    masks = torch.zeros(2, 2, dtype=torch.float64)
    for y, length in enumerate(lengths):
        masks[y, :length] = 1.0
        rows[y, 0] = first[y]
    if lengths[1] == 2:  # ... part of which arrives on the deterministic second token
        rows[1, 0], rows[1, 1] = first[1] - 2.0, 2.0
    returns = (rows * masks).sum(-1)
    eye = torch.eye(2, dtype=torch.float64)
    true_gradient = sum(probs[y] * returns[y] * (eye[y] - probs) for y in range(2))
    expected_estimate = torch.zeros(2, dtype=torch.float64)
    for ys in itertools.product(range(2), repeat=batch):
        chance = torch.prod(torch.stack([probs[y] for y in ys]))
        a = adv.reinforce_pp_advantages(rows[list(ys)], masks[list(ys)])
        estimate = sum(a[i, 0] * (eye[y] - probs) for i, y in enumerate(ys)) / batch
        expected_estimate += chance * estimate
    torch.testing.assert_close(expected_estimate, true_gradient)


def test_sequence_reward_goes_to_the_last_response_token():
    token_rewards = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, 0.0]])
    out = adv.add_sequence_reward(token_rewards, torch.tensor([1.0, 2.0]), MASK)
    torch.testing.assert_close(out, torch.tensor([[-0.1, -0.2, 0.7], [-0.4, 1.5, 0.0]]))
    assert token_rewards[0, 2] == -0.3  # the input is not modified


def test_estimators_are_registered_by_algo_name():
    assert set(adv.ADVANTAGE_ESTIMATORS) >= {"ppo", "rloo", "grpo", "reinforce_pp"}
    settings = adv.AdvantageSettings(group_size=2, gamma=0.9, lam=0.5)
    values = torch.tensor([[0.3, 0.1, -0.4], [0.2, 0.7, 5.0]])
    estimators = adv.ADVANTAGE_ESTIMATORS
    assert [name for name, e in estimators.items() if e.needs_critic] == ["ppo"]
    assert estimators["rloo"].min_group_size == estimators["grpo"].min_group_size == 2
    ppo = estimators["ppo"](REWARDS, MASK, values, settings)
    torch.testing.assert_close(ppo, adv.gae(REWARDS, values, MASK, 0.9, 0.5))
    returns = adv.sequence_returns(REWARDS, MASK)
    rloo, no_returns = estimators["rloo"](REWARDS, MASK, None, settings)
    torch.testing.assert_close(rloo, adv.rloo_advantages(returns, 2).unsqueeze(-1) * MASK)
    assert no_returns is None
    grpo, _ = estimators["grpo"](REWARDS, MASK, None, settings)
    torch.testing.assert_close(grpo, adv.group_mean_advantages(returns, 2).unsqueeze(-1) * MASK)
    rpp, _ = estimators["reinforce_pp"](REWARDS, MASK, None, settings)
    torch.testing.assert_close(rpp, adv.reinforce_pp_advantages(REWARDS, MASK, 0.9))
    with pytest.raises(ValueError, match="'ppo' estimator needs critic values"):
        estimators["ppo"](REWARDS, MASK, None, settings)


def test_clipped_policy_loss():
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.3, 0.3]]))
    old = torch.log(torch.tensor([[0.25, 0.4], [0.3, 0.6]]))  # ratios 2, 1, 1, 0.5
    advantage = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    mask = torch.ones(2, 2)
    loss, clip_fraction = clipped_policy_loss(
        logp, old, advantage, mask, clip=0.2, aggregation="token-mean"
    )
    # per token: max(−A·r, −A·clip(r)) = −1.2, −1, −1, +0.8  -> mean −0.6
    assert float(loss) == pytest.approx(-0.6)
    assert float(clip_fraction) == pytest.approx(0.5)
    # with old = current (one pass per batch) the gradient is the plain policy gradient
    logits = torch.zeros(3, requires_grad=True)
    logp1 = torch.log_softmax(logits, -1)[:1].unsqueeze(0)
    loss, _ = clipped_policy_loss(
        logp1, logp1.detach(), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2, "seq-mean-token-sum"
    )
    loss.backward()
    torch.testing.assert_close(logits.grad, -2.0 * (torch.tensor([1.0, 0, 0]) - 1 / 3))


def test_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert float(aggregate(values, MASK, "seq-mean-token-sum")) == pytest.approx((6 + 9) / 2)
    assert float(aggregate(values, MASK, "token-mean")) == pytest.approx(15 / 5)
    with pytest.raises(ValueError):
        aggregate(values, MASK, "bogus")


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    # token 1: max((1−0)², (0.2−0)²) = 1; token 2: max(1, 1) = 1  -> ½ · mean = 0.5
    assert float(
        clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    ) == pytest.approx(0.5)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
