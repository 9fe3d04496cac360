"""Bradley-Terry / Plackett-Luce math against closed forms."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from scipy.special import expit

from reward.bradley_terry import (
    bayes_ceiling,
    bt_loss,
    bt_probability,
    pairwise_accuracy,
    pl_log_likelihood,
    pl_loss,
    sample_bt_labels,
    sample_pl_rankings,
)

torch.set_num_threads(1)

finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False)
QUICK = settings(max_examples=60, deadline=None)


def reward_rows(k_min=2, k_max=5, b_max=6):
    return st.integers(1, b_max).flatmap(
        lambda b: st.integers(k_min, k_max).flatmap(
            lambda k: arrays(np.float64, (b, k), elements=finite)
        )
    )


# --- probabilities ---------------------------------------------------------------------------


def test_bt_probability_closed_form_numpy_and_torch():
    r_a = np.array([1.0, 0.0, -2.0])
    r_b = np.array([0.0, 0.0, 1.0])
    expected = expit((r_a - r_b) / 0.5)
    np.testing.assert_allclose(bt_probability(r_a, r_b, 0.5), expected)
    got = bt_probability(torch.tensor(r_a), torch.tensor(r_b), 0.5)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected)


def test_bt_probability_temperature_zero_is_deterministic():
    r_a = np.array([1.0, 0.0, -2.0])
    r_b = np.array([0.0, 0.0, 1.0])
    np.testing.assert_array_equal(bt_probability(r_a, r_b, 0.0), [1.0, 0.5, 0.0])
    got = bt_probability(torch.tensor(r_a), torch.tensor(r_b), 0.0)
    np.testing.assert_array_equal(got.numpy(), [1.0, 0.5, 0.0])


def test_bt_probability_rejects_negative_temperature():
    with pytest.raises(ValueError, match="temperature"):
        bt_probability(np.zeros(2), np.zeros(2), -1.0)


@QUICK
@given(finite, finite, st.floats(0.05, 10))
def test_bt_probability_is_symmetric(a, b, t):
    assert bt_probability(np.array(a), np.array(b), t) + bt_probability(np.array(b), np.array(a), t) == pytest.approx(1.0)


# --- losses ----------------------------------------------------------------------------------


@QUICK
@given(arrays(np.float64, st.integers(1, 8), elements=finite), st.data())
def test_bt_loss_is_logistic_nll(r_c, data):
    r_r = data.draw(arrays(np.float64, r_c.shape, elements=finite))
    c, r = torch.tensor(r_c), torch.tensor(r_r)
    expected = F.binary_cross_entropy_with_logits(c - r, torch.ones_like(c), reduction="none")
    torch.testing.assert_close(bt_loss(c, r), expected)


def test_bt_loss_stable_for_huge_margins():
    loss = bt_loss(torch.tensor([-1e4, 1e4]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([1e4, 0.0]))


@QUICK
@given(reward_rows(k_min=2, k_max=2))
def test_pl_with_two_items_is_bradley_terry(rewards):
    r = torch.tensor(rewards)
    torch.testing.assert_close(pl_log_likelihood(r), -bt_loss(r[:, 0], r[:, 1]))
    torch.testing.assert_close(pl_loss(r), bt_loss(r[:, 0], r[:, 1]))


@pytest.mark.parametrize("k", [3, 4])
def test_pl_probabilities_of_all_rankings_sum_to_one(k):
    gen = torch.Generator().manual_seed(k)
    rewards = 2.0 * torch.randn(5, k, generator=gen, dtype=torch.float64)
    perms = list(itertools.permutations(range(k)))
    log_probs = torch.stack([pl_log_likelihood(rewards[:, list(p)]) for p in perms], dim=1)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(5, dtype=torch.float64))


def test_pl_log_likelihood_closed_form_k3():
    r = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    e = np.exp([2.0, 1.0, 0.0])
    expected = math.log(e[0] / e.sum()) + math.log(e[1] / (e[1] + e[2]))
    assert pl_log_likelihood(r).item() == pytest.approx(expected)


def test_pl_log_likelihood_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        pl_log_likelihood(torch.zeros(3))


# --- sampling --------------------------------------------------------------------------------


def test_sample_bt_labels_temperature_zero_flags_ties():
    rng = np.random.default_rng(0)
    a_pref, tie = sample_bt_labels(rng, np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5]), 0.0)
    np.testing.assert_array_equal(a_pref, [True, False, False])
    np.testing.assert_array_equal(tie, [False, False, True])


def test_sample_bt_labels_frequency_matches_sigma():
    rng = np.random.default_rng(1)
    n = 20_000
    delta, t = 0.8, 0.5
    a_pref, tie = sample_bt_labels(rng, np.full(n, delta), np.zeros(n), t)
    assert not tie.any()
    p = expit(delta / t)
    assert abs(a_pref.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_sample_pl_rankings_match_pl_probabilities():
    rng = np.random.default_rng(2)
    rewards = np.array([1.0, 0.3, -0.5])
    t = 0.7
    n = 30_000
    rankings, tied = sample_pl_rankings(rng, np.tile(rewards, (n, 1)), t)
    assert rankings.shape == (n, 3) and not tied.any()
    perms = list(itertools.permutations(range(3)))
    index = {p: i for i, p in enumerate(perms)}
    observed = np.bincount([index[tuple(row)] for row in rankings], minlength=len(perms))
    scaled = torch.tensor(rewards / t)
    expected_p = np.array([pl_log_likelihood(scaled[list(p)][None]).exp().item() for p in perms])
    assert expected_p.sum() == pytest.approx(1.0)
    assert stats.chisquare(observed, n * expected_p).pvalue > 1e-3


def test_sample_pl_rankings_temperature_zero_sorts_and_flags_ties():
    rng = np.random.default_rng(3)
    rewards = np.array([[0.1, 0.9, 0.5], [0.2, 0.7, 0.2]])
    rankings, tied = sample_pl_rankings(rng, rewards, 0.0)
    np.testing.assert_array_equal(rankings, [[1, 2, 0], [1, 0, 2]])
    np.testing.assert_array_equal(tied, [False, True])


def test_sampling_is_reproducible_from_the_seed():
    rewards = np.random.default_rng(9).normal(size=(50, 4))
    a, _ = sample_pl_rankings(np.random.default_rng(5), rewards, 1.0)
    b, _ = sample_pl_rankings(np.random.default_rng(5), rewards, 1.0)
    np.testing.assert_array_equal(a, b)


# --- ceilings and accuracy -------------------------------------------------------------------


def test_bayes_ceiling_closed_form():
    r_a = np.array([1.0, 0.0, 2.0])
    r_b = np.array([0.0, 1.0, 2.0])
    t = 0.5
    expected = (2 * expit(1.0 / t) + 0.5) / 3
    assert bayes_ceiling(r_a, r_b, t) == pytest.approx(expected)
    assert bayes_ceiling(r_a, r_b, 0.0) == 1.0
    assert math.isnan(bayes_ceiling(np.zeros(2), np.zeros(2), 0.0))


def test_bayes_ceiling_is_reached_by_the_gold_reward():
    # The gold reward is the Bayes predictor: its accuracy on sampled labels converges to the ceiling.
    rng = np.random.default_rng(4)
    n = 40_000
    r_a, r_b = rng.normal(size=n), rng.normal(size=n)
    a_pref, _ = sample_bt_labels(rng, r_a, r_b, 1.0)
    chosen = np.where(a_pref, r_a, r_b)
    rejected = np.where(a_pref, r_b, r_a)
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(bayes_ceiling(r_a, r_b, 1.0), abs=0.01)


def test_pairwise_accuracy_ties_count_half():
    assert pairwise_accuracy(np.array([2.0, 1.0, 0.0, 3.0]), np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx(2.5 / 4)
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([0.0])) == 1.0


def test_reward_model_scores_skip_the_lm_head_without_changing_them(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from reward.model import RewardModel

    torch.manual_seed(0)
    trunk = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    model = RewardModel(trunk).eval()
    # The model's own forward, as for a trunk dpo_engine.trunk does not reproduce (tests/test_trunk.py).
    monkeypatch.setattr("reward.model.selects_positions", lambda trunk: False)
    assert model._trunk_kwargs == {"logits_to_keep": 1}
    torch.nn.init.normal_(model.head.weight)
    ids = torch.randint(0, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, :3] = 0  # left padding too
    fast = model(ids, mask)
    model._trunk_kwargs = {}
    assert torch.equal(fast, model(ids, mask))


def test_reward_model_scores_rows_of_mixed_lengths_in_groups_with_the_same_result(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_engine.batching import length_groups
    from reward.model import RewardModel

    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 4)
    torch.manual_seed(1)
    trunk = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    model = RewardModel(trunk)
    torch.nn.init.normal_(model.head.weight)
    lengths = [3, 30, 4, 28, 5, 31, 3, 29]
    ids = torch.randint(1, 50, (len(lengths), 32))
    mask = (torch.arange(32)[None, :] < torch.tensor(lengths)[:, None]).long()
    mask[1] = mask[1].roll(2)  # one left-padded row as the sampler writes them
    assert len(length_groups(mask.sum(-1))) > 1
    grouped = model(ids, mask)
    grouped.sum().backward()
    grad = model.head.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 10**9)
    whole = model(ids, mask)
    whole.sum().backward()
    assert torch.allclose(grouped, whole, atol=1e-5)
    assert torch.allclose(grad, model.head.weight.grad, atol=1e-5)
