"""Final results per cell, seed aggregates and the small statistics the headline needs.

A cell is (method, beta, seed); its final result is the evaluation at its largest step at
temperature 1.0. Frames here are wide: one row per cell, and for each evaluation metric ``m``
the columns ``m``, ``m_stderr``, ``m_ci_low``, ``m_ci_high``, ``m_n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .load import REFERENCE_METHOD, RunData, policy_rows

EVAL_METRICS = ("gold_reward", "judge_reward", "kl", "win_rate", "fluency", "proxy_reward", "length")
# What a cell's training cost up to a checkpoint (its compute/ metrics), as wide columns compute_<name>.
COMPUTE = ("steps", "samples", "tokens", "seconds", "inference_samples")
CELL = ["method", "beta", "seed"]
_STAT_COLUMNS = ("value", "stderr", "ci_low", "ci_high", "n")


def is_eval_metric(metric: pd.Series) -> pd.Series:
    return ~metric.str.startswith(("train/", "compute/", "h2h/", "rm_", "objective"))


def at_unit_temperature(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isclose(df["temperature"].to_numpy(dtype=float), 1.0)]


def eval_rows(data: RunData) -> pd.DataFrame:
    """Checkpoint evaluations of policies at temperature 1.0 (the default evaluation)."""
    m = policy_rows(data.metrics)
    m = m[is_eval_metric(m["metric"])]
    return at_unit_temperature(m)


def _widen(rows: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Long rows -> one row per ``index`` with metric columns as described in the module doc."""
    if rows.empty:
        return pd.DataFrame(columns=index)
    rows = rows.drop_duplicates(subset=index + ["metric"], keep="last")
    # Pivot on an integer key: pivot_table over index columns holding NaN (beta of sft) either
    # drops those rows or, with dropna=False, invents the cartesian product of the levels.
    key = rows.groupby(index, dropna=False, sort=True).ngroup().rename("_key")
    rows = rows.assign(_key=key)
    out = rows.groupby("_key")[index].first()
    for stat in _STAT_COLUMNS:
        wide = rows.pivot(index="_key", columns="metric", values=stat)
        suffix = "" if stat == "value" else f"_{stat}"
        wide.columns = [f"{c}{suffix}" for c in wide.columns]
        out = out.join(wide)
    return out.reset_index(drop=True)


def final_results(data: RunData) -> pd.DataFrame:
    """One row per cell at its final checkpoint, sorted with the SFT model first."""
    ev = eval_rows(data)
    if ev.empty:
        return pd.DataFrame(columns=CELL + ["step", "label", "config"])
    last = ev.groupby(CELL, dropna=False)["step"].transform("max")
    final = _widen(ev[ev["step"] == last], CELL + ["step"])
    for m in EVAL_METRICS:
        for suffix in ("", "_stderr", "_ci_low", "_ci_high", "_n"):
            if f"{m}{suffix}" not in final.columns:
                final[f"{m}{suffix}"] = np.nan
    final = _with_compute(data, final)
    multi = data.multi_seed
    final["config"] = [data.config_label(m, b) for m, b in zip(final["method"], final["beta"])]
    final["label"] = [data.cell_label(m, b, s, multi)
                      for m, b, s in zip(final["method"], final["beta"], final["seed"])]
    final["_ref"] = final["method"] != REFERENCE_METHOD
    final = final.sort_values(["_ref", "method", "beta", "seed"], na_position="first")
    return final.drop(columns="_ref").reset_index(drop=True)


def _with_compute(data: RunData, final: pd.DataFrame) -> pd.DataFrame:
    """``final`` with columns ``compute_<name>`` (:data:`COMPUTE`): each cell's compute/ metrics at
    its final checkpoint (the last ones logged at or before its step; NaN in a run that recorded none)."""
    rows = policy_rows(data.metrics)
    rows = rows[rows["metric"].str.startswith("compute/")]
    key = final[CELL + ["step"]].rename(columns={"step": "final_step"})
    merged = rows.merge(key, on=CELL, how="inner")
    merged = merged[merged["step"] <= merged["final_step"]].sort_values("step")
    last = merged.drop_duplicates(subset=CELL + ["metric"], keep="last")
    out = final.copy()
    for name in COMPUTE:
        # A merge, not a pivot: merge matches the NaN beta of the SFT cell, a pivot's index drops it.
        values = last.loc[last["metric"] == f"compute/{name}", CELL + ["value"]]
        out[f"compute_{name}"] = out[CELL].merge(values, on=CELL, how="left")["value"].to_numpy(dtype=float)
    return out


def checkpoint_results(data: RunData) -> pd.DataFrame:
    """Every checkpoint of every cell, wide (for the frontier figure)."""
    ev = eval_rows(data)
    wide = _widen(ev, CELL + ["step"])
    if wide.empty:
        return wide
    return wide.sort_values(CELL + ["step"]).reset_index(drop=True)


def config_results(final: pd.DataFrame) -> pd.DataFrame:
    """Per (method, beta): the final result averaged over seeds.

    With one seed it is that cell's numbers; with several, the mean over seeds with the
    between-seed standard error (seed variation is the uncertainty that matters then), and
    ``n`` the number of seeds, so that Welch degrees of freedom stay honest.
    """
    rows = []
    for (method, beta), g in final.groupby(["method", "beta"], dropna=False, sort=False):
        row = {"method": method, "beta": beta, "config": g["config"].iloc[0], "seeds": len(g)}
        for name in COMPUTE:  # the seeds' mean cost
            row[f"compute_{name}"] = float(g[f"compute_{name}"].mean()) if f"compute_{name}" in g else math.nan
        for m in EVAL_METRICS:
            vals = g[m].to_numpy(dtype=float)
            if len(g) == 1:
                row[m] = vals[0]
                row[f"{m}_stderr"] = g[f"{m}_stderr"].iloc[0]
                row[f"{m}_n"] = g[f"{m}_n"].iloc[0]
                row[f"{m}_ci_low"] = g[f"{m}_ci_low"].iloc[0]
                row[f"{m}_ci_high"] = g[f"{m}_ci_high"].iloc[0]
                continue
            ok = vals[~np.isnan(vals)]
            k = len(ok)
            mean = float(ok.mean()) if k else math.nan
            se = float(ok.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan
            half = float(stats.t.ppf(0.975, k - 1) * se) if k > 1 else math.nan
            row.update({m: mean, f"{m}_stderr": se, f"{m}_n": k,
                        f"{m}_ci_low": mean - half, f"{m}_ci_high": mean + half})
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Comparison:
    """Welch comparison of two means given as mean ± standard error with sample counts."""

    diff: float
    stderr: float
    t: float
    p: float

    @property
    def significant(self) -> bool:
        return self.p < 0.05


def welch(m1: float, se1: float, n1: float, m2: float, se2: float, n2: float) -> Comparison:
    """Welch's unequal-variance t test from summary statistics (m1 - m2): scipy's
    ``ttest_ind_from_stats``, each standard deviation se·√n.

    With unknown n (or n < 2) the normal approximation is used. Exact quantities (stderr 0, e.g.
    the bandit task) give p = 0 for any difference and p = 1 for none.
    """
    se1 = 0.0 if not np.isfinite(se1) else float(se1)
    se2 = 0.0 if not np.isfinite(se2) else float(se2)
    diff = float(m1 - m2)
    se = math.sqrt(se1 ** 2 + se2 ** 2)
    if se == 0.0:
        return Comparison(diff, 0.0, math.copysign(math.inf, diff) if diff else 0.0, 0.0 if diff else 1.0)
    if np.isfinite(n1) and np.isfinite(n2) and n1 >= 2 and n2 >= 2:
        test = stats.ttest_ind_from_stats(m1, se1 * math.sqrt(n1), n1, m2, se2 * math.sqrt(n2), n2, equal_var=False)
        return Comparison(diff, se, float(test.statistic), float(test.pvalue))
    t = diff / se
    return Comparison(diff, se, t, float(2 * stats.norm.sf(abs(t))))
