"""PPO's named steps against hand-computed cases."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpo_bench.configs import ConfigError
from dpo_bench.generation import truncated
from dpo_bench.logprobs import collate
from dpo_bench.methods.ppo import (
    AdaptiveKLController, PolicyWithValueHead, PPOConfig, clipped_policy_loss, clipped_value_loss, eos_penalised_scores, gae,
    initial_critic, initial_value_head, kl_penalised_rewards, reward_normaliser, whiten,
)
from reward.model import RewardModel
from reward.normalise import Normaliser


def test_kl_penalised_reward_puts_the_score_on_the_last_token():
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(logps - ref, torch.tensor([3.0]), mask, kl_coef=0.1)
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


# --- the reward PPO reads: normalised, less the EOS penalty -------------------------------------


def test_normaliser_is_the_mean_and_population_std_of_its_scores():
    scores = np.array([1.0, 2.0, 3.0, 6.0])
    n = Normaliser.fit(scores)
    # mean 12/4 = 3; squared deviations 4, 1, 0, 9: variance 14/4 (ddof 0)
    assert (n.mean, n.n) == (3.0, 4) and n.std == pytest.approx(math.sqrt(3.5))
    assert n(scores) == pytest.approx((scores - 3.0) / math.sqrt(3.5))
    assert n(torch.tensor(scores)).tolist() == pytest.approx(n(scores).tolist())  # tensors alike
    assert Normaliser.from_dict(n.to_dict()) == n


def test_normalised_scores_have_mean_zero_and_std_one_on_the_samples_fitted():
    scores = np.random.default_rng(0).normal(0.7, 2.3, size=500)
    normalised = Normaliser.fit(scores)(scores)
    assert normalised.mean() == pytest.approx(0.0, abs=1e-12)
    assert normalised.std() == pytest.approx(1.0, abs=1e-12)


def test_a_constant_score_is_only_centred_and_no_score_is_refused():
    assert Normaliser.fit([2.0, 2.0]) == Normaliser(2.0, 1.0, 2)
    with pytest.raises(ValueError):
        Normaliser.fit([])
    with pytest.raises(ValueError):
        Normaliser.fit([1.0, float("nan")])


def test_a_completion_is_truncated_when_cut_at_the_cap_without_eos():
    eos = 2
    completions = [[5, 2], [5, 6, 7], [5, 6, 2], [7]]
    # EOS at the cap (row 2) is a finished text; a short one (row 3) stopped for no other reason than EOS.
    assert truncated(completions, eos, max_new_tokens=3).tolist() == [False, True, False, False]


def test_the_eos_penalty_is_subtracted_from_truncated_completions_only():
    scores = torch.tensor([0.5, -1.0, 2.0])
    cut = torch.tensor([True, False, True])
    assert eos_penalised_scores(scores, cut, 1.0).tolist() == [-0.5, -1.0, 1.0]
    assert torch.equal(eos_penalised_scores(scores, cut, 0.0), scores)  # 0 turns it off


def test_the_bandit_never_counts_a_completion_truncated(tmp_path):
    from dpo_bench.tasks.bandit import BanditConfig, BanditTask

    task = BanditTask(BanditConfig(), tmp_path)
    # a one-token response has no EOS to emit: none is missing
    assert not task.truncated([[int(task.response_ids[0])]] * 3).any()


def _tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def _reward_model(trunk, mean: float, std: float) -> RewardModel:
    rm = RewardModel(trunk).eval()
    torch.nn.init.normal_(rm.head.weight)
    torch.nn.init.constant_(rm.head.bias, 0.3)
    rm.set_normaliser(Normaliser(mean, std, 10))
    return rm


def test_the_value_head_from_the_reward_model_predicts_its_normalised_score():
    """value_init = reward_model: V at a position is r̂ of the prefix ending there (same trunk),
    with the head normalised as the reward is: w/std and (b − mean)/std."""
    trunk = _tiny_gpt2(0)
    rm = _reward_model(trunk, mean=1.5, std=4.0)
    ctx = SimpleNamespace(reward_model=rm, label="ppo")
    config = PPOConfig(value_init="reward_model")
    head = initial_value_head(ctx, config, "reward_model", reward_normaliser(ctx, config, "reward_model"))
    model = PolicyWithValueHead(trunk, head).eval()
    batch = collate([[3, 4]], [[5, 6, 7]], pad_id=0)
    with torch.no_grad():
        _, values = model.logps_and_values(batch)
    # values[:, t] is read where token t+1 is predicted: the state after input_ids[:, :t+1]
    for t in (1, 2, 3):
        prefix = batch.input_ids[:, :t + 1]
        assert values[0, t].item() == pytest.approx(rm.normalised_score(prefix, torch.ones_like(prefix)).item(), abs=1e-5)
    assert values[0, 0].item() == 0.0  # a prompt position: no value is read there


def test_a_separate_critic_from_the_reward_model_predicts_its_normalised_score_on_another_policy():
    """critic = separate, value_init = reward_model: the value network is the reward model's own
    trunk and normalised head, whatever the policy is: V at a position is r̂ of the prefix ending
    there, read by the reward model, while the policy's log-probs are its own."""
    policy, rm_trunk = _tiny_gpt2(3), _tiny_gpt2(4)
    rm = _reward_model(rm_trunk, mean=-0.5, std=2.0)
    ctx = SimpleNamespace(reward_model=rm, reference=policy, label="ppo", freeze_blocks=0, freeze_embeddings=False)
    config = PPOConfig(value_init="reward_model", critic="separate")
    head = initial_value_head(ctx, config, "reward_model", reward_normaliser(ctx, config, "reward_model"))
    model = PolicyWithValueHead(policy, head, initial_critic(ctx, config)).eval()
    batch = collate([[3, 4]], [[5, 6, 7]], pad_id=0)
    with torch.no_grad():
        logps, values = model.logps_and_values(batch)
        own = PolicyWithValueHead(policy).logps_and_values(batch)[0]
    assert torch.equal(logps, own)
    for t in (1, 2, 3):
        prefix = batch.input_ids[:, :t + 1]
        assert values[0, t].item() == pytest.approx(rm.normalised_score(prefix, torch.ones_like(prefix)).item(), abs=1e-5)
    # a copy: training the critic leaves the reward model alone
    assert model.critic is not rm.trunk and all(p.requires_grad for p in model.critic.parameters())


def test_with_a_separate_critic_the_value_loss_moves_only_the_critic_and_the_policy_loss_only_the_policy():
    policy = _tiny_gpt2(5)
    ctx = SimpleNamespace(reference=policy, reward_model=None, label="ppo", freeze_blocks=0, freeze_embeddings=False)
    assert initial_critic(ctx, PPOConfig()) is None  # shared by default
    critic = initial_critic(ctx, PPOConfig(critic="separate"))  # value_init zero: the SFT model's trunk
    assert all(torch.equal(a, b) for a, b in zip(critic.parameters(), policy.parameters()))
    model = PolicyWithValueHead(policy.train(), None, critic)
    torch.nn.init.normal_(model.value_head.weight)
    batch = collate([[3, 4], [2]], [[5, 6, 7], [8, 9]], pad_id=0)
    mask = batch.completion_mask[:, 1:].float()
    logps, values = model.logps_and_values(batch)
    vf = clipped_value_loss(values, values.detach(), torch.ones_like(values), mask, 10.0)
    vf.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.policy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())
    model.zero_grad(set_to_none=True)
    pg = clipped_policy_loss(logps, logps.detach(), torch.ones_like(logps), mask, 0.2)
    pg.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in [*model.critic.parameters(), *model.value_head.parameters()])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.policy.parameters())


def test_value_init_without_normalisation_copies_the_head_and_zero_is_zero():
    trunk = _tiny_gpt2(1)
    rm = _reward_model(trunk, mean=1.5, std=4.0)
    ctx = SimpleNamespace(reward_model=rm, label="ppo")
    raw = PPOConfig(value_init="reward_model", normalise_reward=False)
    weight, bias = initial_value_head(ctx, raw, "reward_model", reward_normaliser(ctx, raw, "reward_model"))
    assert torch.equal(weight, rm.head.weight) and torch.equal(bias, rm.head.bias)
    assert initial_value_head(ctx, PPOConfig(), "reward_model", rm.normaliser) is None
    assert PolicyWithValueHead(trunk).value_head.weight.abs().sum() == 0


def test_ppo_gt_refuses_a_value_head_from_the_reward_model_and_needs_gold_statistics():
    ctx = SimpleNamespace(reward_model=None, gold_normaliser=None, label="ppo_gt")
    with pytest.raises(ConfigError, match="value_init"):
        initial_value_head(ctx, PPOConfig(value_init="reward_model"), "gold", None)
    with pytest.raises(ConfigError, match="normalise_reward"):
        reward_normaliser(ctx, PPOConfig(), "gold")
    assert reward_normaliser(ctx, PPOConfig(normalise_reward=False), "gold") is None
    gold = Normaliser(0.1, 0.5, 100)
    assert reward_normaliser(SimpleNamespace(gold_normaliser=gold, label=""), PPOConfig(), "gold") == gold


def test_a_reward_model_without_a_normaliser_refuses_to_normalise():
    rm = RewardModel(_tiny_gpt2(2))
    with pytest.raises(RuntimeError, match="normaliser"):
        rm.normalised_score(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))


def test_the_kl_controller_moves_kl_coef_toward_its_target_at_most_two_percent_an_iteration():
    controller = AdaptiveKLController(0.1, target=2.0, horizon=10.0)
    controller.update(kl=8.0)  # error clipped to +0.2: ×(1 + 0.2/10)
    assert controller.value == pytest.approx(0.102)
    controller.update(kl=1.8)  # error −0.1: ×(1 − 0.01)
    assert controller.value == pytest.approx(0.102 * 0.99)


# --- the exact per-token KL (kl_estimator = "exact") --------------------------------------------


def test_both_kl_estimators_give_the_exact_gradient_of_the_regularised_objective():
    """On a one-token problem with every response enumerated (weighted by π, as sampling would in
    expectation), PPO's loss at θ = θ_old has the gradient −∇(E_π[s] − c·KL(π‖π_ref)) with either
    estimator: the sampled log-ratio in the rewards, or the exact KL in the rewards (a constant per
    context, so it moves nothing) plus its own gradient in the loss."""
    from dpo_bench.logprobs import token_kl_terms

    g = torch.Generator().manual_seed(3)
    k, c = 5, 0.3
    theta0, ref_logits, s = torch.randn(k, generator=g), torch.randn(k, generator=g), torch.randn(k, generator=g)
    ref = torch.log_softmax(ref_logits, -1)
    ones = torch.ones(k, 1)

    def grad(loss_of):
        theta = theta0.clone().requires_grad_(True)
        loss_of(theta).backward()
        return theta.grad

    def tokens(theta):  # every response as a row of one token: its log-prob, and the whole distribution
        dist = torch.log_softmax(theta, -1)
        return dist[:, None], dist.expand(k, k)[:, None, :]

    old_logps, old_dist = (t.detach() for t in tokens(theta0))
    weights = old_logps.exp()  # masked_mean with π_old's weights: the expectation over y ~ π_old

    def sampled(theta):
        logps, _ = tokens(theta)
        advantages = kl_penalised_rewards(old_logps - ref[:, None], s, ones, c)
        return clipped_policy_loss(logps, old_logps, advantages, weights, clip_range=0.2)

    def exact(theta):
        logps, dist = tokens(theta)
        advantages = kl_penalised_rewards(token_kl_terms(old_dist, ref.expand(k, k)[:, None, :], ones), s, ones, c)
        direct = token_kl_terms(dist, ref.expand(k, k)[:, None, :], ones)
        return clipped_policy_loss(logps, old_logps, advantages, weights, 0.2) + c * (direct * weights).sum() / weights.sum()

    def objective(theta):
        pi = torch.softmax(theta, -1)
        return -((pi * s).sum() - c * (pi * (torch.log(pi) - ref)).sum())

    target = grad(objective)
    assert target.abs().max() > 0.05  # a gradient worth matching
    assert torch.allclose(grad(sampled), target, atol=1e-6)
    assert torch.allclose(grad(exact), target, atol=1e-6)
