"""Do two versions of the code give the same results? Runs of one preset at several seeds, made by
code A and by code B, compared setting by setting.

A change that reorders float sums (a fused kernel, another matmul shape) moves a trained policy
beyond its one-run interval: training is chaotic, and a different SFT model changes everything
downstream. What must not move is the distribution over seeds. For every setting and metric (final
checkpoint, temperature 1; the reward models' held-out accuracy) this takes each side's runs as
samples and gives both means, their between-seed standard deviations and Welch's p. When both
codes draw from the same distribution, about 5% of the p-values fall below 0.05.

    python -m benchmarks.seed_ab --a RUN_DIR [RUN_DIR ...] --b RUN_DIR [RUN_DIR ...] [--name seed_ab]

A run directory is what ``dpo-bench run`` writes (``reports/<run_id>``); give each side the same
preset at the same seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .common import table, write_result

METRICS = ("gold_reward", "kl", "win_rate", "fluency")


def final_metrics(run_dir: Path) -> pd.Series:
    """(method, beta, metric) → value at each setting's last checkpoint, temperature 1; and the
    reward models' held-out accuracy at each label temperature."""
    m = pd.read_parquet(run_dir / "metrics.parquet")
    evals = m[(m["temperature"] == 1.0) & m["metric"].isin(METRICS) & (m["method"] != "optimum")]
    last = evals.groupby(["method", "beta", "metric"], dropna=False)["step"].transform("max")
    final = evals[evals["step"] == last].drop_duplicates(["method", "beta", "metric"])
    rm = m[(m["method"] == "reward_model") & (m["metric"] == "rm_accuracy")].assign(beta=lambda f: f["temperature"])
    both = pd.concat([final, rm.drop_duplicates(["beta"])])
    return both.set_index(["method", "beta", "metric"])["value"]


def compare(a: list[Path], b: list[Path]) -> pd.DataFrame:
    from scipy import stats

    side_a = pd.DataFrame({str(p): final_metrics(p) for p in a})
    side_b = pd.DataFrame({str(p): final_metrics(p) for p in b})
    rows = []
    for key in side_a.index.intersection(side_b.index):
        x, y = side_a.loc[key].to_numpy(float), side_b.loc[key].to_numpy(float)
        if np.isnan(x).any() or np.isnan(y).any() or (np.ptp(x) == 0 and np.ptp(y) == 0):
            continue  # constant by construction (the SFT model's KL, best-of-N's analytic KL)
        p = stats.ttest_ind(x, y, equal_var=False).pvalue
        rows.append({"method": key[0], "beta": key[1], "metric": key[2], "a_mean": x.mean(), "a_sd": x.std(ddof=1),
                     "b_mean": y.mean(), "b_sd": y.std(ddof=1), "p_welch": p})
    return pd.DataFrame(rows)


def best_by_run(runs: list[Path]) -> list[str]:
    """Each run's highest final gold reward: the report's headline."""
    out = []
    for run in runs:
        gold = final_metrics(run).xs("gold_reward", level="metric")
        (method, beta), value = gold.idxmax(), gold.max()
        out.append(f"{run.name}: {method} ({beta:g}) {value:.3f}" if beta == beta else f"{run.name}: {method} {value:.3f}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", type=Path, required=True, help="run directories made by code A (one per seed)")
    p.add_argument("--b", nargs="+", type=Path, required=True, help="run directories made by code B (the same seeds)")
    p.add_argument("--name", default="seed_ab", help="write benchmarks/results/<name>.json")
    args = p.parse_args(argv)
    for run in [*args.a, *args.b]:
        if not (run / "metrics.parquet").exists():
            p.error(f"{run}: no metrics.parquet (not a dpo-bench run directory?)")
    if len(args.a) < 2 or len(args.b) < 2:
        p.error("each side needs at least 2 runs (seeds) for a between-seed standard deviation")
    result = compare(args.a, args.b)
    significant = result[result["p_welch"] < 0.05]
    print(table(result.to_dict("records"), ["method", "beta", "metric", "a_mean", "a_sd", "b_mean", "b_sd", "p_welch"]))
    print(f"{len(significant)} of {len(result)} comparisons at p < 0.05 (about {0.05 * len(result):.0f} expected by chance)")
    for side, runs in (("A", args.a), ("B", args.b)):
        print(f"headline of each {side} run: " + "; ".join(best_by_run(runs)))
    path = write_result(args.name, {
        "a": [str(r) for r in args.a], "b": [str(r) for r in args.b],
        "code_versions": {str(r): json.loads((r / "run.json").read_text()).get("code_version") for r in [*args.a, *args.b]},
        "rows": result.to_dict("records"), "significant": len(significant),
        "headlines": {"a": best_by_run(args.a), "b": best_by_run(args.b)},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
