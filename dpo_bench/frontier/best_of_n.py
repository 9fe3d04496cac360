"""Best-of-N's KL to the reference: the analytic bound and the exact plug-in estimate from a pool of
reference draws.
"""

from __future__ import annotations

import math

import numpy as np


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
