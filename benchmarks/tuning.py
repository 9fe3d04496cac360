"""Which optimiser setting of a method solves its own problem best? Reads a tuning run
(``benchmarks/configs/tune_*.toml``) and ranks its settings on the validation prompts.

Every method of the comparison solves the same KL-regularised problem, max E[r] − c·KL, and a
setting of its optimiser (learning rate, batch, length) is better when it reaches a higher value of
it. PPO reads r as the reward model standardised on SFT samples, so its objective is
E[r̂] − p·P(truncated) − c·KL (p its missing-EOS penalty). DPO at β solves the problem for the
Bradley-Terry reward it fits implicitly, in the reward model's own units: E[r_BT] − β·KL, which is
σ·(E[r̂] − (β/σ)·KL) with σ the reward model's standard deviation on SFT samples; the learned reward
model stands in for r_BT. Neither criterion reads the gold reward, which the benchmark's verdict is
about, and both are read on validation prompts, which the report never shows.

    python -m benchmarks.tuning RUN_DIR [--name tuning_ppo] [--windows 60]

Prints, per setting and checkpoint, the objective's mean over pipeline seeds (with each seed's
value), the gold reward and KL for context, and the winner; writes the table to
``benchmarks/results/<name>.json``. ``--windows N`` also prints each fixed-kl_coef PPO cell's
objective on its own training rollouts, E[r̂] − p·P(truncated) − c·KL from its ``train/`` curves,
averaged over its first, middle and last N iterations, with the rollouts' KL at its highest and
its last N-iteration mean (the KL the penalty read: sampled, or exact with ``kl_estimator``) and
its training's wall seconds (checkpoint evaluations left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from dpo_bench.methods.ppo import PPOConfig
from dpo_bench.stages import Stage, fitted_normaliser
from dpo_bench.verdict import Objective

from .common import table, write_result


def reward_model_std(run: dict, seed: int) -> float:
    """σ of the seed's reward model on SFT samples (its normaliser), from the run's stage cache."""
    key = run["pipelines"][str(seed)]["stage_keys"]["reward_model"]
    return fitted_normaliser(Stage("reward_model", key, Path(run["cache_dir"]) / "reward_model" / key), "reward_model").std


def objectives(run_dir: Path) -> pd.DataFrame:
    """One row per (setting, seed, checkpoint): the validation objective, gold reward and KL."""
    run = json.loads((run_dir / "run.json").read_text())
    per_prompt = pd.read_parquet(run_dir / "per_prompt.parquet")
    val = per_prompt[per_prompt["split"] == "val"]
    overrides = {entry["name"] or entry["method"]: entry["config"] for entry in run["config"]["grid"]}
    reward = "gold_reward" if "gold_reward" in val else "reward"
    rows = []
    for (name, strength, seed, step), g in val.groupby(["method", "beta", "seed", "step"]):
        method = run["methods"][name]["method"]
        kl = g["kl"].fillna(0.0)
        config = overrides.get(name, {})
        if method == "ppo":
            if config.get("target_kl", 0) or not config.get("normalise_reward", True):
                raise SystemExit(f"{name}: ranks fixed-kl_coef PPO on normalised rewards only (the objective of an adaptive or "
                                 "raw-score run is the run report's `objective` metric)")
            objective = Objective(strength, config.get("missing_eos_penalty", PPOConfig().missing_eos_penalty))
        elif method == "dpo":  # IPO, SLiC and the rest solve other problems
            objective = Objective(strength / reward_model_std(run, int(seed)))
        else:
            continue
        rows.append({"setting": name, "method": method, "strength": strength, "seed": int(seed), "step": int(step),
                     "c": objective.kl_coef, "penalty": objective.eos_penalty, "objective": objective.values(g).mean(),
                     "gold_reward": g[reward].mean(), "kl": kl.mean()})
    frame = pd.DataFrame(rows)
    # Best-of-4 from the reference on the same objective, at each setting's c: the bar a converged
    # policy clears (README, "The verdict").
    bon = val[(val["method"] == "best_of_n") & (val["beta"] == 4)]
    if len(bon) and len(frame):
        by_seed = {int(s): g for s, g in bon.groupby("seed")}
        frame["best_of_4"] = [Objective(c, p).values(by_seed[s]).mean() if s in by_seed else float("nan")
                              for s, c, p in zip(frame["seed"], frame["c"], frame["penalty"])]
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (setting, strength, checkpoint), best first within each (method, strength)."""
    agg = frame.groupby(["method", "setting", "strength", "step"]).agg(
        objective=("objective", "mean"), objective_min=("objective", "min"), objective_max=("objective", "max"),
        best_of_4=("best_of_4", "mean"), gold_reward=("gold_reward", "mean"), kl=("kl", "mean"), seeds=("seed", "nunique"),
    )
    # Objectives at different c, or of different methods, are not comparable: rank within each.
    return agg.reset_index().sort_values(["method", "strength", "objective"], ascending=[True, True, False]).reset_index(drop=True)


def rollout_windows(run_dir: Path, window: int) -> pd.DataFrame:
    """Per fixed-kl_coef PPO cell: its training rollouts' objective r̂ − p·truncated − c·KL in
    ``window``-iteration means (first, middle, last), the rollouts' KL (highest and last mean) and
    the training's wall seconds."""
    run = json.loads((run_dir / "run.json").read_text())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    overrides = {entry["name"] or entry["method"]: entry["config"] for entry in run["config"]["grid"]}
    rows = []
    curves = metrics[metrics["metric"].str.startswith("train/") | (metrics["metric"] == "compute/seconds")]
    for (name, strength, seed), g in curves.groupby(["method", "beta", "seed"]):
        config = overrides.get(name, {})
        if run["methods"][name]["method"] != "ppo" or config.get("target_kl", 0):
            continue
        curve = g.pivot_table(index="step", columns="metric", values="value").sort_index()
        penalty = config.get("missing_eos_penalty", PPOConfig().missing_eos_penalty)
        objective = curve["train/reward"] - penalty * curve["train/truncated"] - strength * curve["train/kl"]
        windows = (objective.index - 1) // window
        means, kl = objective.groupby(windows).mean(), curve["train/kl"].groupby(windows).mean()
        middle = len(means) // 2
        rows.append({"setting": name, "strength": strength, "seed": int(seed), "iterations": int(objective.index.max()),
                     "first": means.iloc[0], "middle": means.iloc[middle], "last": means.iloc[-1],
                     "kl_peak": kl.max(), "kl_last": kl.iloc[-1], "seconds": curve["compute/seconds"].max()})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a tuning run's directory (reports/<run_id>)")
    parser.add_argument("--name", default=None, help="results file name (default: tuning_<run_id>)")
    parser.add_argument("--windows", type=int, metavar="N",
                        help="also each PPO cell's objective on its training rollouts, in N-iteration means")
    args = parser.parse_args(argv)
    ranked = summary(objectives(args.run_dir))
    rows = [{"setting": r.setting, "strength": f"{r.strength:g}", "step": r.step,
             "val objective [seeds' range]": f"{r.objective:.3f} [{r.objective_min:.3f}, {r.objective_max:.3f}]",
             "best-of-4": f"{r.best_of_4:.3f}", "val gold": f"{r.gold_reward:.3f}", "val KL": f"{r.kl:.2f}", "seeds": r.seeds}
            for r in ranked.itertuples()]
    print(table(rows, list(rows[0])))
    for (method, strength), group in ranked.groupby(["method", "strength"], sort=True):
        best = group.iloc[0]
        print(f"\nwinner for {method} at {strength:g}: {best.setting} at step {best.step} (objective {best.objective:.3f})")
    result = {"ranked": ranked.to_dict(orient="records")}
    if args.windows:
        rollouts = rollout_windows(args.run_dir, args.windows)
        print(f"\nPPO's objective on its training rollouts, {args.windows}-iteration means:")
        print(table([{"setting": r.setting, "strength": f"{r.strength:g}", "seed": r.seed, "iterations": r.iterations,
                      "first": f"{r.first:.3f}", "middle": f"{r.middle:.3f}", "last": f"{r.last:.3f}",
                      "rollout KL: peak / last": f"{r.kl_peak:.2f} / {r.kl_last:.2f}", "training": f"{r.seconds:.0f} s"}
                     for r in rollouts.itertuples()],
                    ["setting", "strength", "seed", "iterations", "first", "middle", "last", "rollout KL: peak / last", "training"]))
        result["rollout_windows"] = rollouts.to_dict(orient="records")
    write_result(args.name or f"tuning_{args.run_dir.name}", result)


if __name__ == "__main__":
    main()
