"""DPO-family losses against closed forms, invariances, and the registry contract."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpo_bench.losses import (
    LOSSES,
    CDPOParams,
    LossSpec,
    NoParams,
    RobustParams,
    SimPOParams,
    UnknownLossError,
    get_loss,
    implicit_rewards,
    preference_margin,
    register_loss,
)

torch.set_num_threads(1)

QUICK = settings(max_examples=40, deadline=None)
logp = st.floats(-200.0, 0.0, allow_nan=False, allow_infinity=False)
betas = st.sampled_from([0.01, 0.1, 0.5, 1.0, 5.0])

# Losses that depend on the log-probs only through the margin h, so they must not see f(x).
MARGIN_LOSSES = ("dpo", "cdpo", "robust", "ipo", "hinge")


def _pairwise(name, pc, pr, rc, rr, beta, **kw):
    spec = get_loss(name)
    params = kw.pop("params", spec.params())
    return spec.fn(pc, pr, rc, rr, beta=beta, params=params, **kw)


def _random_batch(b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [-30.0 * torch.rand(b, generator=gen, dtype=torch.float64) for _ in range(4)]


def _call_any(spec: LossSpec, b: int, gen: torch.Generator, scale: float = 30.0):
    """Call a registered loss with generic inputs, whatever its kind."""
    params = spec.params()
    if spec.listwise:
        k = 3
        policy = (-scale * torch.rand(b, k, generator=gen, dtype=torch.float64)).requires_grad_()
        ref = -scale * torch.rand(b, k, generator=gen, dtype=torch.float64)
        return spec.fn(policy, ref, beta=0.1, params=params), policy
    pc, pr, rc, rr = (-scale * torch.rand(b, generator=gen, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_()
    lengths = torch.randint(1, 20, (b,), generator=gen)
    loss = spec.fn(
        pc, pr, rc, rr, beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths.flip(0), params=params
    )
    return loss, pc


# --- the registry ----------------------------------------------------------------------------


def test_registry_holds_the_family():
    assert {"dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "dpo_pl"} <= set(LOSSES)
    assert get_loss("simpo").reference_free and get_loss("dpo_pl").listwise
    assert not get_loss("dpo").reference_free and not get_loss("dpo").listwise


def test_unknown_loss_lists_known_names():
    with pytest.raises(KeyError) as info:
        get_loss("nope")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownLossError)
    assert "nope" in str(info.value)
    for name in LOSSES:
        assert name in str(info.value)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("dpo", description="x", citation="y")(lambda *a, **k: None)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_spec_is_documented_and_params_are_frozen_dataclasses(name):
    spec = get_loss(name)
    assert spec.name == name
    assert spec.description and "\n" not in spec.description
    assert spec.citation and any(ch.isdigit() for ch in spec.citation)  # a year at least
    assert dataclasses.is_dataclass(spec.params)
    assert spec.params.__dataclass_params__.frozen
    defaults = spec.params()  # the defaults must themselves pass validation
    for f in dataclasses.fields(defaults):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, f.name, 0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_with_shape_b_and_finite_gradients(name):
    spec = get_loss(name)
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, 30.0, 500.0):
        loss, leaf = _call_any(spec, 7, gen, scale)
        assert loss.shape == (7,)
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_rejects_bad_beta_and_wrong_params(name):
    spec = get_loss(name)
    with pytest.raises(ValueError, match="beta"):
        if spec.listwise:
            spec.fn(torch.zeros(2, 3), torch.zeros(2, 3), beta=0.0, params=spec.params())
        else:
            z = torch.zeros(2)
            spec.fn(z, z, z, z, beta=-1.0, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2), params=spec.params())

    class Other:
        pass

    with pytest.raises(TypeError, match="params"):
        if spec.listwise:
            spec.fn(torch.zeros(2, 3), torch.zeros(2, 3), beta=0.1, params=Other())
        else:
            z = torch.zeros(2)
            spec.fn(z, z, z, z, beta=0.1, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2), params=Other())


@pytest.mark.parametrize(
    "cls, field, bad",
    [(CDPOParams, "epsilon", 0.6), (CDPOParams, "epsilon", -0.1), (RobustParams, "epsilon", 0.5),
     (SimPOParams, "gamma", -1.0), (SimPOParams, "gamma", float("nan"))],
)
def test_params_validate_and_name_the_field(cls, field, bad):
    with pytest.raises(ValueError, match=field):
        cls(**{field: bad})


def test_make_params_overrides_and_rejects_unknown_names():
    assert get_loss("cdpo").make_params(epsilon=0.2) == CDPOParams(epsilon=0.2)
    assert get_loss("dpo").make_params() == NoParams()
    with pytest.raises(ValueError, match="gamma"):
        get_loss("dpo").make_params(gamma=1.0)


def test_pairwise_shapes_are_checked():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        _pairwise("dpo", z, torch.zeros(4), z, z, 0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        _pairwise("dpo", torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 0.1)


# --- DPO -------------------------------------------------------------------------------------


@QUICK
@given(arrays(np.float64, st.integers(1, 6), elements=logp), arrays(np.float64, 1, elements=logp), betas)
def test_dpo_is_log2_when_policy_equals_reference(chosen, rejected, beta):
    c = torch.tensor(chosen)
    r = torch.tensor(np.broadcast_to(rejected, chosen.shape).copy())
    loss = _pairwise("dpo", c, r, c.clone(), r.clone(), beta)
    torch.testing.assert_close(loss, torch.full_like(c, math.log(2.0)))


@QUICK
@given(st.lists(st.tuples(logp, logp, logp, logp), min_size=1, max_size=6), betas)
def test_dpo_gradient_wrt_policy_chosen(rows, beta):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    pc.requires_grad_()
    _pairwise("dpo", pc, pr, rc, rr, beta).sum().backward()
    h = preference_margin(pc.detach(), pr, rc, rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * h))


def test_dpo_closed_form_value():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -5.0, -4.0, -4.0))
    # h = (-3 + 4) - (-5 + 4) = 2
    assert _pairwise("dpo", pc, pr, rc, rr, 0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))


def test_implicit_rewards_is_beta_log_ratio():
    torch.testing.assert_close(implicit_rewards(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), 0.5),
                               torch.tensor([1.0, -0.5]))


# --- conservative and robust DPO ---------------------------------------------------------------


@pytest.mark.parametrize("name, params", [("cdpo", CDPOParams(epsilon=0.0)), ("robust", RobustParams(epsilon=0.0))])
def test_zero_noise_variants_equal_dpo(name, params):
    batch = _random_batch(seed=3)
    torch.testing.assert_close(_pairwise(name, *batch, 0.3, params=params), _pairwise("dpo", *batch, 0.3))


def test_cdpo_is_minimal_at_the_smoothed_margin():
    eps, beta = 0.2, 0.5
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    _pairwise("cdpo", h, zero, zero, zero, beta, params=CDPOParams(epsilon=eps)).sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


@QUICK
@given(st.floats(-50, 50), st.floats(0.0, 0.45), betas)
def test_robust_dpo_is_unbiased_under_label_flips(h, eps, beta):
    # E over a flip with probability eps of the rDPO loss = the clean DPO loss (the point of rDPO)
    ht = torch.tensor([h], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    params = RobustParams(epsilon=eps)
    kept = _pairwise("robust", ht, zero, zero, zero, beta, params=params)
    flipped = _pairwise("robust", zero, ht, zero, zero, beta, params=params)
    clean = _pairwise("dpo", ht, zero, zero, zero, beta)
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


# --- IPO, hinge ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    target = 1.0 / (2.0 * beta)
    h = torch.tensor([target - 1.0, target, target + 1.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    loss = _pairwise("ipo", h, zero, zero, zero, beta)
    loss.sum().backward()
    assert loss[1].item() == 0.0 and h.grad[1].item() == 0.0
    assert loss[0].item() == pytest.approx(1.0) and loss[2].item() == pytest.approx(1.0)
    assert h.grad[0].item() < 0 < h.grad[2].item()


@QUICK
@given(st.floats(-100, 100), betas)
def test_hinge_closed_form_and_zero_past_the_margin(h, beta):
    ht = torch.tensor([h], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    loss = _pairwise("hinge", ht, zero, zero, zero, beta)
    assert loss.item() == pytest.approx(max(0.0, 1.0 - beta * h))
    loss.sum().backward()
    if beta * h > 1.0:
        assert loss.item() == 0.0 and ht.grad.item() == 0.0


# --- SimPO -----------------------------------------------------------------------------------


def test_simpo_closed_form_and_ignores_reference():
    pc = torch.tensor([-6.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -1.0], dtype=torch.float64)
    lc, lr = torch.tensor([3, 2]), torch.tensor([4, 1])
    beta, gamma = 2.0, 0.5
    logits = beta * pc / lc - beta * pr / lr - gamma
    expected = torch.nn.functional.softplus(-logits)
    rc, rr = _random_batch(2, seed=5)[:2]
    got = _pairwise("simpo", pc, pr, rc, rr, beta, chosen_lengths=lc, rejected_lengths=lr,
                    params=SimPOParams(gamma=gamma))
    torch.testing.assert_close(got, expected)
    other = _pairwise("simpo", pc, pr, rc + 7.0, rr - 3.0, beta, chosen_lengths=lc, rejected_lengths=lr,
                      params=SimPOParams(gamma=gamma))
    torch.testing.assert_close(got, other)
    none_ref = get_loss("simpo").fn(pc, pr, None, None, beta=beta, chosen_lengths=lc, rejected_lengths=lr,
                                    params=SimPOParams(gamma=gamma))
    torch.testing.assert_close(got, none_ref)


def test_simpo_requires_positive_lengths():
    pc, pr, rc, rr = _random_batch(3, seed=6)
    with pytest.raises(ValueError, match="lengths"):
        _pairwise("simpo", pc, pr, rc, rr, 2.0)
    with pytest.raises(ValueError, match="lengths"):
        _pairwise("simpo", pc, pr, rc, rr, 2.0, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        _pairwise("simpo", pc, pr, rc, rr, 2.0, chosen_lengths=torch.zeros(3), rejected_lengths=torch.ones(3))


# --- Plackett-Luce DPO -----------------------------------------------------------------------


@QUICK
@given(st.lists(st.tuples(logp, logp, logp, logp), min_size=1, max_size=6), betas)
def test_dpo_pl_with_two_responses_is_dpo(rows, beta):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    listwise = get_loss("dpo_pl").fn(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=beta, params=NoParams())
    torch.testing.assert_close(listwise, _pairwise("dpo", pc, pr, rc, rr, beta))


def test_dpo_pl_closed_form_k3():
    policy = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -2.0, -2.0]], dtype=torch.float64)
    beta = 1.0
    u = np.array([1.0, 0.0, -1.0])  # beta * (policy - ref)
    expected = -(u[0] - np.log(np.exp(u).sum()) + u[1] - np.log(np.exp(u[1:]).sum()))
    got = get_loss("dpo_pl").fn(policy, ref, beta=beta, params=NoParams())
    assert got.item() == pytest.approx(expected)


def test_dpo_pl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        get_loss("dpo_pl").fn(torch.zeros(2, 3), torch.zeros(2, 4), beta=0.1, params=NoParams())


# --- reward equivalence: f(x) shifts change nothing ------------------------------------------


@pytest.mark.parametrize("name", MARGIN_LOSSES)
@QUICK
@given(rows=st.lists(st.tuples(logp, logp, logp, logp, st.floats(-50, 50)), min_size=1, max_size=6), beta=betas)
def test_margin_losses_ignore_prompt_only_shifts(name, rows, beta):
    pc, pr, rc, rr, f = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    base = _pairwise(name, pc, pr, rc, rr, beta)
    # r(x, y) -> r(x, y) + beta * f(x) for both responses of the prompt, via the policy or the reference
    torch.testing.assert_close(_pairwise(name, pc + f, pr + f, rc, rr, beta), base, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(_pairwise(name, pc, pr, rc + f, rr + f, beta), base, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_negative_control_response_dependent_shift_changes_the_loss(name):
    pc, pr, rc, rr = _random_batch(seed=7)
    base = _pairwise(name, pc, pr, rc, rr, 0.5)
    shifted = _pairwise(name, pc + 3.0, pr, rc, rr, 0.5)  # depends on y: only the chosen response moves
    assert not torch.allclose(base, shifted)


def test_dpo_pl_ignores_prompt_only_shifts():
    gen = torch.Generator().manual_seed(8)
    policy = -20 * torch.rand(4, 3, generator=gen, dtype=torch.float64)
    ref = -20 * torch.rand(4, 3, generator=gen, dtype=torch.float64)
    f = 10 * torch.randn(4, 1, generator=gen, dtype=torch.float64)
    fn = get_loss("dpo_pl").fn
    torch.testing.assert_close(fn(policy + f, ref, beta=0.2, params=NoParams()), fn(policy, ref, beta=0.2, params=NoParams()))
