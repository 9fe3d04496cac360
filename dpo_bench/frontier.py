"""The reward-KL frontier of a method, and its gold reward at fixed KL budgets.

A method traces points (kl_i, gold_i), one per (strength, checkpoint). Its frontier is the upper
concave hull of those points and of the SFT reference (the anchor, at KL 0), made non-decreasing
in KL. Why concave: a per-prompt random mixture of policies a and b with weight w has gold reward
w g_a + (1 - w) g_b and, KL being convex in the policy, KL at most w kl_a + (1 - w) kl_b, so every
chord of the hull is achievable. Why non-decreasing: the best policy within a KL budget k is the
best at KL <= k. Beyond the largest KL a method was measured at, nothing is claimed. Below the
smallest, the frontier is the chord from the reference to the method's nearest policy: a mixture
with the reference that every method gets for free, not a policy the method trained there. Such a
budget is not *covered* by the method; the verdict compares methods only at budgets both cover.

Three layers, each pure numpy (pandas only where a DataFrame is the input or output):
  points      upper_envelope, mixture_at, envelope_value, budget_value (chosen on validation
              means, reported on test means)
  per prompt  per_seed_budget_values, frontier_table (hierarchical bootstrap over seeds and
              prompts), compare_at_budgets (paired across seeds, or across prompts for one seed)
  best-of-n   best_of_n_kl_estimate (exact plug-in KL from a reference pool), best_of_n_kl_bound
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import pandas as pd

from .evaluate import CONFIDENCE, mean_stderr, seed_paired_test

__all__ = [
    "ANCHOR",
    "ANCHOR_POINT",
    "Envelope",
    "upper_envelope",
    "mixture_at",
    "envelope_value",
    "budget_value",
    "per_seed_budget_values",
    "frontier_table",
    "compare_at_budgets",
    "best_of_n_kl_estimate",
    "best_of_n_kl_bound",
]

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

PER_PROMPT_COLUMNS = ("method", "seed", "point", "split", "prompt", "gold", "kl")
ANCHOR_COLUMNS = ("seed", "split", "prompt", "gold")
SPLITS = ("val", "test")
FRONTIER_COLUMNS = (
    "method", "kl_budget", "gold_reward", "ci_low", "ci_high", "n_seeds", "kl", "stderr", "boot_reached",
    "covered", "kl_min",
)
PER_SEED_COLUMNS = (
    "method", "seed", "kl_budget", "reached", "covered", "gold", "kl", "val_gold",
    "point_a", "point_b", "weight", "within_stderr", "n_test_prompts",
)
COMPARE_COLUMNS = ("kl_budget", "diff", "stderr", "ci_low", "ci_high", "p", "test", "n_seeds", "gold_a", "gold_b")


@dataclass(frozen=True, eq=False)
class _Split:
    """One seed's prompts of one split. gold, kl: (M, Q, P) per method and point slot (0 in empty
    slots); anchor: (P,) the SFT reference's gold, whose KL is 0."""

    gold: np.ndarray
    kl: np.ndarray
    anchor: np.ndarray

    def column(self, method: int, slot: int) -> np.ndarray:
        """(P,) per-prompt gold of one point of a method; slot ANCHOR is the anchor."""
        return self.anchor if slot == ANCHOR else self.gold[method, slot]

    def prompt_values(self, method: int, a: int, b: int, w: float) -> np.ndarray:
        """(P,) the mixture's per-prompt gold w gold_a + (1 - w) gold_b."""
        return w * self.column(method, a) + (1.0 - w) * self.column(method, b)


@dataclass(frozen=True, eq=False)
class _Seed:
    """One training seed: its methods' points (slots 0..Q_m - 1 of method m) on both splits."""

    seed: Hashable
    points: tuple[tuple, ...]  # per method, the point labels in slot order
    valid: np.ndarray  # (M, Q) which slots hold a point
    val: _Split
    test: _Split

    def label(self, method: int, slot: int) -> Hashable:
        return ANCHOR_POINT if slot == ANCHOR else self.points[method][slot]


@dataclass(frozen=True, eq=False)
class _Choice:
    """One method in one seed at one budget: the val-chosen mixture and its test values."""

    a: int
    b: int
    w: float
    val_gold: float
    test_gold: float
    test_kl: float
    prompt_values: np.ndarray  # (P_test,) per-prompt test gold of the mixture
    kl_min: float  # the smallest validation KL of the method's own points in this seed
    covered: bool  # the budget is at or above kl_min: not on the chord from the reference alone


def _plain(value):
    """A numpy scalar as the Python value it holds (for readable error messages), else as is."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def _check_frame(frame: pd.DataFrame, name: str, columns: Sequence[str], values: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks the columns {missing}; it needs {list(columns)}")
    splits = set(frame["split"].unique()) - set(SPLITS)
    if splits:
        raise ValueError(f"{name}.split holds {sorted(map(str, splits))}; only {list(SPLITS)} are allowed")
    if not np.isfinite(frame[list(values)].to_numpy(dtype=float)).all():
        raise ValueError(f"{name} columns {list(values)} must be finite")
    keys = [c for c in columns if c not in values]
    duplicated = frame.duplicated(keys)
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise ValueError(f"{name} repeats the row {_plain(tuple(row[keys]))}: one value per {keys}")


def _load_split(rows: pd.DataFrame, anchor: pd.Series, where: str) -> tuple[list, np.ndarray, np.ndarray]:
    """(slot keys [(method, point)], gold (n_slots, P), kl (n_slots, P)) in the anchor's prompt order."""
    extra = set(rows["prompt"]) - set(anchor.index)
    if extra:
        raise ValueError(f"{where}: prompts {_plain(tuple(sorted(extra)[:5]))} are missing from the anchor")
    wide = rows.pivot(index=["method", "point"], columns="prompt", values=["gold", "kl"])
    gold = wide["gold"].reindex(columns=anchor.index)
    kl = wide["kl"].reindex(columns=anchor.index)
    missing = gold.isna().any(axis=1)
    if missing.any():
        raise ValueError(
            f"{where}: (method, point) {_plain(missing[missing].index[0])} lacks some of the anchor's prompts;"
            " every method must be evaluated on the same prompts within a seed (paired comparisons)"
        )
    return list(gold.index), gold.to_numpy(dtype=float), kl.to_numpy(dtype=float)


def _load_seed(rows: pd.DataFrame, anchor_rows: pd.DataFrame, seed: Hashable, methods: tuple) -> _Seed:
    slots: dict[Hashable, list] = {m: [] for m in methods}
    arrays = {}
    keys_by_split = {}
    for split in SPLITS:
        where = f"seed {_plain(seed)!r}, split {split!r}"
        anchor = anchor_rows[anchor_rows["split"] == split].set_index("prompt")["gold"].sort_index()
        if anchor.empty:
            raise ValueError(f"{where}: the anchor has no prompts")
        keys, gold, kl = _load_split(rows[rows["split"] == split], anchor, where)
        keys_by_split[split] = keys
        arrays[split] = (gold, kl, anchor.to_numpy(dtype=float))
    if keys_by_split["val"] != keys_by_split["test"]:
        raise ValueError(f"seed {_plain(seed)!r}: the val and test splits hold different (method, point) sets")
    for method, point in keys_by_split["val"]:
        if point == ANCHOR_POINT:
            raise ValueError(
                f"the point label {ANCHOR_POINT!r} is reserved for the anchor (method {_plain(method)!r})"
            )
        slots[method].append(point)
    m_of = {m: i for i, m in enumerate(methods)}
    where_m = np.array([m_of[m] for m, _ in keys_by_split["val"]], dtype=int)
    where_q = np.array([slots[m].index(p) for m, p in keys_by_split["val"]], dtype=int)
    n_slots = max(len(v) for v in slots.values())
    valid = np.zeros((len(methods), n_slots), dtype=bool)
    valid[where_m, where_q] = True
    splits = {}
    for split, (gold, kl, anchor) in arrays.items():
        full_gold = np.zeros((len(methods), n_slots, anchor.size))
        full_kl = np.zeros_like(full_gold)
        full_gold[where_m, where_q] = gold
        full_kl[where_m, where_q] = kl
        splits[split] = _Split(full_gold, full_kl, anchor)
    return _Seed(seed, tuple(tuple(slots[m]) for m in methods), valid, splits["val"], splits["test"])


def _load(per_prompt: pd.DataFrame, anchor: pd.DataFrame) -> tuple[tuple, list[_Seed]]:
    """Validate the long tables and pack them per seed: (methods, seeds)."""
    _check_frame(per_prompt, "per_prompt", PER_PROMPT_COLUMNS, ("gold", "kl"))
    _check_frame(anchor, "anchor", ANCHOR_COLUMNS, ("gold",))
    methods = tuple(pd.unique(per_prompt["method"]))
    seeds = tuple(pd.unique(per_prompt["seed"]))
    if not methods:
        raise ValueError("per_prompt is empty")
    if set(pd.unique(anchor["seed"])) != set(seeds):
        anchor_seeds = _plain(tuple(pd.unique(anchor["seed"])))
        raise ValueError(f"per_prompt and anchor must cover the same seeds, got {_plain(seeds)} and {anchor_seeds}")
    seeds_of = per_prompt.groupby("method", sort=False)["seed"].nunique()
    short = seeds_of[seeds_of < len(seeds)]
    if not short.empty:
        raise ValueError(
            f"method {_plain(short.index[0])!r} lacks some of the seeds {_plain(seeds)}; every method needs every seed"
        )
    by_seed = dict(tuple(per_prompt.groupby("seed", sort=False)))
    anchor_by_seed = dict(tuple(anchor.groupby("seed", sort=False)))
    return methods, [_load_seed(by_seed[s], anchor_by_seed[s], s, methods) for s in seeds]


def _check_budgets(budgets: Sequence[float]) -> np.ndarray:
    values = sorted({_check_budget(b) for b in np.atleast_1d(np.asarray(budgets, dtype=float))})
    if not values:
        raise ValueError("budgets is empty")
    return np.array(values)


def _choose(seed: _Seed, method: int, budget: float) -> _Choice | None:
    """budget_value on the seed's prompt means, with the mixture's per-prompt test values."""
    n = len(seed.points[method])
    val, test = seed.val, seed.test
    chosen = budget_value(
        val.kl[method, :n].mean(axis=-1), val.gold[method, :n].mean(axis=-1),
        test.kl[method, :n].mean(axis=-1), test.gold[method, :n].mean(axis=-1),
        val.anchor.mean(), test.anchor.mean(), budget,
    )
    if chosen is None:
        return None
    test_gold, test_kl, a, b, w = chosen
    val_gold = float(val.prompt_values(method, a, b, w).mean())
    kl_min = float(val.kl[method, :n].mean(axis=-1).min()) if n else math.inf
    return _Choice(a, b, w, val_gold, test_gold, test_kl, test.prompt_values(method, a, b, w), kl_min,
                   bool(budget >= kl_min))


def _choices(methods: tuple, seeds: list[_Seed], budgets: np.ndarray) -> list[list[list[_Choice | None]]]:
    """[seed][method][budget] -> the val-chosen mixture, or None when not reached."""
    return [[[_choose(s, m, k) for k in budgets] for m in range(len(methods))] for s in seeds]


def per_seed_budget_values(
    per_prompt: pd.DataFrame, anchor: pd.DataFrame, budgets: Sequence[float]
) -> pd.DataFrame:
    """One row per (method, seed, kl_budget): the test gold of the val-chosen mixture.

    per_prompt: long table with columns method, seed, point, split ("val"/"test"), prompt, gold,
    kl: one method point's gold reward and KL estimate on one prompt. anchor: columns seed,
    split, prompt, gold, the SFT reference (KL 0) on the same prompts.
    Columns: method, seed, kl_budget, reached, covered (reached, and at or above the smallest
    validation KL of the method's own points: not read on the chord from the reference alone), gold
    and kl (test means of the mixture, NaN when not reached), val_gold (its validation value),
    point_a, point_b (point labels, ANCHOR_POINT for
    the anchor) and weight (on point_a): the mixture; within_stderr: sd/sqrt(n) over test prompts
    of the mixture's per-prompt gold w gold_a,i + (1 - w) gold_b,i, the evaluation error of
    `gold` with the val choice held fixed; n_test_prompts.
    """
    methods, seeds = _load(per_prompt, anchor)
    budgets = _check_budgets(budgets)
    choices = _choices(methods, seeds, budgets)
    rows = []
    for s, seed in enumerate(seeds):
        for m, method in enumerate(methods):
            for k, budget in enumerate(budgets):
                c = choices[s][m][k]
                row = dict(method=method, seed=seed.seed, kl_budget=budget, reached=c is not None,
                           covered=c is not None and c.covered, n_test_prompts=seed.test.anchor.size)
                if c is not None:
                    row.update(
                        gold=c.test_gold, kl=c.test_kl, val_gold=c.val_gold,
                        point_a=seed.label(m, c.a), point_b=seed.label(m, c.b), weight=c.w,
                        within_stderr=mean_stderr(c.prompt_values)[1],
                    )
                rows.append(row)
    return pd.DataFrame(rows, columns=list(PER_SEED_COLUMNS))


def _resample_counts(rng: np.random.Generator, n_draws: int, n_prompts: int) -> np.ndarray:
    """(n_draws, n_prompts) how often each prompt is drawn in each resample with replacement."""
    drawn = rng.integers(0, n_prompts, size=(n_draws, n_prompts))
    drawn += n_prompts * np.arange(n_draws)[:, None]
    return np.bincount(drawn.ravel(), minlength=n_draws * n_prompts).reshape(n_draws, n_prompts).astype(float)


def _with_anchor(split: _Split) -> tuple[np.ndarray, np.ndarray]:
    """gold, kl: (M, Q + 1, P) with the anchor in the last slot, at KL 0."""
    m, _, p = split.gold.shape
    anchor_gold = np.broadcast_to(split.anchor, (m, 1, p))
    gold = np.concatenate([split.gold, anchor_gold], axis=1)
    kl = np.concatenate([split.kl, np.zeros((m, 1, p))], axis=1)
    return gold, kl


def _resampled_means(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """x: (..., P) per-prompt values, counts: (n, P) -> (n, ...) means over each resample."""
    return np.tensordot(counts, x, axes=([1], [x.ndim - 1])) / x.shape[-1]


def _seed_draws(seed: _Seed, budgets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, M, K) test gold at each budget for n prompt resamples of one seed, NaN where the
    resampled validation points do not reach the budget.

    Each resample draws val and test prompts once, for every method and the anchor alike, so
    the methods stay paired; the mixture is re-chosen on the resampled validation means.
    """
    val_gold, val_kl = _with_anchor(seed.val)
    test_gold, _ = _with_anchor(seed.test)
    valid = np.concatenate([seed.valid, np.ones((seed.valid.shape[0], 1), dtype=bool)], axis=1)
    val = _resampled_means(np.stack([val_gold, val_kl]), _resample_counts(rng, n, seed.val.anchor.size))
    test = _resampled_means(test_gold, _resample_counts(rng, n, seed.test.anchor.size))
    a, b, w, val_value = _best_mixtures(val[:, 1], val[:, 0], valid, budgets)  # (n, M, K)
    test_value = w * np.take_along_axis(test, a, axis=-1) + (1.0 - w) * np.take_along_axis(test, b, axis=-1)
    return np.where(np.isnan(val_value), np.nan, test_value)


def _bootstrap(seeds: list[_Seed], budgets: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, M, K) hierarchical bootstrap of the mean over seeds of the test gold at a budget.

    Each draw resamples S seeds with replacement, then each drawn seed's val and test prompts
    (a fresh prompt resample per seed slot); NaN where a drawn seed does not reach the budget.
    """
    drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    values = np.empty((n_boot, len(seeds), seeds[0].valid.shape[0], budgets.size))
    for s, seed in enumerate(seeds):
        slots = drawn == s
        values[slots] = _seed_draws(seed, budgets, int(slots.sum()), rng)
    return values.mean(axis=1)


def frontier_table(
    per_prompt: pd.DataFrame,
    anchor: pd.DataFrame,
    budgets: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Gold reward of each method at each KL budget, chosen on val and reported on test.

    per_prompt, anchor: as in `per_seed_budget_values`. One row per (method, kl_budget) that the
    method reaches in every seed (otherwise no row: nothing is extrapolated), with columns
      gold_reward   mean over seeds of the per-seed test gold (`budget_value` on prompt means)
      kl            mean over seeds of the mixture's test KL (the chord: an upper bound)
      n_seeds       seeds averaged (all of them)
      ci_low, ci_high, stderr
                    percentile interval and standard deviation of a hierarchical bootstrap:
                    seeds with replacement, then val and test prompts with replacement within
                    each drawn seed (one prompt resample per seed draw, shared by all methods and
                    the anchor), the mixture re-chosen on the resampled val means each time
      boot_reached  share of bootstrap draws in which every drawn seed reaches the budget; the
                    interval is over those draws, so a share below 1 flags a budget near the
                    edge of what the method reaches.
      kl_min        the largest over seeds of the smallest validation KL of the method's own
                    points: below it, some seed's frontier is the chord from the reference alone
      covered       kl_budget >= kl_min: the value is read between the method's own policies in
                    every seed (the verdict compares methods only at covered budgets)
    n_boot = 0 skips the bootstrap (NaN intervals).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    methods, seeds = _load(per_prompt, anchor)
    budgets = _check_budgets(budgets)
    choices = _choices(methods, seeds, budgets)
    boot = _bootstrap(seeds, budgets, n_boot, np.random.default_rng(seed)) if n_boot else None
    tail = 100 * (1 - confidence) / 2
    rows = []
    for m, method in enumerate(methods):
        for k, budget in enumerate(budgets):
            per_seed = [choices[s][m][k] for s in range(len(seeds))]
            if any(c is None for c in per_seed):
                continue
            draws = boot[:, m, k] if boot is not None else np.array([])
            draws = draws[~np.isnan(draws)]
            low, high = np.percentile(draws, [tail, 100 - tail]) if draws.size else (np.nan, np.nan)
            rows.append(dict(
                method=method, kl_budget=budget,
                gold_reward=float(np.mean([c.test_gold for c in per_seed])),
                ci_low=float(low), ci_high=float(high), n_seeds=len(per_seed),
                kl=float(np.mean([c.test_kl for c in per_seed])),
                stderr=float(draws.std(ddof=1)) if draws.size > 1 else float("nan"),
                boot_reached=draws.size / n_boot if n_boot else float("nan"),
                covered=all(c.covered for c in per_seed), kl_min=max(c.kl_min for c in per_seed),
            ))
    return pd.DataFrame(rows, columns=list(FRONTIER_COLUMNS))


def compare_at_budgets(
    per_prompt: pd.DataFrame,
    anchor: pd.DataFrame,
    method_a: Hashable,
    method_b: Hashable,
    budgets: Sequence[float],
    confidence: float = CONFIDENCE,
    covered_only: bool = True,
) -> pd.DataFrame:
    """Paired difference a - b of the test gold at each KL budget both methods cover in every seed
    (reach, and not only on the chord from the reference; ``covered_only = False``: reach).

    Columns: kl_budget, diff (mean over seeds of the per-seed a - b), stderr, ci_low, ci_high, p
    (two-sided), test (which test: `seed_paired_test`'s method string), n_seeds, and gold_a and
    gold_b, each method's test gold at the budget averaged over the seeds (diff = gold_a - gold_b).
    S >= 2 seeds: a t-test over the per-seed differences. S = 1: a normal test whose stderr is the
    paired per-prompt error: with the val choices held fixed, each method's test value is the mean
    over test prompts i of sum_p c_p gold_p,i (c the mixture weights), so it is the mean of
    d_i = (a's mixture gold on i) - (b's on i), with stderr sd(d_i)/sqrt(n).
    The p-values are per budget; adjust across a family of comparisons with
    `evaluate.holm` or `evaluate.benjamini_hochberg`.
    """
    methods, seeds = _load(per_prompt, anchor)
    for name in (method_a, method_b):
        if name not in methods:
            raise ValueError(f"unknown method {name!r}; per_prompt holds {list(_plain(methods))}")
    if method_a == method_b:
        raise ValueError(f"compare two different methods, got {method_a!r} twice")
    budgets = _check_budgets(budgets)
    choices = _choices(methods, seeds, budgets)
    ma, mb = methods.index(method_a), methods.index(method_b)
    rows = []
    for k, budget in enumerate(budgets):
        pairs = [(choices[s][ma][k], choices[s][mb][k]) for s in range(len(seeds))]
        if any(a is None or b is None or (covered_only and not (a.covered and b.covered)) for a, b in pairs):
            continue
        diffs = [a.test_gold - b.test_gold for a, b in pairs]
        within = None
        if len(pairs) == 1:
            a, b = pairs[0]
            within = mean_stderr(a.prompt_values - b.prompt_values)[1]
            if math.isnan(within):
                raise ValueError("one seed with one test prompt: no paired per-prompt error to test with")
        est, p, test = seed_paired_test(diffs, within, confidence=confidence)
        rows.append(dict(kl_budget=budget, diff=est.value, stderr=est.stderr, ci_low=est.ci_low,
                         ci_high=est.ci_high, p=p, test=test, n_seeds=len(pairs),
                         gold_a=float(np.mean([a.test_gold for a, _ in pairs])),
                         gold_b=float(np.mean([b.test_gold for _, b in pairs]))))
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


# =============================================================================================
# Best-of-n: its KL from the reference
# =============================================================================================


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1)/n: the KL of best-of-n from the reference when rewards are continuous (no
    ties), and an upper bound on it otherwise (Beirami et al. 2024, Theorem 3.1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl_estimate(scores: np.ndarray, n: int) -> np.ndarray:
    """KL(best-of-n || reference) per prompt, plugged in from a pool of reference draws.

    scores: (P, M) reward-model scores of M reference completions per prompt; equal scores are
    taken to be the same completion (identical completions score alike), so draws are grouped by
    score. With p^ the pool's empirical distribution over the groups g (ascending score),
    F(g) = p^(score <= g) and F-(g) = p^(score < g), best-of-n picks g with probability
    pi_n(g) = F(g)^n - F-(g)^n (Beirami et al. 2024, Sec. 2) and
    KL = sum_g pi_n(g) log(pi_n(g) / p^(g)). Exact for p^; with M distinct scores it stays below
    `best_of_n_kl_bound(n)` and approaches it as M grows. Returns (P,).
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must have shape (P, M) with M >= 1, got {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    s = np.sort(s, axis=1)
    m = s.shape[1]
    # a group ends where the next sorted score differs; F there is (position + 1) / M
    ends = np.ones(s.shape, dtype=bool)
    ends[:, :-1] = s[:, 1:] != s[:, :-1]
    cdf = np.broadcast_to(np.arange(1, m + 1) / m, s.shape)
    previous_end = np.concatenate([np.zeros((s.shape[0], 1)), np.where(ends, cdf, 0.0)[:, :-1]], axis=1)
    cdf_below = np.maximum.accumulate(previous_end, axis=1)  # F-(g): F at the previous group's end
    p_hat = cdf - cdf_below
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(F^n - F-^n) = n log F + log(1 - (F-/F)^n), stable for large n
        log_pi = n * np.log(cdf) + np.log(-np.expm1(n * (np.log(cdf_below) - np.log(cdf))))
        terms = np.exp(log_pi) * (log_pi - np.log(p_hat))
    return np.where(ends & np.isfinite(log_pi), terms, 0.0).sum(axis=1)
