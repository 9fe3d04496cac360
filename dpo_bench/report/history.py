"""Comparing runs: each configuration's final numbers against earlier runs, with Welch tests.

Pure pandas over long metric rows, so the report (which reads ``history.parquet`` from the run
directory), ``dpo-bench history`` and ``dpo-bench compare`` share one definition of "final
result" and one definition of "changed".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import fmt
from .load import RunData, _normalise_metrics
from .results import EVAL_METRICS, config_results, final_results, welch
from .tables import Cell, Table

# What a scheduled run is compared on (the report's History section).
HISTORY_METRICS = ("gold_reward", "kl", "win_rate")
# What `dpo-bench compare` tests: every evaluation metric that carries a standard error.
COMPARE_METRICS = ("gold_reward", "kl", "win_rate", "fluency", "proxy_reward")
SUMMARY_COLUMNS = ["method", "beta", "metric", "value", "stderr", "ci_low", "ci_high", "n", "seeds"]
CONFIG = ["method", "beta"]
ALPHA = 0.05
# Exact quantities (the bandit task, stderr 0) differ across machines in the last bits; a change
# smaller than this (relative to the value's size) is not a change.
EXACT_TOLERANCE = 1e-9


def final_summary(metrics: pd.DataFrame, metrics_wanted: tuple[str, ...] = EVAL_METRICS) -> pd.DataFrame:
    """Long rows of one run -> one row per (method, beta, metric) with the final value.

    The final value is each cell's last checkpoint at temperature 1.0, averaged over seeds as in
    the report (with several seeds the standard error is the between-seed one and ``n`` the
    number of seeds).
    """
    data = RunData(run_dir=Path("."), metrics=_normalise_metrics(metrics))
    final = final_results(data)
    if final.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    configs = config_results(final)
    rows = []
    for _, r in configs.iterrows():
        for m in metrics_wanted:
            if m not in configs.columns or not fmt.finite(r[m]):
                continue
            rows.append({"method": r["method"], "beta": float(r["beta"]), "metric": m, "value": float(r[m]),
                         "stderr": _float(r.get(f"{m}_stderr")), "ci_low": _float(r.get(f"{m}_ci_low")),
                         "ci_high": _float(r.get(f"{m}_ci_high")), "n": _float(r.get(f"{m}_n")),
                         "seeds": int(r["seeds"])})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _float(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _changed(diff: float, p: float, scale: float) -> bool:
    return p < ALPHA and abs(diff) > EXACT_TOLERANCE * max(1.0, abs(scale))


def compare_summaries(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Welch test of every (method, beta, metric) the two summaries share (difference is b - a).

    Adds the Holm-adjusted p-value over all the comparisons made, so that a reader testing many
    metrics at once can see which differences survive correction.
    """
    keys = CONFIG + ["metric"]
    # NaN beta (methods without a strength) must match itself in the join.
    left = a.assign(_beta=a["beta"].fillna(-math.inf))
    right = b.assign(_beta=b["beta"].fillna(-math.inf))
    joined = left.merge(right.drop(columns="beta"), on=["method", "_beta", "metric"], suffixes=("_a", "_b"))
    rows = []
    for _, r in joined.iterrows():
        c = welch(r["value_b"], r["stderr_b"], r["n_b"], r["value_a"], r["stderr_a"], r["n_a"])
        rows.append({**{k: r[k] for k in keys},
                     "value_a": r["value_a"], "stderr_a": r["stderr_a"], "n_a": r["n_a"],
                     "value_b": r["value_b"], "stderr_b": r["stderr_b"], "n_b": r["n_b"],
                     "diff": c.diff, "diff_stderr": c.stderr, "p": c.p,
                     "significant": _changed(c.diff, c.p, max(abs(r["value_a"]), abs(r["value_b"])))})
    out = pd.DataFrame(rows, columns=keys + ["value_a", "stderr_a", "n_a", "value_b", "stderr_b", "n_b",
                                             "diff", "diff_stderr", "p", "significant"])
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float))
    order = {m: i for i, m in enumerate(COMPARE_METRICS)}
    out = out.assign(_m=out["metric"].map(order).fillna(len(order)))
    return out.sort_values(["method", "beta", "_m"], na_position="first").drop(columns="_m").reset_index(drop=True)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as ``p``)."""
    k = len(p)
    if k == 0:
        return p
    order = np.argsort(p)
    adjusted = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# --- the History section of a run's report -----------------------------------------------------


def history_comparison(history: pd.DataFrame, trend_length: int = 5) -> pd.DataFrame:
    """From ``history.parquet`` (this run's and earlier runs' final summaries), one row per
    (method, beta, metric) of this run: its value, the latest earlier run's, the Welch test of
    the change, and the trend of earlier values (oldest first).
    """
    columns = CONFIG + ["metric", "value", "stderr", "n", "previous_runs", "previous_run_id", "previous_value",
                        "previous_stderr", "diff", "diff_stderr", "p", "changed", "same_config", "trend"]
    current = history[history["current"]]
    earlier = history[~history["current"]].sort_values("started_at")
    rows = []
    for _, r in current.iterrows():
        same = earlier[(earlier["method"] == r["method"]) & (earlier["metric"] == r["metric"])
                       & _same_beta(earlier["beta"], r["beta"])]
        row = {k: r[k] for k in CONFIG + ["metric", "value", "stderr", "n"]}
        row.update(previous_runs=len(same), trend=[float(v) for v in same["value"].tail(trend_length)])
        if len(same):
            prev = same.iloc[-1]
            c = welch(r["value"], r["stderr"], r["n"], prev["value"], prev["stderr"], prev["n"])
            row.update(previous_run_id=prev["run_id"], previous_value=prev["value"], previous_stderr=prev["stderr"],
                       diff=c.diff, diff_stderr=c.stderr, p=c.p, same_config=bool(prev["same_config"]),
                       changed=_changed(c.diff, c.p, max(abs(r["value"]), abs(prev["value"]))))
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    order = {m: i for i, m in enumerate(HISTORY_METRICS)}
    out = out.assign(_m=out["metric"].map(order).fillna(len(order)))
    return out.sort_values(["method", "beta", "_m"], na_position="first").drop(columns="_m").reset_index(drop=True)


def _same_beta(betas: pd.Series, beta: float) -> pd.Series:
    if fmt.is_nan(float(beta)):
        return betas.isna()
    return np.isclose(betas.to_numpy(dtype=float), float(beta), rtol=0, atol=1e-12)


_METRIC_NAMES = {"gold_reward": "gold reward", "kl": "KL [nats]", "win_rate": "win rate vs SFT",
                 "fluency": "fluency", "proxy_reward": "proxy reward"}


def history_section(data: RunData) -> tuple[str, Table | None]:
    """The report's History section: a sentence, and the comparison table when there is one."""
    if data.history is None:
        return ("This run was not compared with earlier runs: it has no history.parquet (it predates the "
                "results store, or the store could not be reached; see Notes).", None)
    history = data.history
    for col, default in (("current", False), ("same_config", True), ("started_at", "")):
        if col not in history.columns:
            history = history.assign(**{col: default})
    preset, store = data.run.get("preset", "?"), data.run.get("results_db", "the results store")
    earlier_ids = list(dict.fromkeys(history.loc[~history["current"], "run_id"]))
    if not earlier_ids:
        return (f"No earlier completed run of preset {preset} (task {data.task}) in {store}; the next run of "
                "this preset will be compared with this one.", None)
    comparison = history_comparison(history)
    latest = history[~history["current"]].sort_values("started_at")["run_id"].iloc[-1]
    rows, changed = [], []
    for _, r in comparison.iterrows():
        label = data.config_label(r["method"], r["beta"])
        metric = _METRIC_NAMES.get(r["metric"], r["metric"])
        compared = r["previous_runs"] > 0
        verdict = "new" if not compared else ("changed ↑" if r["diff"] > 0 else "changed ↓") if r["changed"] else "same"
        if compared and r["changed"]:
            changed.append(f"{label} {metric} {fmt.signed(r['diff'])} ({fmt.pvalue(r['p'])})")
        previous = fmt.pm(r["previous_value"], r["previous_stderr"]) if compared else fmt.MISSING
        if compared and not r["same_config"]:
            previous += " (other config)"
        rows.append([
            Cell(label), Cell(metric),
            Cell(fmt.pm(r["value"], r["stderr"]), sort=_sortable(r["value"])),
            Cell(previous, sort=_sortable(r["previous_value"])),
            Cell(f"{fmt.signed(r['diff'])} ± {fmt.num(r['diff_stderr'])}" if compared else fmt.MISSING, sort=_sortable(r["diff"])),
            Cell(fmt.pvalue(r["p"]) if compared else fmt.MISSING, sort=_sortable(r["p"])),
            Cell(", ".join(fmt.num(v) for v in r["trend"]) or fmt.MISSING),
            Cell(verdict, best=verdict.startswith("changed")),
        ])
    table = Table(
        ["policy", "metric", "this run ± s.e.", "previous run ± s.e.", "change ± s.e.", "p (Welch)",
         "earlier runs (oldest first)", "verdict"], rows,
        f"Each policy's final result against the latest earlier run of preset {preset} that has it. 'changed' "
        f"means the difference's 95% interval excludes zero (Welch, p < {ALPHA}); changes in bold. 'other config' "
        "marks an earlier run whose resolved config differed from this one's.")
    summary = (f"Compared with {len(earlier_ids)} earlier run{'s' if len(earlier_ids) > 1 else ''} of preset {preset} "
               f"(task {data.task}) in {store}; the latest is {latest}. ")
    summary += (f"{len(changed)} result{'s' if len(changed) > 1 else ''} changed beyond {'their' if len(changed) > 1 else 'its'} "
                f"interval: {'; '.join(changed)}." if changed else "No result changed beyond its interval.")
    return summary, table


def _sortable(x: object) -> float | None:
    return float(x) if fmt.finite(x) else None


# --- text for the `dpo-bench history` and `dpo-bench compare` commands ---------------------------


def _text_table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(headers)]
    line = lambda cells: indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers)] + [line(r) for r in rows]


def _label(method: str, beta: float) -> str:
    return RunData(Path("."), _normalise_metrics(None)).config_label(method, beta)


def format_history(frame: pd.DataFrame, metrics_wanted: tuple[str, ...] = HISTORY_METRICS) -> str:
    """The trend of each (preset, task, method, beta): one line per run, oldest first.

    An arrow after a value marks a change from the run above beyond its interval (Welch, p < 0.05).
    """
    if frame.empty:
        return "no runs in the results store match"
    out = []
    groups = frame.groupby(["preset", "task", "method", "beta"], dropna=False, sort=True)
    for (preset, task, method, beta), g in groups:
        out.append(f"preset {preset} · task {task} · {_label(method, beta)}")
        runs = g.drop_duplicates("run_id")[["run_id", "started_at"]].sort_values(["started_at", "run_id"])
        rows, previous = [], {}
        for _, run in runs.iterrows():
            cells = [str(run["run_id"]), str(run["started_at"]).replace("T", " ")[:19]]
            for m in metrics_wanted:
                hit = g[(g["run_id"] == run["run_id"]) & (g["metric"] == m)]
                if hit.empty:
                    cells.append(fmt.MISSING)
                    continue
                r = hit.iloc[0]
                text = fmt.pm(r["value"], r["stderr"])
                if m in previous:
                    p = previous[m]
                    c = welch(r["value"], r["stderr"], r["n"], p["value"], p["stderr"], p["n"])
                    if _changed(c.diff, c.p, max(abs(r["value"]), abs(p["value"]))):
                        text += " ↑" if c.diff > 0 else " ↓"
                previous[m] = r
                cells.append(text)
            rows.append(cells)
        out += _text_table(["run id", "started (UTC)"] + [_METRIC_NAMES.get(m, m) for m in metrics_wanted], rows)
        out.append("")
    out.append("↑ / ↓: changed from the run above beyond its interval (Welch, p < 0.05).")
    return "\n".join(out)


def format_comparison(comparison: pd.DataFrame, name_a: str, name_b: str) -> str:
    """`dpo-bench compare`: every shared (policy, metric), then which differ significantly."""
    if comparison.empty:
        return f"{name_a} and {name_b} share no evaluated policy: nothing to compare"
    rows = []
    for _, r in comparison.iterrows():
        rows.append([_label(r["method"], r["beta"]), _METRIC_NAMES.get(r["metric"], r["metric"]),
                     fmt.pm(r["value_a"], r["stderr_a"]), fmt.pm(r["value_b"], r["stderr_b"]),
                     f"{fmt.signed(r['diff'])} ± {fmt.num(r['diff_stderr'])}", fmt.pvalue(r["p"]),
                     fmt.pvalue(r["p_holm"]), "*" if r["significant"] else ""])
    out = [f"A = {name_a}", f"B = {name_b}", ""]
    out += _text_table(["policy", "metric", "A ± s.e.", "B ± s.e.", "B − A ± s.e.", "p (Welch)", "p (Holm)", ""],
                       rows, indent="")
    significant = comparison[comparison["significant"]]
    k = len(comparison)
    out.append("")
    if significant.empty:
        out.append(f"No metric differs significantly (Welch, p < {ALPHA}; {k} comparisons).")
    else:
        names = [f"{_label(r['method'], r['beta'])} {_METRIC_NAMES.get(r['metric'], r['metric'])}"
                 for _, r in significant.iterrows()]
        out.append(f"{len(significant)} of {k} differ significantly (Welch, p < {ALPHA}): {'; '.join(names)}.")
        holm_ok = significant[significant["p_holm"] < ALPHA]
        out.append(f"{len(holm_ok)} of them remain significant after Holm's correction for {k} comparisons.")
    return "\n".join(out)
