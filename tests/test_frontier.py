"""The reward-KL frontier: hand-computed envelopes, val/test selection, the hierarchical
bootstrap, paired comparisons, and the best-of-n KL against brute force."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpo_bench.frontier import (
    ANCHOR,
    ANCHOR_POINT,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    budget_value,
    compare_at_budgets,
    envelope_value,
    frontier_table,
    mixture_at,
    per_seed_budget_values,
    upper_envelope,
)
from dpo_bench.frontier.envelope import _best_mixtures

QUICK = settings(max_examples=80, deadline=None)

# --- the envelope of points ------------------------------------------------------------------

# Anchor (0, 0) and six points. Sorted by KL, the lower point at KL 2 dropped:
#   (0,0) (1,2) (2,2.5) (3,4) (4,3.5) (6,3).
# Upper hull: (2,2.5) lies below the chord (1,2)-(3,4) (which is 3 at KL 2) and goes; (4,3.5)
# lies below the chord (3,4)-(6,3) (which is 3.67 at KL 4) and goes: hull (0,0) (1,2) (3,4) (6,3).
# Made non-decreasing: cut at the best gold (3,4), flat after it up to the largest KL, 6.
HAND_KL = [1.0, 2.0, 3.0, 4.0, 2.0, 6.0]
HAND_GOLD = [2.0, 2.5, 4.0, 3.5, 1.0, 3.0]


def hand_envelope():
    return upper_envelope(HAND_KL, HAND_GOLD, anchor_gold=0.0)


def test_hand_envelope_vertices():
    env = hand_envelope()
    np.testing.assert_array_equal(env.kl, [0.0, 1.0, 3.0])
    np.testing.assert_array_equal(env.gold, [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(env.index, [ANCHOR, 0, 2])
    assert env.reach == 6.0


@pytest.mark.parametrize(
    "budget, mixture, value",
    [
        (0.0, (ANCHOR, ANCHOR, 1.0), 0.0),  # the anchor alone
        (0.5, (ANCHOR, 0, 0.5), 1.0),  # halfway from (0,0) to (1,2)
        (1.0, (0, 0, 1.0), 2.0),  # on a vertex: the point alone
        (2.0, (0, 2, 0.5), 3.0),  # halfway from (1,2) to (3,4); point 1 (2, 2.5) is worse
        (2.5, (0, 2, 0.25), 3.5),  # w = (3 - 2.5)/(3 - 1) = 0.25: 0.25*2 + 0.75*4
        (3.0, (2, 2, 1.0), 4.0),
        (5.0, (2, 2, 1.0), 4.0),  # flat part: the best point within the budget
        (6.0, (2, 2, 1.0), 4.0),  # the largest KL measured is still reached
    ],
)
def test_hand_envelope_values(budget, mixture, value):
    env = hand_envelope()
    a, b, w = mixture_at(env, budget)
    assert (a, b) == mixture[:2] and w == pytest.approx(mixture[2])
    assert envelope_value(env, budget) == pytest.approx(value)


def test_budgets_past_the_largest_kl_are_not_reached_and_negative_ones_refused():
    env = hand_envelope()
    assert mixture_at(env, 6.01) is None
    assert math.isnan(envelope_value(env, 6.01))
    with pytest.raises(ValueError, match=">= 0"):
        mixture_at(env, -0.1)
    with pytest.raises(ValueError, match=">= 0"):
        envelope_value(env, float("nan"))


def test_anchor_above_every_point_is_the_whole_frontier():
    env = upper_envelope([1.0, 2.0], [1.0, 3.0], anchor_gold=5.0)
    np.testing.assert_array_equal(env.index, [ANCHOR])
    assert mixture_at(env, 1.5) == (ANCHOR, ANCHOR, 1.0)
    assert envelope_value(env, 2.0) == 5.0
    assert mixture_at(env, 2.5) is None


def test_anchor_alone_reaches_only_kl_zero():
    env = upper_envelope([], [], anchor_gold=1.0)
    assert envelope_value(env, 0.0) == 1.0
    assert mixture_at(env, 0.1) is None


def test_equal_gold_prefers_the_lower_kl_and_collinear_points_are_not_vertices():
    env = upper_envelope([1.0, 2.0], [3.0, 3.0], anchor_gold=0.0)
    np.testing.assert_array_equal(env.index, [ANCHOR, 0])
    assert mixture_at(env, 1.5) == (0, 0, 1.0)
    env = upper_envelope([1.0, 2.0], [1.0, 2.0], anchor_gold=0.0)  # (1,1) on the chord (0,0)-(2,2)
    np.testing.assert_array_equal(env.index, [ANCHOR, 1])
    assert mixture_at(env, 1.5) == (ANCHOR, 1, 0.25)
    assert envelope_value(env, 1.5) == 1.5


def test_an_estimated_kl_below_zero_is_within_every_budget():
    # sampled KL estimates can dip below 0; such a point is taken at its estimate, not clipped
    env = upper_envelope([-0.1], [2.0], anchor_gold=0.0)
    assert mixture_at(env, 0.0) == (0, 0, 1.0)


def test_points_at_the_same_kl_keep_the_best():
    env = upper_envelope([1.0, 1.0, 1.0], [0.5, 2.0, 1.0], anchor_gold=0.0)
    np.testing.assert_array_equal(env.index, [ANCHOR, 1])


# --- envelope invariants ---------------------------------------------------------------------

# KL on a grid of 0.01: points a hair apart in KL (1e-300) only make slopes overflow
kl_values = st.integers(0, 1000).map(lambda v: v / 100)
point_sets = st.integers(0, 8).flatmap(
    lambda n: st.tuples(
        st.lists(kl_values, min_size=n, max_size=n),
        st.lists(st.floats(-10.0, 10.0, allow_subnormal=False), min_size=n, max_size=n),
        st.floats(-10.0, 10.0, allow_subnormal=False),
    )
)
TOL = 1e-9


@QUICK
@given(point_sets)
def test_envelope_is_concave_non_decreasing_and_made_of_input_points(case):
    kl, gold, anchor_gold = case
    env = upper_envelope(kl, gold, anchor_gold=anchor_gold)
    all_kl, all_gold = np.array([0.0] + kl), np.array([anchor_gold] + gold)
    np.testing.assert_array_equal(env.kl, all_kl[env.index + 1])
    np.testing.assert_array_equal(env.gold, all_gold[env.index + 1])
    assert (np.diff(env.kl) > 0).all() and (np.diff(env.gold) > 0).all()
    slopes = np.diff(env.gold) / np.diff(env.kl)
    assert (np.diff(slopes) <= TOL * (1 + np.abs(slopes[1:]))).all()
    assert env.gold[-1] == all_gold.max() and env.reach == all_kl.max()


@QUICK
@given(point_sets)
def test_envelope_lies_on_or_above_every_point_and_never_decreases(case):
    kl, gold, anchor_gold = case
    env = upper_envelope(kl, gold, anchor_gold=anchor_gold)
    for k, g in zip([0.0] + kl, [anchor_gold] + gold):
        assert envelope_value(env, k) >= g - TOL
    grid = np.linspace(0.0, env.reach, 41)
    values = np.array([envelope_value(env, k) for k in grid])
    assert (np.diff(values) >= -TOL).all()
    mids = np.array([envelope_value(env, k) for k in (grid[:-2] + grid[2:]) / 2])
    assert (mids >= (values[:-2] + values[2:]) / 2 - TOL * 10).all()  # concave along the grid


@QUICK
@given(point_sets, st.floats(0.0, 11.0))
def test_mixture_reproduces_the_budget_and_the_value(case, budget):
    kl, gold, anchor_gold = case
    env = upper_envelope(kl, gold, anchor_gold=anchor_gold)
    mix = mixture_at(env, budget)
    if budget > env.reach:
        assert mix is None
        return
    a, b, w = mix
    all_kl, all_gold = np.array([0.0] + kl), np.array([anchor_gold] + gold)
    chord_kl = w * all_kl[a + 1] + (1 - w) * all_kl[b + 1]
    assert 0.0 <= w <= 1.0 and chord_kl <= budget + TOL * 10
    if a != b:
        assert chord_kl == pytest.approx(budget, abs=1e-9)
    assert w * all_gold[a + 1] + (1 - w) * all_gold[b + 1] == pytest.approx(envelope_value(env, budget))


@QUICK
@given(point_sets, st.lists(st.floats(0.0, 11.0), min_size=1, max_size=4))
def test_the_bootstraps_pair_search_agrees_with_the_hull(case, budgets):
    """Two routes to one number: the best two-point mixture within the budget (a linear program)
    and the value of the non-decreasing concave hull."""
    kl, gold, anchor_gold = case
    env = upper_envelope(kl, gold, anchor_gold=anchor_gold)
    all_kl, all_gold = np.array(kl + [0.0]), np.array(gold + [anchor_gold])  # anchor last, as in the bootstrap
    _, _, _, value = _best_mixtures(all_kl, all_gold, np.ones(all_kl.size, bool), np.array(budgets))
    expected = [envelope_value(env, k) for k in budgets]
    np.testing.assert_allclose(value, expected, atol=1e-9, rtol=1e-9)


def test_the_bootstraps_pair_search_picks_the_hulls_mixture_on_continuous_data():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = rng.integers(1, 12)
        kl, gold, anchor = rng.gamma(2.0, 1.0, n), rng.normal(size=n), rng.normal()
        budget = rng.uniform(0, kl.max())
        valid = np.ones(n + 1, bool)
        a, b, w, _ = _best_mixtures(np.append(kl, 0.0), np.append(gold, anchor), valid, np.array([budget]))
        slot = lambda i: ANCHOR if i == n else int(i)  # noqa: E731  (the bootstrap keeps the anchor last)
        ha, hb, hw = mixture_at(upper_envelope(kl, gold, anchor_gold=anchor), budget)
        assert (slot(a[0]), slot(b[0])) == (ha, hb) and w[0] == pytest.approx(hw)


# --- chosen on validation, reported on test --------------------------------------------------


def test_budget_value_reports_the_validation_choice_on_test():
    # two points at KL 1 on validation: point 0 is better there (2 > 1), point 1 on test (3 > 1)
    val_kl, val_gold = [1.0, 1.0], [2.0, 1.0]
    test_kl, test_gold = [1.2, 0.9], [1.0, 3.0]
    gold, kl, a, b, w = budget_value(val_kl, val_gold, test_kl, test_gold, 0.0, 0.5, 1.0)
    assert (a, b, w) == (0, 0, 1.0) and (gold, kl) == (1.0, 1.2)  # not 3.0: test never chooses
    # at KL 0.5 validation mixes the anchor and point 0 half and half; on test:
    # gold 0.5 * 0.5 + 0.5 * 1.0 = 0.75 and KL 0.5 * 0 + 0.5 * 1.2 = 0.6
    gold, kl, a, b, w = budget_value(val_kl, val_gold, test_kl, test_gold, 0.0, 0.5, 0.5)
    assert (a, b) == (ANCHOR, 0) and w == 0.5
    assert (gold, kl) == pytest.approx((0.75, 0.6))
    assert budget_value(val_kl, val_gold, test_kl, test_gold, 0.0, 0.5, 1.5) is None


# --- per-prompt tables -----------------------------------------------------------------------


def long_tables(methods, n_seeds, n_prompts, rng, seed_offsets=None):
    """per_prompt and anchor tables. methods: {name: [(kl_mean, gold_gain), ...]}; per-prompt KL
    is gamma-distributed around kl_mean, gold = anchor + gain + noise (shared anchor noise)."""
    rows, anchor_rows = [], []
    prompts = np.arange(n_prompts)
    for s in range(n_seeds):
        offset = 0.0 if seed_offsets is None else seed_offsets[s]
        for split in ("val", "test"):
            base = offset + rng.normal(0.0, 1.0, n_prompts)
            anchor_rows.append(pd.DataFrame(dict(seed=s, split=split, prompt=prompts, gold=base)))
            for method, points in methods.items():
                for q, (kl_mean, gain) in enumerate(points):
                    rows.append(pd.DataFrame(dict(
                        method=method, seed=s, point=q, split=split, prompt=prompts,
                        gold=base + gain + rng.normal(0.0, 1.0, n_prompts),
                        kl=rng.gamma(4.0, kl_mean / 4.0, n_prompts),
                    )))
    return pd.concat(rows, ignore_index=True), pd.concat(anchor_rows, ignore_index=True)


CURVE = [(0.5, 0.4), (1.0, 0.7), (2.0, 1.0), (4.0, 1.2)]


def per_seed_by_hand(per_prompt, anchor, method, budget):
    """budget_value on each seed's prompt means, computed here from the long table."""
    out = []
    for s in sorted(per_prompt["seed"].unique()):
        rows = per_prompt[(per_prompt.method == method) & (per_prompt.seed == s)]
        means = rows.groupby(["split", "point"])[["kl", "gold"]].mean()
        a_means = anchor[anchor.seed == s].groupby("split")["gold"].mean()
        out.append(budget_value(means.loc["val", "kl"], means.loc["val", "gold"], means.loc["test", "kl"],
                                means.loc["test", "gold"], a_means["val"], a_means["test"], budget))
    return out


def test_per_seed_values_are_budget_value_on_prompt_means():
    per_prompt, anchor = long_tables({"dpo": CURVE, "ppo": CURVE[:2]}, 2, 40, np.random.default_rng(1))
    table = per_seed_budget_values(per_prompt, anchor, [0.7, 3.0])
    assert list(table.columns) == ["method", "seed", "kl_budget", "reached", "covered", "gold", "kl", "val_gold",
                                   "point_a", "point_b", "weight", "within_stderr", "n_test_prompts"]
    for (method, budget), group in table.groupby(["method", "kl_budget"]):
        hands = per_seed_by_hand(per_prompt, anchor, method, budget)
        for (_, row), hand in zip(group.sort_values("seed").iterrows(), hands):
            if hand is None:
                assert not row.reached and not row.covered and math.isnan(row.gold)
                continue
            own = per_prompt[(per_prompt.method == method) & (per_prompt.seed == row.seed) & (per_prompt.split == "val")]
            assert row.covered == (budget >= own.groupby("point").kl.mean().min())
            gold, kl, a, b, w = hand
            assert row.reached and (row.gold, row.kl, row.weight) == pytest.approx((gold, kl, w))
            assert (row.point_a, row.point_b) == tuple(ANCHOR_POINT if i == ANCHOR else i for i in (a, b))
    assert not table[(table.method == "ppo") & (table.kl_budget == 3.0)].reached.any()


def test_frontier_table_point_estimates_and_unreached_budgets():
    per_prompt, anchor = long_tables({"dpo": CURVE, "ppo": CURVE[:2]}, 3, 60, np.random.default_rng(2))
    # seed 2's ppo only reaches KL 0.5: budget 0.8 is then out of reach for ppo as a whole
    per_prompt = per_prompt[~((per_prompt.method == "ppo") & (per_prompt.seed == 2) & (per_prompt.point == 1))]
    table = frontier_table(per_prompt, anchor, [0.0, 0.8, 3.0], n_boot=200)
    assert list(table.columns) == ["method", "kl_budget", "gold_reward", "ci_low", "ci_high", "n_seeds",
                                   "kl", "stderr", "boot_reached", "covered", "kl_min"]
    assert set(zip(table.method, table.kl_budget)) == {("dpo", 0.0), ("dpo", 0.8), ("dpo", 3.0), ("ppo", 0.0)}
    for _, row in table.iterrows():
        hand = per_seed_by_hand(per_prompt, anchor, row.method, row.kl_budget)
        assert row.gold_reward == pytest.approx(np.mean([h[0] for h in hand]))
        assert row.kl == pytest.approx(np.mean([h[1] for h in hand]))
        assert row.n_seeds == 3
    at_zero = table[table.kl_budget == 0.0]
    assert (at_zero.kl == 0.0).all() and not at_zero.covered.any()  # the reference alone: no method's own policy
    val = per_prompt[per_prompt.split == "val"]
    for _, row in table.iterrows():
        floors = val[val.method == row.method].groupby(["seed", "point"]).kl.mean().groupby("seed").min()
        assert row.kl_min == pytest.approx(floors.max()) and row.covered == (row.kl_budget >= floors.max())
    anchor_test = anchor[anchor.split == "test"].groupby("seed").gold.mean().mean()
    assert at_zero.gold_reward.iloc[0] == pytest.approx(anchor_test)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_prompts():
    widths = []
    for n_prompts in (50, 800):
        per_prompt, anchor = long_tables({"dpo": CURVE}, 3, n_prompts, np.random.default_rng(3))
        table = frontier_table(per_prompt, anchor, [0.0, 0.3, 1.5, 3.0], n_boot=400, seed=1)
        assert len(table) == 4
        assert ((table.ci_low <= table.gold_reward) & (table.gold_reward <= table.ci_high)).all()
        widths.append((table.ci_high - table.ci_low).to_numpy())
    # 16 times the prompts: a quarter of the width expected, half of it required
    assert (widths[1] < 0.5 * widths[0]).all()


def test_bootstrap_resamples_prompts_once_per_seed_draw_for_all_methods():
    # a method and its copy see the same prompt resamples, so their intervals coincide exactly
    per_prompt, anchor = long_tables({"dpo": CURVE}, 2, 40, np.random.default_rng(15))
    both = pd.concat([per_prompt, per_prompt.assign(method="dpo_copy")], ignore_index=True)
    table = frontier_table(both, anchor, [0.7, 2.5], n_boot=200).set_index(["method", "kl_budget"])
    np.testing.assert_array_equal(table.loc["dpo"].to_numpy(), table.loc["dpo_copy"].to_numpy())


def test_bootstrap_is_reproducible_and_seeded():
    per_prompt, anchor = long_tables({"dpo": CURVE}, 2, 30, np.random.default_rng(4))
    first = frontier_table(per_prompt, anchor, [1.0], n_boot=100, seed=7)
    pd.testing.assert_frame_equal(first, frontier_table(per_prompt, anchor, [1.0], n_boot=100, seed=7))
    assert first.ci_low.iloc[0] != frontier_table(per_prompt, anchor, [1.0], n_boot=100, seed=8).ci_low.iloc[0]


def test_bootstrap_over_prompts_matches_the_standard_error_of_a_mean():
    # one seed, budget 0: the value is the anchor's test mean, whose bootstrap sd is
    # sd(gold) / sqrt(P) * sqrt((P - 1) / P) (the plug-in variance of a resampled mean)
    per_prompt, anchor = long_tables({"dpo": CURVE}, 1, 400, np.random.default_rng(5))
    table = frontier_table(per_prompt, anchor, [0.0], n_boot=4000)
    test_gold = anchor[anchor.split == "test"].gold.to_numpy()
    expected = test_gold.std(ddof=0) / math.sqrt(test_gold.size)
    assert table.stderr.iloc[0] == pytest.approx(expected, rel=0.06)


def test_bootstrap_over_seeds_matches_the_spread_of_seed_means():
    # three seeds whose anchors differ by -1, 0, +1 with little prompt noise next to that: the
    # mean of 3 seeds drawn with replacement from {-1, 0, 1} has sd sqrt((2/3) / 3) = 0.471
    rng = np.random.default_rng(6)
    per_prompt, anchor = long_tables({"dpo": CURVE}, 3, 2000, rng, seed_offsets=[-1.0, 0.0, 1.0])
    table = frontier_table(per_prompt, anchor, [0.0], n_boot=4000)
    assert table.stderr.iloc[0] == pytest.approx(math.sqrt(2 / 9), rel=0.06)


def test_boot_reached_flags_budgets_near_the_edge():
    per_prompt, anchor = long_tables({"dpo": CURVE}, 1, 30, np.random.default_rng(7))
    reach = per_prompt[(per_prompt.split == "val") & (per_prompt.point == 3)].kl.mean()
    table = frontier_table(per_prompt, anchor, [0.5, reach], n_boot=300)
    assert table.boot_reached.iloc[0] == 1.0
    assert 0.2 < table.boot_reached.iloc[1] < 0.8  # at the edge about half the resamples fall short


# --- comparisons -----------------------------------------------------------------------------


def test_compare_at_budgets_three_seeds_is_a_t_test_over_per_seed_differences():
    per_prompt, anchor = long_tables({"dpo": CURVE, "ppo": [(kl, gain * 0.8) for kl, gain in CURVE]}, 3, 80,
                                     np.random.default_rng(8))
    table = compare_at_budgets(per_prompt, anchor, "dpo", "ppo", [0.7, 2.5, 9.0])
    assert list(table.columns) == ["kl_budget", "diff", "stderr", "ci_low", "ci_high", "p", "test", "n_seeds", "gold_a", "gold_b"]
    assert list(table.kl_budget) == [0.7, 2.5]  # 9.0 is out of reach
    for _, row in table.iterrows():
        a = [h[0] for h in per_seed_by_hand(per_prompt, anchor, "dpo", row.kl_budget)]
        b = [h[0] for h in per_seed_by_hand(per_prompt, anchor, "ppo", row.kl_budget)]
        d = np.subtract(a, b)
        ref = stats.ttest_1samp(d, 0.0)
        ci = ref.confidence_interval(0.95)
        expected = (d.mean(), ref.pvalue, ci.low, ci.high)
        assert (row["diff"], row.p, row.ci_low, row.ci_high) == pytest.approx(expected)
        assert (row.gold_a, row.gold_b) == pytest.approx((np.mean(a), np.mean(b)))
        assert row.test == "paired t over 3 seeds" and row.n_seeds == 3


def test_compare_at_budgets_one_seed_uses_the_paired_per_prompt_error():
    # KL constant over prompts, so the val choice is known: at budget 0.5, method a (one point at
    # KL 1) mixes the anchor and its point half and half; method b (one point at KL 0.5) is alone.
    rng = np.random.default_rng(9)
    n = 50
    prompts = np.arange(n)
    frames, anchors, test_gold = [], [], {}
    for split in ("val", "test"):
        base = rng.normal(size=n)
        anchors.append(pd.DataFrame(dict(seed=0, split=split, prompt=prompts, gold=base)))
        for method, kl in (("a", 1.0), ("b", 0.5)):
            gold = base + rng.normal(0.3, 1.0, n)
            test_gold[method, split] = gold
            frames.append(pd.DataFrame(dict(method=method, seed=0, point="only", split=split, prompt=prompts,
                                            gold=gold, kl=np.full(n, kl))))
        test_gold["anchor", split] = base
    # (below a's point, so only compared with covered_only=False: this checks the arithmetic)
    table = compare_at_budgets(pd.concat(frames), pd.concat(anchors), "a", "b", [0.5], covered_only=False)
    d = 0.5 * test_gold["anchor", "test"] + 0.5 * test_gold["a", "test"] - test_gold["b", "test"]
    se = d.std(ddof=1) / math.sqrt(n)
    row = table.iloc[0]
    assert (row["diff"], row.stderr) == pytest.approx((d.mean(), se))
    assert row.p == pytest.approx(2 * stats.norm.sf(abs(d.mean()) / se))
    assert row.ci_high - row["diff"] == pytest.approx(stats.norm.ppf(0.975) * se)
    assert "one seed: evaluation error only" in row.test and row.n_seeds == 1


def test_budgets_below_a_methods_smallest_kl_are_not_compared():
    """Below its first policy a method's frontier is the chord from the reference: a mixture any
    method has for free, so a comparison there would measure the grid, not the method."""
    per_prompt, anchor = long_tables({"dpo": CURVE, "ppo": CURVE[2:]}, 3, 80, np.random.default_rng(7))
    covered = compare_at_budgets(per_prompt, anchor, "ppo", "dpo", [0.6, 1.0, 3.0])
    assert list(covered.kl_budget) == [3.0]  # ppo's points start near KL 2
    both = compare_at_budgets(per_prompt, anchor, "ppo", "dpo", [0.6, 1.0, 3.0], covered_only=False)
    assert list(both.kl_budget) == [0.6, 1.0, 3.0]
    assert (both[both.kl_budget < 2]["diff"] < 0).all()  # the chord undersells ppo: gains 1.0 at KL 2 read as 0.3, 0.5
    table = frontier_table(per_prompt, anchor, [0.6, 1.0, 3.0], n_boot=0)
    ppo = table[table.method == "ppo"].set_index("kl_budget")
    assert list(ppo.covered) == [False, False, True] and table[table.method == "dpo"].covered.all()


def test_compare_at_budgets_names_unknown_methods():
    per_prompt, anchor = long_tables({"dpo": CURVE}, 1, 10, np.random.default_rng(10))
    with pytest.raises(ValueError, match="unknown method 'ipo'"):
        compare_at_budgets(per_prompt, anchor, "dpo", "ipo", [1.0])


# --- input checks ----------------------------------------------------------------------------


def test_methods_must_share_prompts_within_a_seed():
    per_prompt, anchor = long_tables({"dpo": CURVE}, 1, 10, np.random.default_rng(11))
    with pytest.raises(ValueError, match=r"\('dpo', 2\) lacks some of the anchor's prompts"):
        per_seed_budget_values(per_prompt.drop(index=per_prompt[(per_prompt.point == 2)].index[3]), anchor, [1.0])
    with pytest.raises(ValueError, match="lacks the columns \\['kl'\\]"):
        frontier_table(per_prompt.drop(columns="kl"), anchor, [1.0])
    with pytest.raises(ValueError, match="repeats the row"):
        frontier_table(pd.concat([per_prompt, per_prompt.iloc[:1]]), anchor, [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        frontier_table(per_prompt, anchor, [-1.0])


# --- best-of-n KL ----------------------------------------------------------------------------


def brute_force_best_of_n_kl(values, probs, n):
    """KL(best-of-n || p) by enumerating all n-tuples of draws from p over distinct values."""
    best = np.zeros(len(values))
    for draw in itertools.product(range(len(values)), repeat=n):
        best[max(draw, key=lambda i: values[i])] += np.prod([probs[i] for i in draw])
    keep = best > 0
    return float(np.sum(best[keep] * np.log(best[keep] / np.asarray(probs)[keep])))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_best_of_n_kl_plug_in_equals_brute_force_on_a_pool_matching_the_distribution(n):
    rng = np.random.default_rng(12)
    # row 0: values 0.3, -1, 2 with probabilities 1/2, 1/3, 1/6 -> a pool of 12 with counts 6, 4, 2
    # row 1: values 1, 2, 3, 4 with probabilities 1/4, 1/4, 1/6, 1/3 -> counts 3, 3, 2, 4
    rows = [([0.3, -1.0, 2.0], [6, 4, 2]), ([1.0, 2.0, 3.0, 4.0], [3, 3, 2, 4])]
    pool = np.stack([rng.permutation(np.repeat(v, c)) for v, c in rows])
    estimate = best_of_n_kl_estimate(pool, n)
    for row, (values, counts) in enumerate(rows):
        exact = brute_force_best_of_n_kl(values, np.array(counts) / 12, n)
        assert estimate[row] == pytest.approx(exact, abs=1e-12)


def test_best_of_n_kl_binary_closed_form():
    # two equally likely outcomes (Beirami et al.'s counterexample): best-of-n picks the better one
    # with probability 1 - 2^-n, so KL = 2^-n log(2 * 2^-n) + (1 - 2^-n) log(2 (1 - 2^-n)) < log 2
    for n in (2, 8, 40):
        lo = 0.5**n
        expected = lo * math.log(2 * lo) + (1 - lo) * math.log(2 * (1 - lo))
        assert best_of_n_kl_estimate(np.array([[0.0, 1.0]]), n)[0] == pytest.approx(expected)
        assert expected < math.log(2)  # while the bound log n - (n - 1)/n grows without limit


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_with_distinct_scores_approaches_the_bound_from_below(n):
    pools = [np.random.default_rng(13).normal(size=(1, m)) for m in (10, 100, 1000, 10000)]
    estimates = np.array([best_of_n_kl_estimate(pool, n)[0] for pool in pools])
    bound = best_of_n_kl_bound(n)
    assert (estimates < bound).all() and (np.diff(estimates) > 0).all()
    assert bound - estimates[-1] < 0.01 * bound


@QUICK
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.integers(1, 50))
def test_best_of_n_kl_depends_only_on_the_ranks(scores, n):
    s = np.array([scores], dtype=float)
    base = best_of_n_kl_estimate(s, n)[0]
    assert best_of_n_kl_estimate(np.exp(s) * 3 - 7, n)[0] == pytest.approx(base, abs=1e-12)
    assert -1e-12 <= base <= best_of_n_kl_bound(n) + 1e-12


def test_best_of_n_kl_is_zero_for_n_one_and_for_identical_draws():
    pool = np.random.default_rng(14).normal(size=(5, 64))
    np.testing.assert_allclose(best_of_n_kl_estimate(pool, 1), 0.0, atol=1e-12)
    assert (best_of_n_kl_estimate(np.full((3, 20), 0.7), 16) == 0.0).all()


def test_best_of_n_kl_bound_closed_form():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl_estimate(np.zeros((1, 3)), 0)
