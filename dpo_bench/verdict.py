"""The verdict: each method's reward-KL frontier across seeds, and RLHF against the DPO family at
fixed KL budgets.

Inputs are the cells' per-prompt results (``per_prompt.parquet``: every checkpoint's gold reward
and KL on the validation and test prompts). A method's points are its (strength, checkpoint)
pairs; its frontier is their upper envelope with the reference at KL 0 (``frontier/``), chosen
on validation prompts and read on test prompts. Conclusions are drawn between seeds, paired on the
prompts within a seed, and corrected for the number of claims (Holm by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from reward.normalise import Normaliser

from .configs import ConfigError, field, positive
from .evaluate import benjamini_hochberg, estimate_from_samples, holm
from .frontier import compare_at_budgets, frontier_table

COMPARISON_COLUMNS = ["method_a", "method_b", "kl_budget", "diff", "ci_low", "ci_high", "p", "p_adjusted", "correction",
                      "test", "n_seeds", "gold_a", "gold_b"]


@dataclass(frozen=True)
class VerdictConfig:
    """How the frontier is read and what the headline's verdict compares."""

    kl_budgets: tuple[float, ...] = field((0.25, 0.5, 1.0, 2.0, 4.0), "KL budgets (nats) at which every frontier is read")
    rlhf: str = field("ppo", "the grid entry (name) that stands for RLHF in the verdict")
    correction: Literal["holm", "bh"] = field("holm", "multiplicity correction across the verdict's claims: Holm "
                                                       "(family-wise error) or Benjamini-Hochberg (false discovery rate)")
    n_bootstrap: int = field(1000, "bootstrap draws (over seeds, then prompts) for the frontier's intervals")

    def __post_init__(self) -> None:
        if not self.kl_budgets or any(not np.isfinite(b) or b <= 0 for b in self.kl_budgets):
            raise ConfigError(f"kl_budgets must be positive numbers, got {list(self.kl_budgets)}")
        if list(self.kl_budgets) != sorted(set(self.kl_budgets)):
            raise ConfigError(f"kl_budgets must be increasing and distinct, got {list(self.kl_budgets)}")
        positive("n_bootstrap", self.n_bootstrap)


def collect_per_prompt(paths: list[Path]) -> pd.DataFrame:
    """The cells' ``per_prompt.parquet`` (or ``pool.parquet``) files, stacked (cells that wrote none are skipped)."""
    frames = [pd.read_parquet(p) for p in paths if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def frontier_inputs(per_prompt: pd.DataFrame, reference: str = "sft") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, anchor) in the form ``frontier.frontier_table`` reads.

    points: ``method, seed, point, split, prompt, gold, kl``, one row per prompt of every checkpoint of
    every strength (``point`` names the strength and step); anchor: the reference's ``seed, split,
    prompt, gold``. Rows with a non-finite KL (a policy that cannot give one) are left out.
    """
    frame = per_prompt.rename(columns={"reward": "gold", "prompt_index": "prompt"})
    if not (frame["split"] == "val").any():
        # A task without validation prompts: settings are chosen on the test prompts themselves.
        frame = pd.concat([frame, frame[frame["split"] == "test"].assign(split="val")], ignore_index=True)
    is_ref = frame["method"] == reference
    anchor = frame.loc[is_ref, ["seed", "split", "prompt", "gold"]].reset_index(drop=True)
    points = frame[~is_ref & np.isfinite(frame["kl"].astype(float))].copy()
    points["point"] = points["beta"].map(lambda b: "" if pd.isna(b) else f"{b:g}") + "@" + points["step"].astype(str)
    return points[["method", "seed", "point", "split", "prompt", "gold", "kl"]].reset_index(drop=True), anchor


def verdict_comparisons(points: pd.DataFrame, anchor: pd.DataFrame, roles: dict[str, str], config: VerdictConfig) -> pd.DataFrame:
    """RLHF against every method of the DPO family (role "direct") at each budget both reach in every
    seed: paired difference of test gold reward (a − b), its interval and p-value over seeds, and the
    p-value adjusted across all these claims."""
    methods = set(points["method"])
    if config.rlhf not in methods:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    rows = []
    for other in sorted(m for m in methods if roles.get(m) == "direct"):
        table = compare_at_budgets(points, anchor, config.rlhf, other, list(config.kl_budgets))
        rows += [{"method_a": config.rlhf, "method_b": other, **r} for r in table.to_dict("records")]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    adjust = holm if config.correction == "holm" else benjamini_hochberg
    out["p_adjusted"] = adjust(out["p"].to_numpy(dtype=float))
    out["correction"] = config.correction
    return out.reindex(columns=COMPARISON_COLUMNS + [c for c in out.columns if c not in COMPARISON_COLUMNS])


@dataclass(frozen=True)
class Objective:
    """What an RLHF cell maximises, per prompt: s(r̂) − eos_penalty·[truncated] − kl_coef·KL.

    r̂ is the learned reward model's score normalised on SFT samples (the per-prompt
    ``proxy_reward``); s(r̂) is r̂ itself when PPO read normalised scores, else the raw score
    r̂·std + mean (``raw``: the normaliser it was fitted with). ``eos_penalty`` is PPO's
    ``missing_eos_penalty``, taken from a completion cut at the length cap without EOS.
    ``adaptive``: ``kl_coef`` is the adaptive KL controller's final value (``target_kl`` > 0),
    not the config's.
    """

    kl_coef: float
    eos_penalty: float = 0.0
    adaptive: bool = False
    raw: Normaliser | None = None

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        """s(r̂) − p·truncated of each row of a frame with ``proxy_reward`` (and ``truncated``)."""
        score = frame["proxy_reward"].to_numpy(dtype=float)
        if self.raw is not None:
            score = score * self.raw.std + self.raw.mean
        truncated = frame["truncated"].to_numpy(dtype=float) if "truncated" in frame else np.zeros(len(frame))
        return score - self.eos_penalty * truncated

    def values(self, frame: pd.DataFrame) -> np.ndarray:
        """The objective of each row of a per-prompt frame (``proxy_reward``, ``truncated``, ``kl``)."""
        return self.scores(frame) - self.kl_coef * frame["kl"].fillna(0.0).to_numpy(dtype=float)

    def optimum(self, pool: pd.DataFrame) -> np.ndarray:
        """Per prompt, the regularised optimum's objective estimated from a pool of reference draws
        (``prompt_index``, ``proxy_reward``, ``truncated``, one row per draw): the optimum
        π* = π_ref·exp(s/c)/Z scores c·log E_{y~π_ref} exp(s(y)/c), and the pool's mean stands in for
        the expectation: the optimum's value with the pool's empirical distribution in place of π_ref. By
        Jensen's inequality it is low on average, by less as the pool grows (its standard error over
        prompts does not include that bias). c = 0: the pool's best score. In prompt_index order."""
        scores = pool.assign(_s=self.scores(pool)).pivot(index="prompt_index", columns="draw", values="_s").to_numpy()
        return pool_optimum_values(scores, self.kl_coef)


def pool_optimum_values(scores: np.ndarray, c: float) -> np.ndarray:
    """c·log mean_j exp(s_j/c) for each row of scores (P, n): the regularised optimum's objective on
    a pool of n reference draws a prompt (:meth:`Objective.optimum`); c = 0: the row's best score."""
    if c <= 0:
        return scores.max(axis=1)
    return c * (logsumexp(scores / c, axis=1) - np.log(scores.shape[1]))


#: The metrics that say which objective a cell was checked on: its c (the config's kl_coef, or the
#: adaptive controller's final one) and its EOS penalty.
OBJECTIVE_KL_COEF, OBJECTIVE_KL_COEF_ADAPTIVE, OBJECTIVE_EOS_PENALTY = (
    "objective_kl_coef", "objective_kl_coef_adaptive", "objective_eos_penalty")


def objective_rows(per_prompt: pd.DataFrame, roles: dict[str, str], objectives: dict[tuple[str, float, int], Objective] | None = None,
                   reference: str = "sft", pools: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each RLHF cell checked on its own objective E[s(r̂) − p·truncated] − c·KL (:class:`Objective`:
    ``objectives[(method, beta, seed)]``; without one, E[r̂] − c·KL with c the cell's ``beta``), on
    the test prompts at its final checkpoint, beside the SFT model's and every best-of-N's on the
    same objective (best-of-N with its estimated KL). The regularised optimum scores at least as high
    as any policy, so a cell below a best-of-N from the reference has not converged.

    ``pools``: the best-of-N cells' pools of reference draws (:func:`dpo_bench.stages.pool_frame`, with
    ``seed``), from which the optimum's objective is estimated (:meth:`Objective.optimum`) on the
    same test prompts.

    Rows in the metrics' columns on the cell's keys: ``objective`` (the cell's), ``objective/sft``,
    ``objective/<best-of-N cell>`` and, with a pool, ``objective/optimum (pool of M)``, with standard
    errors over prompts; and the objective's c
    (``objective_kl_coef``, or ``objective_kl_coef_adaptive`` when it is the adaptive controller's
    final kl_coef) and p (``objective_eos_penalty``).
    """
    columns = ["method", "beta", "seed", "step", "temperature", "metric", "value", "stderr", "ci_low", "ci_high", "n"]
    test = per_prompt[per_prompt["split"] == "test"] if not per_prompt.empty else per_prompt
    rows = []
    for (method, beta, seed), cell in test.groupby(["method", "beta", "seed"]):
        objective = (objectives or {}).get((method, beta, seed))
        if objective is None and roles.get(method) != "rlhf":
            continue
        objective = objective or Objective(float(beta))
        final = cell[cell["step"] == cell["step"].max()]
        step = int(final["step"].iloc[0])
        same_seed = test[test["seed"] == seed]
        others = {"objective": final}
        others[f"objective/{reference}"] = same_seed[same_seed["method"] == reference]
        for (other, n), g in same_seed[same_seed["method"].map(roles.get) == "inference"].groupby(["method", "beta"]):
            others[f"objective/{other} (N={n:g})"] = g[g["step"] == g["step"].max()]
        estimates = {metric: objective.values(g) for metric, g in others.items()}
        pool = _test_pool(pools, seed)
        if pool is not None:
            estimates[f"objective/optimum (pool of {pool['draw'].nunique()})"] = objective.optimum(pool)
        for metric, values in estimates.items():
            if not len(values) or not np.isfinite(values).all():
                continue
            est = estimate_from_samples(values)
            rows.append({"method": method, "beta": beta, "seed": seed, "step": step, "temperature": 1.0,
                         "metric": metric, "value": est.value, "stderr": est.stderr, "ci_low": est.ci_low,
                         "ci_high": est.ci_high, "n": est.n})
        for metric, value in ((OBJECTIVE_KL_COEF_ADAPTIVE if objective.adaptive else OBJECTIVE_KL_COEF, objective.kl_coef),
                              (OBJECTIVE_EOS_PENALTY, objective.eos_penalty)):
            rows.append({"method": method, "beta": beta, "seed": seed, "step": step, "temperature": 1.0, "metric": metric,
                         "value": value, "stderr": 0.0, "ci_low": value, "ci_high": value, "n": 1})
    return pd.DataFrame(rows, columns=columns)


def _test_pool(pools: pd.DataFrame | None, seed: int) -> pd.DataFrame | None:
    """One seed's pool of reference draws on the test prompts, or None. The best-of-N cells of a run
    share their draws (draw r depends on the seed and r alone), so smaller pools are prefixes of
    larger ones and their union is the largest."""
    if pools is None or pools.empty:
        return None
    pool = pools[(pools["seed"] == seed) & (pools["split"] == "test")]
    if pool.empty:
        return None
    return pool.drop_duplicates(["prompt_index", "draw"])


def verdict_frames(per_prompt: pd.DataFrame, roles: dict[str, str], config: VerdictConfig,
                   reference: str = "sft") -> dict[str, pd.DataFrame]:
    """The run's ``frontier`` and ``comparisons`` tables (empty without the reference's cell, the
    frontier's anchor)."""
    if per_prompt.empty or not (per_prompt["method"] == reference).any():
        return {}
    points, anchor = frontier_inputs(per_prompt, reference)
    frontier = frontier_table(points, anchor, list(config.kl_budgets), n_boot=config.n_bootstrap, seed=0)
    frontier["role"] = frontier["method"].map(lambda m: roles.get(m, "direct"))
    frontier["chosen_on"] = "val" if (per_prompt["split"] == "val").any() else "test"
    return {"frontier": frontier, "comparisons": verdict_comparisons(points, anchor, roles, config)}
