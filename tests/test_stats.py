"""Statistics in dpo_bench.evaluate: hand cases, closed forms, invariances."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from dpo_bench.evaluate import (
    Estimate,
    benjamini_hochberg,
    difference_test,
    estimate_from_samples,
    exact_kl,
    holm,
    mean_stderr,
    seed_paired_test,
    sequence_kl,
    tost_equivalence,
    wilson_interval,
    win_rate,
    win_rate_test,
    within_prompt_spearman,
)

QUICK = settings(max_examples=60, deadline=None)
values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
# multiples of 1/8: adding a shift to them loses no information to float rounding
dyadic = st.integers(-8000, 8000).map(lambda v: v / 8)


# --- mean and stderr -------------------------------------------------------------------------


@QUICK
@given(arrays(np.float64, st.integers(2, 50), elements=values))
def test_mean_stderr_matches_numpy(x):
    mean, stderr, n = mean_stderr(x)
    assert n == x.size
    assert mean == pytest.approx(np.mean(x))
    assert stderr == pytest.approx(np.std(x, ddof=1) / math.sqrt(x.size), abs=1e-9)


def test_mean_stderr_single_value_has_nan_stderr_and_empty_is_refused():
    mean, stderr, n = mean_stderr([3.0])
    assert (mean, n) == (3.0, 1) and math.isnan(stderr)
    with pytest.raises(ValueError, match="empty"):
        mean_stderr([])


def test_estimate_from_samples_is_a_t_interval():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    est = estimate_from_samples(x)
    se = np.std(x, ddof=1) / 2.0
    q = stats.t.ppf(0.975, 3)
    assert est == Estimate(3.5, pytest.approx(se), pytest.approx(3.5 - q * se), pytest.approx(3.5 + q * se), 4)
    assert set(est.to_dict()) == {"value", "stderr", "ci_low", "ci_high", "n"}


# --- win rate --------------------------------------------------------------------------------


def test_win_rate_hand_case_ties_count_half():
    a = np.array([3.0, 1.0, 2.0, 0.0])
    b = np.array([1.0, 1.0, 5.0, -1.0])
    est = win_rate(a, b)  # outcomes 1, 0.5, 0, 1
    assert est.value == pytest.approx(2.5 / 4) and est.n == 4
    assert est.stderr == pytest.approx(np.std([1, 0.5, 0, 1], ddof=1) / 2)
    assert (est.ci_low, est.ci_high) == pytest.approx(wilson_interval(0.625, 4))
    assert est.ci_low <= est.value <= est.ci_high


def test_win_rate_is_exactly_half_when_scores_are_equal():
    x = np.linspace(-1, 1, 30)
    est = win_rate(x, x.copy())
    assert est.value == 0.5 and est.stderr == 0.0
    assert 0.0 < est.ci_low < 0.5 < est.ci_high < 1.0


def test_win_rate_extremes_keep_a_nondegenerate_interval_inside_unit():
    est = win_rate(np.ones(20), np.zeros(20))
    assert est.value == 1.0 and est.ci_high == 1.0 and 0.8 < est.ci_low < 1.0
    est = win_rate(np.zeros(20), np.ones(20))
    assert est.value == 0.0 and est.ci_low == 0.0 and 0.0 < est.ci_high < 0.2


def test_wilson_interval_closed_form():
    # p = 0.5, n = 100, z = 1.959964: centre 0.5, half-width z*sqrt(0.0025 + z^2/40000)/(1 + z^2/100)
    z = stats.norm.ppf(0.975)
    half = z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert wilson_interval(0.5, 100) == pytest.approx((0.5 - half, 0.5 + half))


@QUICK
@given(arrays(np.float64, st.integers(1, 40), elements=st.integers(-3, 3).map(float)), st.data())
def test_win_rate_interval_contains_value_and_antisymmetric(a, data):
    b = data.draw(arrays(np.float64, a.shape, elements=st.integers(-3, 3).map(float)))
    ab, ba = win_rate(a, b), win_rate(b, a)
    assert 0.0 <= ab.ci_low <= ab.value <= ab.ci_high <= 1.0
    assert ab.value + ba.value == pytest.approx(1.0)
    assert ab.ci_low == pytest.approx(1.0 - ba.ci_high)


def test_win_rate_requires_paired_inputs():
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


def test_win_rate_test_is_a_sign_test_on_untied_pairs():
    a = np.array([1.0] * 9 + [0.0] * 1 + [5.0] * 4)
    b = np.array([0.0] * 9 + [1.0] * 1 + [5.0] * 4)  # 9 wins, 1 loss, 4 ties
    assert win_rate_test(a, b) == pytest.approx(stats.binomtest(9, 10, 0.5).pvalue)
    assert win_rate_test(a, a) == 1.0


# --- differences and equivalence -------------------------------------------------------------


def test_difference_test_welch_matches_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.3, 1.0, 40), rng.normal(0.0, 2.0, 60)
    est, p = difference_test(x, y, paired=False)
    ref = stats.ttest_ind(x, y, equal_var=False)
    assert p == pytest.approx(ref.pvalue)
    assert est.value == pytest.approx(x.mean() - y.mean()) and est.n == 100
    ci = ref.confidence_interval(0.95)
    assert (est.ci_low, est.ci_high) == pytest.approx((ci.low, ci.high))


def test_difference_test_paired_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x + rng.normal(0.2, 0.1, 30)
    est, p = difference_test(x, y, paired=True)
    ref = stats.ttest_rel(x, y)
    assert p == pytest.approx(ref.pvalue)
    assert est.stderr == pytest.approx(np.std(x - y, ddof=1) / math.sqrt(30)) and est.n == 30
    ci = ref.confidence_interval(0.95)
    assert (est.ci_low, est.ci_high) == pytest.approx((ci.low, ci.high))


def test_difference_test_without_noise():
    est, p = difference_test([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True)
    assert est.value == 0.0 and p == 1.0
    est, p = difference_test([2.0, 2.0], [1.0, 1.0], paired=False)
    assert est.value == 1.0 and p == 0.0


def test_tost_detects_equivalence_of_identical_large_samples():
    x = np.random.default_rng(2).normal(size=2000)
    # se of the difference = sqrt(2/2000) = 0.032, so t = 0.1/0.032 = 3.2 on each side
    p = tost_equivalence(x, x.copy(), margin=0.1)
    assert p < 0.05
    assert p == pytest.approx(stats.t.sf(0.1 / math.sqrt(2 * np.var(x, ddof=1) / 2000), 3998))


def test_tost_rejects_equivalence_for_shifted_samples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=2000)
    y = rng.normal(size=2000) + 0.5
    assert tost_equivalence(x, y, margin=0.1) > 0.5


def test_tost_closed_form_against_two_one_sided_scipy_tests():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.0, 1.0, 50), rng.normal(0.05, 1.5, 70)
    m = 0.4
    p_low = stats.ttest_ind(x, y - m, equal_var=False, alternative="greater").pvalue  # H0: diff <= -m
    p_high = stats.ttest_ind(x, y + m, equal_var=False, alternative="less").pvalue  # H0: diff >= +m
    assert tost_equivalence(x, y, m) == pytest.approx(max(p_low, p_high))


def test_paired_tost_closed_form_against_two_one_sided_scipy_tests():
    rng = np.random.default_rng(6)
    x = rng.normal(0.0, 1.0, 60)
    y = x + rng.normal(0.03, 0.2, 60)
    m = 0.1
    d = x - y
    p_low = stats.ttest_1samp(d + m, 0.0, alternative="greater").pvalue  # H0: diff <= -m
    p_high = stats.ttest_1samp(d - m, 0.0, alternative="less").pvalue  # H0: diff >= +m
    assert tost_equivalence(x, y, m, paired=True) == pytest.approx(max(p_low, p_high))


def test_paired_tost_shows_equivalence_that_shared_noise_hides_from_welch():
    """Two policies sampled with the same random numbers share most of their noise: paired, the
    difference is measured to its own noise; Welch counts the shared noise twice."""
    rng = np.random.default_rng(7)
    shared = rng.normal(0.0, 0.5, 400)
    x, y = shared, shared + 0.06 + rng.normal(0.0, 0.1, 400)
    assert tost_equivalence(x, y, 0.1) > 0.05
    assert tost_equivalence(x, y, 0.1, paired=True) < 1e-3


def test_paired_tost_needs_matched_samples():
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        tost_equivalence([1.0, 2.0, 3.0], [1.0, 2.0], 0.1, paired=True)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        tost_equivalence([1.0], [1.0], 0.1, paired=True)


def test_tost_requires_a_positive_margin():
    with pytest.raises(ValueError, match="margin"):
        tost_equivalence([1.0, 2.0], [1.0, 2.0], 0.0)


# --- KL --------------------------------------------------------------------------------------


def test_sequence_kl_is_the_mean_log_ratio_with_stderr():
    pol = np.array([-3.0, -2.0, -5.0, -1.0])
    ref = np.array([-4.0, -2.5, -5.0, -3.0])
    est = sequence_kl(pol, ref)
    d = pol - ref
    assert est.value == pytest.approx(d.mean())
    assert est.stderr == pytest.approx(d.std(ddof=1) / 2.0)
    assert est.ci_low < est.value < est.ci_high


def test_sequence_kl_converges_to_exact_kl_on_a_categorical():
    rng = np.random.default_rng(5)
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.2, 0.3, 0.5])
    y = rng.choice(3, size=50_000, p=p)
    est = sequence_kl(np.log(p[y]), np.log(q[y]))
    assert abs(est.value - exact_kl(p, q)) < 4 * est.stderr


def test_exact_kl_closed_form():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    np.testing.assert_allclose(exact_kl(p, q), [math.log(2.0), math.log(2.0), 0.0], atol=1e-15)


def test_exact_kl_is_infinite_off_the_support():
    assert exact_kl(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == math.inf
    assert exact_kl(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(math.log(2.0))


def test_exact_kl_matches_scipy_entropy():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(7), size=5)
    q = rng.dirichlet(np.ones(7), size=5)
    np.testing.assert_allclose(exact_kl(p, q), stats.entropy(p, q, axis=1))


def test_exact_kl_validates_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        exact_kl(np.array([0.5, 0.2]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=">= 0"):
        exact_kl(np.array([1.5, -0.5]), np.array([0.5, 0.5]))


# --- within-prompt Spearman ------------------------------------------------------------------


def test_within_prompt_spearman_removes_prompt_effects():
    # Across prompts x and y are anti-correlated through the prompt means; within prompts they agree.
    ids = np.repeat(np.arange(4), 3)
    within = np.tile([0.0, 1.0, 2.0], 4)
    x = within + np.repeat([0.0, 10.0, 20.0, 30.0], 3)
    y = 0.5 * within + np.repeat([30.0, 20.0, 10.0, 0.0], 3)
    assert stats.spearmanr(x, y).statistic < 0
    assert within_prompt_spearman(ids, x, y) == pytest.approx(1.0)


@QUICK
@given(
    st.integers(2, 6).flatmap(
        lambda g: st.tuples(
            st.lists(st.integers(0, g - 1), min_size=6, max_size=30),
            st.lists(dyadic, min_size=g, max_size=g),
            st.lists(dyadic, min_size=g, max_size=g),
        )
    ),
    st.data(),
)
def test_within_prompt_spearman_invariant_to_prompt_constants(case, data):
    ids, fx, gx = case
    ids = np.array(ids)
    n = ids.size
    x = np.array(data.draw(st.lists(dyadic, min_size=n, max_size=n)))
    y = np.array(data.draw(st.lists(dyadic, min_size=n, max_size=n)))
    base = within_prompt_spearman(ids, x, y)
    shifted = within_prompt_spearman(ids, x + np.array(fx)[ids], y + np.array(gx)[ids])
    if math.isnan(base):
        assert math.isnan(shifted)
    else:
        assert shifted == pytest.approx(base, abs=1e-9)


def test_within_prompt_spearman_drops_singleton_prompts_and_handles_degenerate_input():
    ids = np.array([0, 0, 1, 1, 2])
    x = np.array([0.0, 1.0, 5.0, 7.0, 100.0])
    y = np.array([0.0, 2.0, 1.0, 4.0, -100.0])
    assert within_prompt_spearman(ids, x, y) == pytest.approx(1.0)
    assert math.isnan(within_prompt_spearman(np.arange(5), x, y))  # every prompt has one response


# --- multiple comparisons --------------------------------------------------------------------

pvalue = st.one_of(st.floats(0.0, 1.0), st.just(float("nan")))
pvalue_lists = st.lists(pvalue, max_size=20)


def test_holm_hand_case():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04);
    # running max: 0.02, 0.03, 0.06, 0.06 (the last raised to keep the order)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_hand_case_with_nan_and_cap():
    # m = 3 (NaN not counted): 0.2 x3 = 0.6, 0.5 x2 = 1.0, 0.9 x1 = 0.9 -> running max 0.6, 1.0, 1.0
    out = holm([0.5, np.nan, 0.2, 0.9])
    np.testing.assert_allclose(out, [1.0, np.nan, 0.6, 1.0])
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])  # 0.6 x2 = 1.2, capped


def test_benjamini_hochberg_hand_case():
    # sorted: 0.01 x4/1 = 0.04, 0.04 x4/2 = 0.08, 0.045 x4/3 = 0.06, 0.9 x4/4 = 0.9;
    # running min from the top: 0.9, 0.06, 0.06 (0.08 lowered), 0.04
    np.testing.assert_allclose(benjamini_hochberg([0.9, 0.045, 0.01, 0.04]), [0.9, 0.06, 0.04, 0.06])


def test_benjamini_hochberg_hand_case_with_nan():
    # m = 3: 0.02 x3/1 = 0.06, 0.03 x3/2 = 0.045, 0.6 x3/3 = 0.6 -> running min 0.045, 0.045, 0.6
    out = benjamini_hochberg([np.nan, 0.02, 0.6, np.nan, 0.03])
    np.testing.assert_allclose(out, [np.nan, 0.045, 0.6, np.nan, 0.045])


@pytest.mark.parametrize("adjust", [holm, benjamini_hochberg])
def test_adjustments_of_a_single_test_and_of_nothing(adjust):
    np.testing.assert_array_equal(adjust([0.03]), [0.03])
    assert adjust([]).shape == (0,)
    assert np.isnan(adjust([np.nan])).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust([0.5, 1.5])


@QUICK
@pytest.mark.parametrize("adjust", [holm, benjamini_hochberg])
@given(p=pvalue_lists, data=st.data())
def test_adjustments_do_not_depend_on_input_order(adjust, p, data):
    p = np.array(p, dtype=float)
    perm = np.array(data.draw(st.permutations(range(p.size))), dtype=int)
    np.testing.assert_array_equal(adjust(p[perm]), adjust(p)[perm])


@QUICK
@pytest.mark.parametrize("adjust", [holm, benjamini_hochberg])
@given(p=pvalue_lists)
def test_adjustments_are_monotone_bounded_and_pass_nan_through(adjust, p):
    p = np.array(p, dtype=float)
    adj = adjust(p)
    present = ~np.isnan(p)
    np.testing.assert_array_equal(np.isnan(adj), ~present)
    raw, out = p[present], adj[present]
    assert (out >= raw).all() and (out <= 1.0).all()
    order = np.argsort(raw, kind="stable")
    assert (np.diff(out[order]) >= 0).all()


@QUICK
@given(p=pvalue_lists)
def test_holm_is_never_below_benjamini_hochberg(p):
    # (m - i + 1) p_(i) >= m p_(i) / i since i (m - i + 1) - m = (i - 1)(m - i) >= 0
    p = np.array(p, dtype=float)
    present = ~np.isnan(p)
    assert (holm(p)[present] >= benjamini_hochberg(p)[present] - 1e-15).all()


@QUICK
@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_holm_smallest_is_bonferroni(p):
    p = np.array(p)
    assert holm(p).min() == pytest.approx(min(1.0, p.size * p.min()))


# --- between-seed paired test ----------------------------------------------------------------


def test_seed_paired_test_is_a_one_sample_t_over_seeds():
    d = np.array([0.12, 0.05, 0.20, 0.08])
    est, p, method = seed_paired_test(d)
    ref = stats.ttest_1samp(d, 0.0)
    ci = ref.confidence_interval(0.95)
    assert p == pytest.approx(ref.pvalue)
    assert est.value == pytest.approx(d.mean()) and est.n == 4
    assert est.stderr == pytest.approx(d.std(ddof=1) / 2.0)
    assert (est.ci_low, est.ci_high) == pytest.approx((ci.low, ci.high))
    assert method == "paired t over 4 seeds"


def test_seed_paired_test_ignores_the_within_seed_error_with_several_seeds():
    d = [0.3, -0.1, 0.2]
    assert seed_paired_test(d, within_seed_stderr=10.0)[:2] == seed_paired_test(d)[:2]


def test_seed_paired_test_one_seed_is_a_normal_test_on_the_per_prompt_error():
    est, p, method = seed_paired_test([0.1], within_seed_stderr=0.04)
    z = stats.norm.ppf(0.975)
    assert p == pytest.approx(2 * stats.norm.sf(2.5))
    assert (est.value, est.stderr, est.n) == (0.1, 0.04, 1)
    assert (est.ci_low, est.ci_high) == pytest.approx((0.1 - z * 0.04, 0.1 + z * 0.04))
    assert "one seed: evaluation error only" in method


def test_seed_paired_test_one_seed_needs_the_within_seed_error():
    with pytest.raises(ValueError, match="within_seed_stderr"):
        seed_paired_test([0.1])
    est, p, _ = seed_paired_test([0.0], within_seed_stderr=0.0)
    assert est.value == 0.0 and p == 1.0
