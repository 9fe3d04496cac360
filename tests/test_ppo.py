"""PPO's named steps against hand-computed cases."""

import math

import pytest
import torch

from dpo_bench.methods.ppo import clipped_policy_loss, clipped_value_loss, gae, kl_penalised_rewards, whiten


def test_kl_penalised_reward_puts_the_score_on_the_last_token():
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(logps, ref, torch.tensor([3.0]), mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, 0.1 + 3.0, 0.0]]))


def test_gae_matches_a_hand_computed_case():
    # Three completion tokens after one prompt position, then padding.
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    d3 = 2.0 - 1.5
    d2 = 0.0 + gamma * 1.5 - 1.0
    d1 = 1.0 + gamma * 1.0 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 1.0, a3 + 1.5, 0.0]]))


def test_gae_with_gamma_one_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.3, -0.1, 1.0]])
    values = torch.tensor([[0.2, 0.4, -0.3]])
    mask = torch.ones(1, 3)
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    returns_to_go = torch.tensor([[1.2, 0.9, 1.0]])
    assert torch.allclose(adv, returns_to_go - values)


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, 3] == 0
    assert abs(w[0, :3].mean().item()) < 1e-6
    assert abs((w[0, :3] ** 2).mean().item() - 1) < 1e-4


@pytest.mark.parametrize("ratio,adv,expected", [
    (1.5, 1.0, -1.2),   # positive advantage: gain capped at 1 + ε
    (0.5, 1.0, -0.5),   # below the clip: unclipped term is the max
    (0.5, -1.0, 0.8),   # negative advantage: loss floored at (1 − ε)·|A|
    (1.5, -1.0, 1.5),
])
def test_clipped_surrogate(ratio, adv, expected):
    logps = torch.tensor([[math.log(ratio)]])
    loss = clipped_policy_loss(logps, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), clip_range=0.2)
    assert abs(loss.item() - expected) < 1e-6


def test_clipped_value_loss_takes_the_pessimistic_branch():
    values, old, returns = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]])
    # clipped value 1.2 is further from the return (1.8² > 1²)
    loss = clipped_value_loss(values, old, returns, torch.ones(1, 1), clip_range=0.2)
    assert abs(loss.item() - 0.5 * 1.8 ** 2) < 1e-6
