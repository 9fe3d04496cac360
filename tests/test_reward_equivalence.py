"""The DPO paper's reward-equivalence results as identities of the code (Lemma 1, Lemma 2, Theorem 1,
and the losses' invariance under f(x)), over random rewards, shifts and β.

They hold by construction (shift-invariance of sigmoid and softmax), so they are unit tests, not
checks of a run: they guard ``bt_probability``, ``bt_loss``, ``pl_log_likelihood``,
``optimal_policy`` and every pairwise reference-based loss of the registry. Each has its negative
control: a perturbation g(x, y) that depends on the response must change the quantity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpo_bench.losses import LOSSES
from dpo_bench.tasks.bandit import exact_metrics, optimal_policy
from reward.bradley_terry import bt_loss, bt_probability, pl_log_likelihood

QUICK = settings(max_examples=30, deadline=None)
reward = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)
shift = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)
betas = st.sampled_from([0.05, 0.1, 0.5, 1.0, 5.0])

# The built-in losses that compare a pair through a reference: the ones Theorem 1 says must not see
# f(x). (A plug-in loss registered by another test, such as the README's DPOP, need not be one.)
PAIRWISE_REFERENCE_LOSSES = sorted(
    name for name, spec in LOSSES.items()
    if spec.fn.__module__ == "dpo_bench.losses" and not spec.listwise and not spec.reference_free
)


def _tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


# --- Lemma 1: r and r + f(x) induce the same preference distribution -------------------------


@QUICK
@given(pairs=st.lists(st.tuples(reward, reward, shift), min_size=1, max_size=8))
def test_lemma1_bradley_terry_probability_and_loss_ignore_prompt_shifts(pairs):
    r_w, r_l, f = (_tensor(c) for c in zip(*pairs))
    torch.testing.assert_close(bt_probability(r_w + f, r_l + f), bt_probability(r_w, r_l), rtol=0, atol=1e-9)
    torch.testing.assert_close(bt_loss(r_w + f, r_l + f), bt_loss(r_w, r_l), rtol=0, atol=1e-9)
    # Control: g(x, y) = 1 on the chosen response only moves every probability by a visible amount.
    moved = bt_probability(r_w + f + 1.0, r_l + f) - bt_probability(r_w, r_l)
    assert (moved > 1e-5).all()


@QUICK
@given(rewards=arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 5)), elements=reward),
       data=st.data())
def test_lemma1_plackett_luce_ignores_prompt_shifts(rewards, data):
    f = data.draw(arrays(np.float64, (rewards.shape[0], 1), elements=shift))
    r = _tensor(rewards)
    torch.testing.assert_close(pl_log_likelihood(r + _tensor(f)), pl_log_likelihood(r), rtol=0, atol=1e-8)
    # Control: raising the top-ranked response raises the ranking's likelihood.
    g = torch.zeros_like(r)
    g[:, 0] = 1.0
    assert (pl_log_likelihood(r + g) - pl_log_likelihood(r) > 1e-6).all()


# --- Lemma 2 and Theorem 1 on tables ---------------------------------------------------------


def _table(data, n_x: int, n_y: int) -> tuple[np.ndarray, np.ndarray]:
    logits = data.draw(arrays(np.float64, (n_x, n_y), elements=st.floats(-3, 3)))
    ref = np.exp(logits - logits.max(1, keepdims=True))
    rewards = data.draw(arrays(np.float64, (n_x, n_y), elements=reward))
    return ref / ref.sum(1, keepdims=True), rewards


@QUICK
@given(n_x=st.integers(1, 4), n_y=st.integers(2, 6), beta=betas, data=st.data())
def test_lemma2_the_optimum_its_kl_and_reward_ignore_prompt_shifts(n_x, n_y, beta, data):
    ref, rewards = _table(data, n_x, n_y)
    f = data.draw(arrays(np.float64, (n_x, 1), elements=shift))
    opt, shifted = optimal_policy(ref, rewards, beta), optimal_policy(ref, rewards + f, beta)
    np.testing.assert_allclose(shifted, opt, rtol=0, atol=1e-9)
    m, ms = exact_metrics(opt, ref, rewards), exact_metrics(shifted, ref, rewards)
    assert ms["kl"] == pytest.approx(m["kl"], abs=1e-9) and ms["gold_reward"] == pytest.approx(m["gold_reward"], abs=1e-9)
    # Control: g raising the optimum's least likely response by β moves mass to it.
    g = np.zeros_like(rewards)
    least = opt.argmin(1)
    g[np.arange(n_x), least] = beta
    perturbed = optimal_policy(ref, rewards + f + g, beta)
    assert (perturbed[np.arange(n_x), least] > opt[np.arange(n_x), least]).all()


@QUICK
@given(n_x=st.integers(1, 4), n_y=st.integers(2, 6), beta=betas, data=st.data())
def test_theorem1_the_optimum_implies_its_reward_up_to_log_z(n_x, n_y, beta, data):
    """β·log π*/π_ref = r − β·log Z(x), with Z(x) = Σ_y π_ref(y|x)·exp(r(x, y)/β) (DPO paper Eq. 5)."""
    ref, rewards = _table(data, n_x, n_y)
    opt = optimal_policy(ref, rewards, beta)
    log_z = np.log((ref * np.exp((rewards - rewards.max(1, keepdims=True)) / beta)).sum(1)) + rewards.max(1) / beta
    implied = beta * (np.log(opt) - np.log(ref))
    np.testing.assert_allclose(implied, rewards - beta * log_z[:, None], rtol=0, atol=1e-7)


# --- the losses: Theorem 1's reparameterisation makes them blind to f(x) ----------------------


@pytest.mark.parametrize("name", PAIRWISE_REFERENCE_LOSSES)
@QUICK
@given(rows=st.lists(st.tuples(*(st.floats(-60.0, -0.1),) * 4, shift), min_size=1, max_size=6), beta=betas)
def test_every_pairwise_reference_loss_and_its_gradient_ignore_prompt_shifts(name, rows, beta):
    """Both implicit rewards β·log π/π_ref of a pair move by f(x): the loss and its gradient with
    respect to the policy's log-probs are unchanged."""
    pc, pr, rc, rr, f = (_tensor(c) for c in zip(*rows))
    spec = LOSSES[name]

    def loss_and_grad(shift_c: torch.Tensor, shift_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, r = (pc + shift_c).requires_grad_(True), (pr + shift_r).requires_grad_(True)
        loss = spec.fn(c, r, rc, rr, beta=beta, params=spec.params()).sum()
        loss.backward()
        return loss.detach(), torch.cat([c.grad, r.grad])

    base, grad = loss_and_grad(torch.zeros_like(f), torch.zeros_like(f))
    shifted, grad_s = loss_and_grad(f / beta, f / beta)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(grad_s, grad, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("name", PAIRWISE_REFERENCE_LOSSES)
def test_a_response_dependent_shift_changes_every_pairwise_reference_loss(name):
    """The control: a margin of 0 moved to 1/(4β) by the chosen response alone (inside every loss's
    active region: IPO's minimum is at 1/(2β), the hinge's margin at 1/β)."""
    spec, beta = LOSSES[name], 0.5
    pc, pr, rc, rr = (torch.full((3,), -5.0, dtype=torch.float64) for _ in range(4))
    base = spec.fn(pc, pr, rc, rr, beta=beta, params=spec.params())
    moved = spec.fn(pc + 0.5, pr, rc, rr, beta=beta, params=spec.params())
    assert (moved - base).abs().min() > 1e-3


def test_the_registry_has_pairwise_reference_losses_to_check():
    assert {"dpo", "ipo", "cdpo", "robust", "hinge"} <= set(PAIRWISE_REFERENCE_LOSSES)
