"""How far is a KL-regularised policy from its optimum? Estimates the optimum's value on the test
prompts of one pipeline seed of a run, at each kl_coef its PPO cells were checked at, and prints it
beside the cells' and best-of-N's own objective (the run's ``objective`` metrics).

At kl_coef c the objective E[s] − c·KL(π ‖ π_ref), s = r̂ − p·truncated, is maximised by
π* = π_ref·exp(s/c)/Z, whose value is c·E_x log E_{y~π_ref}[exp(s(x, y)/c)]. With a pool of n
reference draws per prompt, c·log mean_j exp(s_j/c) estimates it from below (Jensen's inequality:
the bias shrinks as n grows; the table shows the estimate at growing pool sizes). It is also the
exact objective of the best policy on the pool: π_ref's draws reweighted by exp(s/c), whose proxy
reward and KL to the pool are printed beside it.

    python -m benchmarks.optimum reports/<run_id> [--seed 1] [--pool 256] [--prompts 300]

The seed's stages are read from the run's stage cache; stages the current code keys differently
are rebuilt (deterministically, at their cost). Writes ``benchmarks/results/optimum_<run>_seed<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo_bench.verdict import pool_optimum_values

from .common import table, write_result


def pool_optimum(scores: np.ndarray, c: float) -> dict[str, float]:
    """The regularised optimum on a pool of reference draws, scores (P, n): its objective
    c·mean_x log mean_j exp(s/c), and its proxy reward and KL to the pool's uniform weights."""
    x = scores / c
    weights = np.exp(x - x.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    n = scores.shape[1]
    kl = (weights * np.log(np.maximum(weights * n, 1e-300))).sum(axis=1)
    return {"objective": float(pool_optimum_values(scores, c).mean()), "proxy": float((weights * scores).sum(axis=1).mean()),
            "kl": float(kl.mean())}


def draw_pool(run_dir: Path, seed: int, pool: int, n_prompts: int) -> np.ndarray:
    """s = r̂ − p·truncated of ``pool`` reference draws for each of the first ``n_prompts`` test prompts."""
    from dpo_bench.bench import from_dict_config
    from dpo_bench.generation import sample
    from dpo_bench.methods.ppo import PPOConfig
    from dpo_bench.run import Timings, plan_stages
    from dpo_bench.stages import Bench

    run = json.loads((run_dir / "run.json").read_text())
    config = from_dict_config(run["config"]).for_seed(seed)
    bench = Bench(config, Path(run["cache_dir"]), progress=False)
    stages = plan_stages(bench, Timings())
    task = bench.task(stages["task"])
    reference = bench.reference(stages["sft"])
    reward_model = bench.reward_model(stages["reward_model"], stages["sft"])
    prompt_ids = [task.encode_prompt(p) for p in task.eval_prompts[:n_prompts]]
    generator = torch.Generator().manual_seed(seed)
    scores = np.zeros((len(prompt_ids), pool))
    penalty = PPOConfig().missing_eos_penalty
    for j in range(pool):
        drawn = sample(reference, prompt_ids, max_new_tokens=task.max_new_tokens, eos_id=task.eos_id, pad_id=task.pad_id,
                       generator=generator, temperature=1.0)
        with torch.no_grad():
            r_hat = reward_model.normalised_score(drawn.batch.input_ids, drawn.batch.attention_mask).double().numpy()
        scores[:, j] = r_hat - penalty * task.truncated(drawn.completion_ids)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's directory (reports/<run_id>) with PPO cells")
    parser.add_argument("--seed", type=int, default=None, help="the pipeline seed (default: the run's first)")
    parser.add_argument("--pool", type=int, default=256, help="reference draws per prompt (default 256)")
    parser.add_argument("--prompts", type=int, default=300, help="test prompts, the first N (default 300)")
    args = parser.parse_args(argv)
    run = json.loads((args.run_dir / "run.json").read_text())
    seed = args.seed if args.seed is not None else int(run["seeds"][0])
    metrics = pd.read_parquet(args.run_dir / "metrics.parquet")
    mine = metrics[(metrics["seed"] == seed) & metrics["metric"].str.startswith("objective")]
    coefs = mine[mine["metric"] == "objective_kl_coef"]
    if coefs.empty:
        raise SystemExit(f"{args.run_dir}: no objective rows for seed {seed} (a run with PPO cells)")
    scores = draw_pool(args.run_dir, seed, args.pool, args.prompts)
    sizes = sorted({n for n in (8, 32, 128, args.pool) if n <= args.pool})
    rows = []
    for c in sorted(coefs["value"].unique()):
        cells = coefs[coefs["value"] == c][["method", "beta"]].drop_duplicates()
        optimum = {n: pool_optimum(scores[:, :n], float(c)) for n in sizes}
        row = {"c": float(c), **{f"optimum, pool {n}": o["objective"] for n, o in optimum.items()},
               "optimum's proxy": optimum[args.pool]["proxy"], "optimum's KL": optimum[args.pool]["kl"]}
        for m, b in cells.itertuples(index=False):
            cell = mine[(mine["method"] == m) & (mine["beta"] == b)]
            for metric, value in zip(cell["metric"], cell["value"]):
                if metric == "objective":
                    row[f"{m} ({b:g})"] = value
                elif metric.startswith("objective/"):
                    row[metric.removeprefix("objective/")] = value
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print(f"seed {seed}, {scores.shape[0]} test prompts, pool of {args.pool} (objective rows over all 300 test prompts)")
    print(table(rows, columns))
    write_result(f"optimum_{args.run_dir.name}_seed{seed}", {"run": str(args.run_dir), "seed": seed, "pool": args.pool,
                                                             "prompts": int(scores.shape[0]), "rows": rows})


if __name__ == "__main__":
    main()
