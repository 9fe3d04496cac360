"""The per-prompt layer: each seed's value at each budget from per-prompt rows, the frontier table with
a hierarchical bootstrap over seeds and prompts, and paired comparisons of two methods at the
budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import pandas as pd

from ..evaluate import CONFIDENCE, mean_stderr, seed_paired_test

from .envelope import ANCHOR, ANCHOR_POINT, _best_mixtures, _check_budget, budget_value

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


