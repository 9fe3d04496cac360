"""Evaluation: statistics first, policy evaluation after.

Every number a report shows carries its uncertainty. The top section holds pure numpy/scipy
functions (no torch, no models): estimates with standard errors and 95% intervals, win rates,
significance and equivalence tests, KL estimates. Policy evaluation built on them lives below it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import numpy as np
from scipy import stats

__all__ = [
    "Estimate",
    "mean_stderr",
    "estimate_from_samples",
    "estimate_from_mean_stderr",
    "wilson_interval",
    "win_outcomes",
    "win_rate",
    "win_rate_test",
    "difference_test",
    "tost_equivalence",
    "sequence_kl",
    "within_prompt_spearman",
    "exact_kl",
    "holm",
    "benjamini_hochberg",
    "seed_paired_test",
]

ArrayLike = Union[np.ndarray, Sequence[float]]

# =============================================================================================
# Statistics (pure functions over numpy arrays)
# =============================================================================================

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and a confidence interval (95% by default)."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict:
        """The metrics.parquet columns value, stderr, ci_low, ci_high, n."""
        return asdict(self)


def _as_1d(x: ArrayLike, name: str = "x") -> np.ndarray:
    arr = np.asarray(x, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def mean_stderr(x: ArrayLike) -> tuple[float, float, int]:
    """(mean, stderr, n) of a sample; stderr = std(ddof=1)/sqrt(n), nan when n = 1."""
    arr = _as_1d(x)
    n = arr.size
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, stderr, n


def estimate_from_mean_stderr(
    value: float, stderr: float, n: int, df: float | None = None, confidence: float = CONFIDENCE
) -> Estimate:
    """Estimate with the interval value +- q * stderr; q is Student-t with `df` degrees of freedom
    (default n - 1), or normal when df is inf. A nan stderr gives a nan interval."""
    if df is None:
        df = n - 1
    if not math.isfinite(stderr) or df <= 0:
        return Estimate(float(value), float(stderr), float("nan"), float("nan"), int(n))
    q = float(stats.t.ppf(0.5 + confidence / 2, df)) if math.isfinite(df) else float(stats.norm.ppf(0.5 + confidence / 2))
    return Estimate(float(value), float(stderr), float(value - q * stderr), float(value + q * stderr), int(n))


def estimate_from_samples(x: ArrayLike, confidence: float = CONFIDENCE) -> Estimate:
    """Sample mean with its stderr and a Student-t interval (df = n - 1)."""
    mean, stderr, n = mean_stderr(x)
    return estimate_from_mean_stderr(mean, stderr, n, confidence=confidence)


def wilson_interval(p_hat: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion p_hat observed over n trials (Wilson 1927)."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    denom = 1.0 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p_hat * (1.0 - p_hat) / n + z * z / (4 * n * n), 0.0)) / denom
    # at p_hat = 0 or 1 one bound equals p_hat exactly in real arithmetic; keep it so in floats
    return max(0.0, min(centre - half, p_hat)), min(1.0, max(centre + half, p_hat))


def win_outcomes(scores_a: ArrayLike, scores_b: ArrayLike) -> np.ndarray:
    """Per-prompt outcome of a against b: 1 if a > b, 0.5 on a tie, 0 otherwise. (n,) -> (n,)."""
    a = _as_1d(scores_a, "scores_a")
    b = _as_1d(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must be paired (same length), got {a.size} and {b.size}")
    return (a > b) + 0.5 * (a == b)


def win_rate(scores_a: ArrayLike, scores_b: ArrayLike, confidence: float = CONFIDENCE) -> Estimate:
    """Paired win rate of a over b (ties count 1/2) with a 95% Wilson score interval.

    scores_a, scores_b: (n,) gold scores of the two completions for the same n prompts.
    value: mean outcome; stderr: sample std of the outcomes / sqrt(n).
    Interval: Wilson score interval on the outcome mean with n trials. Why Wilson: it stays inside
    [0, 1] and keeps a sensible width at win rates of 0 or 1, where a t-interval collapses to a
    point. With ties the outcomes lie in [0, 1] with mean p, so their variance is at most
    p(1 - p), the Bernoulli variance Wilson assumes: the interval is then conservative, never
    too narrow.
    """
    outcomes = win_outcomes(scores_a, scores_b)
    value, stderr, n = mean_stderr(outcomes)
    if n > 1 and np.all(outcomes == outcomes[0]):
        stderr = 0.0  # exact zero rather than float noise
    low, high = wilson_interval(value, n, confidence)
    return Estimate(value, stderr, low, high, n)


def win_rate_test(scores_a: ArrayLike, scores_b: ArrayLike) -> float:
    """Two-sided sign test that the win rate differs from 1/2: exact binomial test on the
    non-tied pairs (ties carry no sign). 1.0 when every pair is tied."""
    a = _as_1d(scores_a, "scores_a")
    b = _as_1d(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must be paired (same length), got {a.size} and {b.size}")
    wins = int(np.sum(a > b))
    losses = int(np.sum(a < b))
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def _unpaired_stderr(x: np.ndarray, y: np.ndarray) -> float:
    """The standard error of mean(x) − mean(y) for independent samples (Welch's)."""
    if x.size < 2 or y.size < 2:
        raise ValueError("Welch's test needs at least 2 observations in each sample")
    return math.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)


def _two_sided_p(diff: float, se: float, df: float) -> float:
    if se == 0.0:
        # no sampling noise at all: the difference is either exactly zero or certain
        return 1.0 if diff == 0.0 else 0.0
    return float(2.0 * stats.t.sf(abs(diff) / se, df))


def difference_test(
    x: ArrayLike, y: ArrayLike, paired: bool, confidence: float = CONFIDENCE
) -> tuple[Estimate, float]:
    """Difference of means mean(x) - mean(y) with a t-interval and a two-sided p-value.

    paired=True: paired t-test on d = x - y (same prompts / seeds), n = len(d), df = n - 1.
    paired=False: Welch's unequal-variance t-test (scipy's), n = len(x) + len(y).
    """
    xa = _as_1d(x, "x")
    ya = _as_1d(y, "y")
    if paired:
        if xa.shape != ya.shape:
            raise ValueError(f"paired samples must have the same length, got {xa.size} and {ya.size}")
        if xa.size < 2:
            raise ValueError("a paired t-test needs at least 2 pairs")
        diff, se, n = mean_stderr(xa - ya)
        est = Estimate(diff, 0.0, diff, diff, n) if se == 0.0 else estimate_from_mean_stderr(diff, se, n, df=n - 1, confidence=confidence)
        return est, _two_sided_p(diff, se, n - 1)
    diff, se, n = float(xa.mean() - ya.mean()), _unpaired_stderr(xa, ya), xa.size + ya.size
    if se == 0.0:
        return Estimate(diff, 0.0, diff, diff, n), _two_sided_p(diff, se, 0.0)
    welch = stats.ttest_ind(xa, ya, equal_var=False)
    ci = welch.confidence_interval(confidence)
    return Estimate(diff, se, float(ci.low), float(ci.high), n), float(welch.pvalue)


def tost_equivalence(x: ArrayLike, y: ArrayLike, margin: float, paired: bool = False) -> float:
    """Two one-sided t-tests (Schuirmann 1987) of H0: |mean(x) - mean(y)| >= margin.

    Returns the TOST p-value max(p_lower, p_upper); p < 0.05 means the means are shown equivalent
    within +-margin at the 5% level (the 90% interval of the difference lies inside the margin).
    paired=False: Welch's tests (scipy's), for independent samples. paired=True: one-sample tests on
    d = x - y (df = n - 1), for samples matched item by item, such as two policies evaluated on
    the same prompts with the same random numbers: their shared noise cancels in d.
    """
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin}")
    xa, ya = _as_1d(x, "x"), _as_1d(y, "y")
    if paired:
        if xa.shape != ya.shape:
            raise ValueError(f"paired samples must have the same length, got {xa.size} and {ya.size}")
        if xa.size < 2:
            raise ValueError("a paired test needs at least 2 pairs")
        diff, se, _ = mean_stderr(xa - ya)
        if se == 0.0:
            return 0.0 if abs(diff) < margin else 1.0
        d = xa - ya
        p_lower = stats.ttest_1samp(d + margin, 0.0, alternative="greater").pvalue  # H0: diff <= -margin
        p_upper = stats.ttest_1samp(d - margin, 0.0, alternative="less").pvalue  # H0: diff >= +margin
        return float(max(p_lower, p_upper))
    diff, se = float(xa.mean() - ya.mean()), _unpaired_stderr(xa, ya)
    if se == 0.0:
        return 0.0 if abs(diff) < margin else 1.0
    p_lower = stats.ttest_ind(xa + margin, ya, equal_var=False, alternative="greater").pvalue
    p_upper = stats.ttest_ind(xa - margin, ya, equal_var=False, alternative="less").pvalue
    return float(max(p_lower, p_upper))


def sequence_kl(policy_logps: ArrayLike, ref_logps: ArrayLike, confidence: float = CONFIDENCE) -> Estimate:
    """Sequence-level KL(pi || pi_ref) from completions y ~ pi(.|x).

    policy_logps, ref_logps: (n,) log pi(y|x) and log pi_ref(y|x) summed over completion tokens,
    for samples drawn from the policy. KL = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], so the mean
    of the per-sample log-ratios is unbiased; single terms can be negative, the mean estimates a
    non-negative quantity. Returned with its stderr and a t-interval.
    """
    p = _as_1d(policy_logps, "policy_logps")
    r = _as_1d(ref_logps, "ref_logps")
    if p.shape != r.shape:
        raise ValueError(f"policy_logps and ref_logps must have the same length, got {p.size} and {r.size}")
    return estimate_from_samples(p - r, confidence=confidence)


def _snap(v: np.ndarray, scale: float, rel: float = 1e-9) -> np.ndarray:
    """Round v to a grid of spacing rel * scale."""
    if scale == 0.0 or not math.isfinite(scale):
        return v
    step = rel * scale
    return np.round(v / step) * step


def within_prompt_spearman(prompt_ids: ArrayLike, x: ArrayLike, y: ArrayLike) -> float:
    """Spearman correlation of x and y within prompts.

    prompt_ids, x, y: (n,). Both x and y have their per-prompt mean removed first, so any
    function of the prompt alone (an f(x) shift, which the DPO reward-equivalence class ignores)
    cannot create or hide correlation. Prompts with a single response carry no within-prompt
    information and are dropped. nan when fewer than 2 responses remain or one side is constant.
    """
    ids = np.asarray(prompt_ids).ravel()
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if not (ids.size == xa.size == ya.size):
        raise ValueError(f"prompt_ids, x and y must have the same length, got {ids.size}, {xa.size}, {ya.size}")
    _, group, counts = np.unique(ids, return_inverse=True, return_counts=True)
    keep = counts[group] > 1
    group, xa, ya = group[keep], xa[keep], ya[keep]
    if xa.size < 2:
        return float("nan")
    counts_kept = np.bincount(group).astype(float)
    counts_kept[counts_kept == 0] = 1.0  # groups dropped above; never indexed
    x_res = xa - (np.bincount(group, weights=xa) / counts_kept)[group]
    y_res = ya - (np.bincount(group, weights=ya) / counts_kept)[group]
    # residuals that differ only by float rounding (relative to the data's scale) must tie,
    # not be ranked by noise that an f(x) shift would change
    x_res = _snap(x_res, np.abs(xa).max())
    y_res = _snap(y_res, np.abs(ya).max())
    if np.all(x_res == x_res[0]) or np.all(y_res == y_res[0]):
        return float("nan")
    return float(stats.spearmanr(x_res, y_res).statistic)


def exact_kl(p: ArrayLike, q: ArrayLike) -> Union[np.ndarray, float]:
    """Exact KL(p || q) = sum_v p_v log(p_v / q_v) per row, with 0 log 0 = 0 and +inf where
    q_v = 0 < p_v. p, q: (n, V) -> (n,), or (V,) -> float. Rows must be distributions."""
    pa = np.asarray(p, dtype=float)
    qa = np.asarray(q, dtype=float)
    if pa.shape != qa.shape or pa.ndim not in (1, 2):
        raise ValueError(f"p and q must share shape (V,) or (n, V), got {pa.shape} and {qa.shape}")
    if (pa < 0).any() or (qa < 0).any():
        raise ValueError("probabilities must be >= 0")
    for name, arr in (("p", pa), ("q", qa)):
        if not np.allclose(arr.sum(axis=-1), 1.0, atol=1e-6):
            raise ValueError(f"rows of {name} must sum to 1")
    support = pa > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(support, pa * (np.log(np.where(support, pa, 1.0)) - np.log(qa)), 0.0)
    # where q = 0 < p the term above is +inf already (log 0 = -inf); make it explicit
    terms = np.where(support & (qa == 0), np.inf, terms)
    kl = terms.sum(axis=-1)
    return float(kl) if pa.ndim == 1 else kl


def _checked_pvalues(pvalues: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(p as a float array of the input's shape, mask of its non-NaN entries); p in [0, 1]."""
    p = np.array(pvalues, dtype=float)
    present = ~np.isnan(p)
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise ValueError("p-values must lie in [0, 1] (NaN marks a missing test)")
    return p, present


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (Holm 1979). Shape in = shape out.

    With the m non-NaN p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value is
    p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)): rejecting where p~ <= alpha controls the
    family-wise error rate at alpha under any dependence. The running max keeps the adjusted values
    in the order of the raw ones. NaN entries (tests not run) are passed through and not counted
    in m. Tied p-values get equal adjusted values, so the result does not depend on input order.
    """
    p, present = _checked_pvalues(pvalues)
    finite = p[present]
    order = np.argsort(finite, kind="stable")
    m = finite.size
    factors = m - np.arange(m)  # m, m - 1, ..., 1
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(factors * finite[order]))
    p[present] = adjusted
    return p


def benjamini_hochberg(pvalues: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (Benjamini & Hochberg 1995). Shape in = out.

    With the m non-NaN p-values sorted ascending, p~_(i) = min(1, min_{j >= i} m p_(j) / j):
    rejecting where p~ <= q controls the false discovery rate at q for independent or positively
    dependent tests. NaN entries are passed through and not counted in m. The arithmetic is
    scipy's `false_discovery_control`; this adds the NaN passthrough.
    """
    p, present = _checked_pvalues(pvalues)
    if present.any():
        p[present] = stats.false_discovery_control(p[present], method="bh")
    return p


ONE_SEED = "one seed: evaluation error only"


def seed_paired_test(
    per_seed_diffs: ArrayLike, within_seed_stderr: float | None = None, confidence: float = CONFIDENCE
) -> tuple[Estimate, float, str]:
    """Between-seed test of a paired difference: (estimate with interval, two-sided p, method).

    per_seed_diffs: (S,) the difference a - b measured in each training seed, both methods
    evaluated on the same prompts within a seed.
    S >= 2: one-sample t-test of mean(d) = 0 over the seeds, df = S - 1, n = S. Each d_s carries
    its own prompt-level evaluation noise on top of the training (seed) noise, so the spread of
    the d_s already folds the evaluation noise in: within_seed_stderr is ignored, adding it
    would count that noise twice.
    S == 1: there is no seed spread to measure. The test is a normal test of d / se with
    se = within_seed_stderr, the per-prompt paired stderr sd(d_i)/sqrt(n_prompts) (required); it
    speaks only to evaluation noise, never to whether another training seed would agree, and the
    method string says so.
    """
    d = _as_1d(per_seed_diffs, "per_seed_diffs")
    if not np.isfinite(d).all():
        raise ValueError("per_seed_diffs must be finite")
    if d.size >= 2:
        est, p = difference_test(d, np.zeros_like(d), paired=True, confidence=confidence)
        return est, p, f"paired t over {d.size} seeds"
    if within_seed_stderr is None or not (math.isfinite(within_seed_stderr) and within_seed_stderr >= 0):
        raise ValueError(
            f"one seed needs a finite within_seed_stderr >= 0 (the per-prompt paired stderr), got {within_seed_stderr}"
        )
    diff, se = float(d[0]), float(within_seed_stderr)
    if se == 0.0:
        return Estimate(diff, 0.0, diff, diff, 1), (1.0 if diff == 0.0 else 0.0), ONE_SEED
    est = estimate_from_mean_stderr(diff, se, 1, df=math.inf, confidence=confidence)
    return est, float(2.0 * stats.norm.sf(abs(diff) / se)), ONE_SEED


# =============================================================================================
# Policy evaluation
# =============================================================================================
