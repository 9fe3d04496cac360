"""Bradley-Terry and Plackett-Luce: preference probabilities, likelihoods, losses and sampling.

Losses are torch functions (they are trained through); label sampling is numpy (it builds
datasets from gold rewards and must be reproducible from a `numpy.random.Generator`).

Bradley-Terry (Bradley & Terry 1952; DPO paper Eq. 1):
    P(a > b) = sigma(r_a - r_b)
Plackett-Luce (Plackett 1975, Luce 1959; DPO paper Eq. 18) for a ranking tau of K items:
    P(tau) = prod_k exp(r_tau(k)) / sum_{j >= k} exp(r_tau(j))
With K = 2 Plackett-Luce is Bradley-Terry.

A label temperature T scales rewards to r / T: T -> 0 gives deterministic preferences by the gold
reward (the DPO paper's IMDb setting), larger T gives noisier labels.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit

ArrayLike = Union[np.ndarray, torch.Tensor, float]

__all__ = [
    "bt_probability",
    "bt_loss",
    "pl_log_likelihood",
    "pl_loss",
    "sample_bt_labels",
    "sample_pl_rankings",
    "bayes_ceiling",
    "pairwise_accuracy",
]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return temperature


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def bt_probability(r_a: ArrayLike, r_b: ArrayLike, temperature: float = 1.0) -> ArrayLike:
    """Bradley-Terry probability that a is preferred to b: sigma((r_a - r_b) / T).

    r_a, r_b: same (broadcastable) shape, numpy arrays or torch tensors; the result has the
    type of the inputs (torch if either is a tensor). T = 0 is the deterministic limit:
    1 where r_a > r_b, 0 where r_a < r_b, 0.5 on ties.
    """
    temperature = _check_temperature(temperature)
    if isinstance(r_a, torch.Tensor) or isinstance(r_b, torch.Tensor):
        delta = torch.as_tensor(r_a) - torch.as_tensor(r_b)
        if not delta.is_floating_point():
            delta = delta.double()
        if temperature == 0.0:
            return (delta > 0).to(delta.dtype) + 0.5 * (delta == 0).to(delta.dtype)
        return torch.sigmoid(delta / temperature)
    delta = np.asarray(r_a, dtype=float) - np.asarray(r_b, dtype=float)
    if temperature == 0.0:
        return (delta > 0).astype(float) + 0.5 * (delta == 0)
    return expit(delta / temperature)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of "chosen beats rejected", per pair.

    r_chosen, r_rejected: (B,) rewards. Returns (B,): -log sigma(r_chosen - r_rejected), the
    logistic NLL of the reward model (DPO paper Eq. 2). logsigmoid keeps it finite for large
    negative margins, where log(sigmoid(.)) would underflow to -inf.
    """
    return -F.logsigmoid(r_chosen - r_rejected)


def pl_log_likelihood(rewards: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce log-probability of the ranking 1 > 2 > ... > K, per row.

    rewards: (B, K), columns ordered best first. Returns (B,):
        sum_k [ r_k - log sum_{j >= k} exp(r_j) ]     (DPO paper Eq. 18 with r in place of beta*log-ratio)
    The suffix log-sum-exp is a reversed logcumsumexp, so the whole thing is O(K) and stable.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, K), got {tuple(rewards.shape)}")
    suffix_lse = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)
    return (rewards - suffix_lse).sum(dim=-1)


def pl_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood, (B, K) best first -> (B,). Equals bt_loss at K = 2."""
    return -pl_log_likelihood(rewards)


def sample_bt_labels(
    rng: np.random.Generator, r_a: ArrayLike, r_b: ArrayLike, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw Bradley-Terry preference labels from gold rewards.

    r_a, r_b: (n,) gold rewards. Returns (a_preferred, tie), both bool (n,).
    T = 0: a_preferred = r_a > r_b, deterministic; pairs with r_a == r_b are flagged in `tie`
    (and have a_preferred False) so the caller can drop them.
    T > 0: a_preferred ~ Bernoulli(sigma((r_a - r_b) / T)); `tie` is all False because the
    sampled label is a proper draw even when the rewards are equal.
    """
    temperature = _check_temperature(temperature)
    r_a = np.asarray(_to_numpy(r_a), dtype=float)
    r_b = np.asarray(_to_numpy(r_b), dtype=float)
    delta = r_a - r_b
    if temperature == 0.0:
        return delta > 0, delta == 0
    a_preferred = rng.random(delta.shape) < expit(delta / temperature)
    return a_preferred, np.zeros(delta.shape, dtype=bool)


def sample_pl_rankings(
    rng: np.random.Generator, rewards: ArrayLike, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw Plackett-Luce rankings of K responses per prompt.

    rewards: (n, K) gold rewards. Returns (rankings, tied):
      rankings: int (n, K), column indices best first;
      tied: bool (n,), rows whose ranking is arbitrary (only at T = 0: rows with tied rewards).
    T > 0 uses the Gumbel-max trick: argsort of r / T + Gumbel noise, descending, is an exact
    Plackett-Luce sample (Yellott 1977). T = 0 sorts rewards descending, ties broken by index.
    """
    temperature = _check_temperature(temperature)
    rewards = np.asarray(_to_numpy(rewards), dtype=float)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (n, K), got {rewards.shape}")
    if temperature == 0.0:
        # stable sort of -r keeps the lower index first among equal rewards
        rankings = np.argsort(-rewards, axis=1, kind="stable")
        sorted_r = np.take_along_axis(rewards, rankings, axis=1)
        tied = (np.diff(sorted_r, axis=1) == 0).any(axis=1)
        return rankings, tied
    perturbed = rewards / temperature + rng.gumbel(size=rewards.shape)
    rankings = np.argsort(-perturbed, axis=1, kind="stable")
    return rankings, np.zeros(rewards.shape[0], dtype=bool)


def bayes_ceiling(r_a: ArrayLike, r_b: ArrayLike, temperature: float) -> float:
    """Best accuracy any predictor can reach on labels drawn by sample_bt_labels.

    r_a, r_b: (n,) gold rewards. With p = sigma(delta / T) the Bayes predictor says "a" when
    p > 1/2 and is right with probability max(p, 1 - p) = sigma(|delta| / T); the ceiling is its
    mean over pairs. At T = 0 labels are deterministic and tied pairs are dropped, so the
    ceiling is 1 (nan if every pair is tied: there is nothing to predict).
    """
    temperature = _check_temperature(temperature)
    delta = np.asarray(_to_numpy(r_a), dtype=float) - np.asarray(_to_numpy(r_b), dtype=float)
    if delta.size == 0:
        raise ValueError("bayes_ceiling needs at least one pair")
    if temperature == 0.0:
        return 1.0 if np.any(delta != 0) else float("nan")
    return float(np.mean(expit(np.abs(delta) / temperature)))


def pairwise_accuracy(score_chosen: ArrayLike, score_rejected: ArrayLike) -> float:
    """Share of pairs where the chosen response scores higher; ties count 1/2.

    score_chosen, score_rejected: (n,) scores (numpy or torch).
    """
    c = np.asarray(_to_numpy(score_chosen), dtype=float)
    r = np.asarray(_to_numpy(score_rejected), dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"shapes differ: {c.shape} vs {r.shape}")
    if c.size == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    return float(np.mean((c > r) + 0.5 * (c == r)))
