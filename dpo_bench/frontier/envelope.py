"""The points layer: a method's upper envelope of (KL, gold) points and the SFT anchor, the mixture and
value at a KL budget, and a budget's value chosen on validation means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ANCHOR = -1  # the anchor's index in Envelope.index and in mixtures (a, b)
ANCHOR_POINT = "anchor"  # the anchor's label in the point_a / point_b columns

# =============================================================================================
# Points: the envelope of one method's (kl, gold) means
# =============================================================================================


@dataclass(frozen=True, eq=False)
class Envelope:
    """The non-decreasing upper concave hull of a method's (kl, gold) points and the anchor.

    kl, gold: (V,) the vertices in ascending KL, gold strictly increasing; index: (V,) which input
    point each vertex is (ANCHOR = -1 for the anchor). The last vertex holds the best gold; beyond
    it the frontier is flat up to `reach`, the largest KL of any input point (anchor included).
    Budgets past `reach` are not reached: the method was never measured there.
    """

    kl: np.ndarray
    gold: np.ndarray
    index: np.ndarray
    reach: float


def _points(
    kl: Sequence[float], gold: Sequence[float], names: str = "kl and gold"
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float arrays of paired, finite KL and gold values."""
    k = np.asarray(kl, dtype=float).ravel()
    g = np.asarray(gold, dtype=float).ravel()
    if k.shape != g.shape:
        raise ValueError(f"{names} must have the same length, got {k.size} and {g.size}")
    if not (np.isfinite(k).all() and np.isfinite(g).all()):
        raise ValueError(f"{names} must be finite")
    return k, g


def _upper_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Positions of the upper concave hull's vertices in ascending x (Andrew's monotone chain).

    Collinear middle points are dropped; at equal x only the highest y (the first on ties) is kept.
    """
    hull: list[int] = []
    for i in np.lexsort((-y, x)):  # stable: ascending x, the highest y first within an x
        if hull and x[i] == x[hull[-1]]:
            continue
        while len(hull) >= 2:
            o, m = hull[-2], hull[-1]
            # a left turn or a straight line at m: m lies on or below the chord o -> i
            if (x[m] - x[o]) * (y[i] - y[o]) - (y[m] - y[o]) * (x[i] - x[o]) >= 0:
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def upper_envelope(
    kl: Sequence[float], gold: Sequence[float], *, anchor_kl: float = 0.0, anchor_gold: float
) -> Envelope:
    """The frontier of one method: points (n,) kl and gold, plus the anchor (anchor_kl, anchor_gold).

    The upper concave hull of the n + 1 points, cut at its best-gold vertex (the first, i.e. the
    lowest-KL one, on ties): the hull rises up to it, and past it the best policy within a
    budget stays that vertex, so the frontier is flat there.
    """
    k, g = _points(kl, gold)
    all_kl = np.concatenate([[float(anchor_kl)], k])
    all_gold = np.concatenate([[float(anchor_gold)], g])
    if not (np.isfinite(all_kl[0]) and np.isfinite(all_gold[0])):
        raise ValueError("anchor_kl and anchor_gold must be finite")
    hull = np.array(_upper_hull(all_kl, all_gold))
    rising = hull[: int(np.argmax(all_gold[hull])) + 1]
    return Envelope(all_kl[rising], all_gold[rising], rising - 1, float(all_kl.max()))


def _check_budget(budget: float) -> float:
    budget = float(budget)
    if not budget >= 0.0:  # also refuses NaN
        raise ValueError(f"a KL budget must be >= 0, got {budget}")
    return budget


def _segment(envelope: Envelope, budget: float) -> tuple[int, int, float] | None:
    """Vertex positions (lo, hi) and weight w on lo with w kl_lo + (1 - w) kl_hi = budget."""
    budget = _check_budget(budget)
    kl = envelope.kl
    if budget > envelope.reach or budget < kl[0]:
        return None
    last = kl.size - 1
    if budget >= kl[last]:
        return last, last, 1.0  # the flat part: the best point within the budget
    hi = int(np.searchsorted(kl, budget, side="right"))  # first vertex past the budget, >= 1
    lo = hi - 1
    if kl[lo] == budget:
        return lo, lo, 1.0
    return lo, hi, float((kl[hi] - budget) / (kl[hi] - kl[lo]))


def mixture_at(envelope: Envelope, budget: float) -> tuple[int, int, float] | None:
    """The frontier's mixture at a KL budget: input-point indices (a, b) (ANCHOR = -1) and weight w
    on a, with w kl_a + (1 - w) kl_b = budget on the rising part; (best, best, 1.0) on the flat
    part; None past `reach` (never extrapolated). A negative budget raises ValueError."""
    seg = _segment(envelope, budget)
    if seg is None:
        return None
    lo, hi, w = seg
    return int(envelope.index[lo]), int(envelope.index[hi]), w


def envelope_value(envelope: Envelope, budget: float) -> float:
    """Gold reward of the frontier at a KL budget; NaN when the budget is not reached."""
    seg = _segment(envelope, budget)
    if seg is None:
        return float("nan")
    lo, hi, w = seg
    return float(w * envelope.gold[lo] + (1.0 - w) * envelope.gold[hi])


def budget_value(
    val_kl: Sequence[float],
    val_gold: Sequence[float],
    test_kl: Sequence[float],
    test_gold: Sequence[float],
    anchor_val_gold: float,
    anchor_test_gold: float,
    budget: float,
) -> tuple[float, float, int, int, float] | None:
    """Gold at a KL budget, the mixture chosen on validation and reported on test.

    val_kl, val_gold, test_kl, test_gold: (n,) one method's point means on each split. The
    mixture (a, b, w) is the validation frontier's (`mixture_at`); the same indices and weight
    are then read on the test means, the anchor's test KL being 0. Returns (test_gold, test_kl,
    a, b, w), or None when the validation points do not reach the budget. test_kl is the chord,
    an upper bound on the mixture's KL, and may exceed the budget by the val/test noise.
    """
    vk, vg = _points(val_kl, val_gold, "val_kl and val_gold")
    tk, tg = _points(test_kl, test_gold, "test_kl and test_gold")
    if vk.size != tk.size:
        raise ValueError(f"validation and test must hold the same points, got {vk.size} and {tk.size}")
    mix = mixture_at(upper_envelope(vk, vg, anchor_gold=anchor_val_gold), budget)
    if mix is None:
        return None
    a, b, w = mix
    test_kl_all = np.concatenate([[0.0], tk])  # position 0 is the anchor (index -1)
    test_gold_all = np.concatenate([[float(anchor_test_gold)], tg])
    gold = w * test_gold_all[a + 1] + (1.0 - w) * test_gold_all[b + 1]
    kl = w * test_kl_all[a + 1] + (1.0 - w) * test_kl_all[b + 1]
    return float(gold), float(kl), a, b, w


def _best_mixtures(
    kl: np.ndarray, gold: np.ndarray, valid: np.ndarray, budgets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The best mixture within each budget for many point sets at once: the bootstrap's route.

    kl, gold: (..., Q) points; valid: broadcastable to (..., Q), which slots hold a point;
    budgets: (K,). Returns a, b (..., K) slot positions, w (..., K) the weight on a, value
    (..., K) the mixture's gold (NaN where the budget is not reached). The frontier value at k is
    the linear program max sum_i w_i g_i s.t. sum_i w_i kl_i <= k, sum_i w_i = 1, w >= 0, whose
    optimum sits on at most two points (two constraints): a single point with kl_i <= k, or a
    pair straddling k, kl_i <= k < kl_j, on their chord at k. Enumerating those Q^2 candidates
    gives the value of `upper_envelope` + `envelope_value` without a per-set Python loop; the
    chosen mixture is the hull's too, except between mixtures of exactly equal gold.
    """
    q = kl.shape[-1]
    valid = np.broadcast_to(valid, kl.shape)
    pair_valid = valid[..., :, None] & valid[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (gold[..., None, :] - gold[..., :, None]) / (kl[..., None, :] - kl[..., :, None])
    reach = np.where(valid, kl, -np.inf).max(axis=-1)
    diagonal = np.arange(q)
    shape = kl.shape[:-1] + (len(budgets),)
    a, b = np.empty(shape, dtype=int), np.empty(shape, dtype=int)
    w, value = np.empty(shape), np.empty(shape)
    for k, budget in enumerate(budgets):
        within = valid & (kl <= budget)
        straddle = pair_valid & within[..., :, None] & ~within[..., None, :]
        with np.errstate(invalid="ignore"):  # slopes between equal KLs are never straddling pairs
            candidates = np.where(straddle, gold[..., :, None] + (budget - kl[..., :, None]) * slope, -np.inf)
        candidates[..., diagonal, diagonal] = np.where(within, gold, -np.inf)
        flat = candidates.reshape(*kl.shape[:-1], q * q)
        best = flat.argmax(axis=-1)
        a[..., k], b[..., k] = np.divmod(best, q)
        kl_a, kl_b = _take(kl, a[..., k]), _take(kl, b[..., k])
        with np.errstate(divide="ignore", invalid="ignore"):
            w[..., k] = np.where(kl_a == kl_b, 1.0, (kl_b - budget) / (kl_b - kl_a))
        best_value = _take(flat, best)
        value[..., k] = np.where((budget <= reach) & np.isfinite(best_value), best_value, np.nan)
    return a, b, w, value


def _take(x: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """x: (..., Q), slot: (...,) -> (...,) x at each slot."""
    return np.take_along_axis(x, slot[..., None], axis=-1)[..., 0]


# =============================================================================================
# Per prompt: seeds, prompts, and the hierarchical bootstrap
# =============================================================================================

