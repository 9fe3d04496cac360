"""The regularised optimum on a pool of reference draws (``benchmarks.optimum``): closed forms and
the bound every policy on the pool obeys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.optimum import pool_optimum


def test_a_two_draw_pool_matches_its_closed_form():
    c, a, b = 0.2, 1.0, 0.3
    out = pool_optimum(np.array([[a, b]]), c)
    assert out["objective"] == pytest.approx(c * math.log((math.exp(a / c) + math.exp(b / c)) / 2))
    w = math.exp(a / c) / (math.exp(a / c) + math.exp(b / c))
    assert out["proxy"] == pytest.approx(w * a + (1 - w) * b)
    assert out["kl"] == pytest.approx(w * math.log(2 * w) + (1 - w) * math.log(2 * (1 - w)))


def test_equal_scores_leave_the_reference_alone():
    out = pool_optimum(np.full((3, 5), 0.7), 0.1)
    assert out == pytest.approx({"objective": 0.7, "proxy": 0.7, "kl": 0.0})


@given(st.integers(0, 10_000), st.integers(2, 40), st.floats(0.02, 2.0))
@settings(max_examples=60, deadline=None)
def test_the_optimum_beats_every_policy_on_the_pool(seed, n, c):
    """Its value is its proxy reward less c·KL, and at least the reference's (the pool's mean), the
    argmax's (max − c·log n) and best-of-2's on the same draws."""
    scores = np.random.default_rng(seed).normal(size=(7, n)) * 2
    out = pool_optimum(scores, c)
    assert out["objective"] == pytest.approx(out["proxy"] - c * out["kl"], abs=1e-9)
    assert out["objective"] >= scores.mean() - 1e-9
    assert out["objective"] >= (scores.max(axis=1) - c * math.log(n)).mean() - 1e-9
    # best-of-2 on the pool: draw j wins with probability (2·rank_j − 1)/n² (ranks 1..n, no ties)
    ranks = scores.argsort(axis=1).argsort(axis=1) + 1
    weights = (2 * ranks - 1) / n ** 2
    bo2 = ((weights * scores).sum(axis=1) - c * (weights * np.log(weights * n)).sum(axis=1)).mean()
    assert out["objective"] >= bo2 - 1e-9
