"""When does PPO show Lemma 2? PPO against the gold reward r, r + f(x) and f(x) + c·r at one setting.

The empirical Lemma 2 check (``dpo_bench.invariance.lemma2_empirical``) needs PPO runs that reach
the KL-regularised optimum; this command measures, for a kl_coef / iterations / learning rate,
where PPO ends against each reward, so that the check's settings (docs/checks.md, "The Lemma 2
check with PPO") come from a command rather than from prose. Variants:

- ``r``: the gold reward; ``r+f``: plus f(x) ~ N(0, 1) per prompt (the check's shift);
- ``r+fx``: plus the prompt's own gold score, a prompt-only term a value head can learn;
- ``f+cr``: the check's negative control, f(x) + c·r.

Each variant is one PPO-GT run from the preset's SFT model (built or read from the stage cache
``--cache-dir``), evaluated on the eval prompts: mean gold reward and KL with their standard
errors. ``--seeds`` repeats ``r`` with other seed schedules (run-to-run spread).

    python -m benchmarks.lemma2_regimes [--preset default] [--kl-coef 0.2] [--iterations 40] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import add_threads_argument, load_average, set_threads, table, write_result

VARIANTS = ("r", "r+f", "r+fx", "f+cr")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--cache-dir", default="/tmp/bench-cache-lemma2", help="stage cache for the preset's SFT model")
    p.add_argument("--kl-coef", type=float, default=0.2)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--control-scale", type=float, default=10.0, help="c of the control f(x) + c·r")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=1, help="seed schedules of the r run (the others use the first)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)

    from dpo_bench.bench import load_config
    from dpo_bench.invariance import prompt_shift
    from dpo_bench.methods.base import get_method
    from dpo_engine.seeds import derive_seed
    from dpo_bench.run import Timings, plan_stages
    from dpo_bench.stages import LEMMA2_PPO_OVERRIDES, Bench, load_reference_samples, ppo_against

    config = load_config(args.preset)
    bench = Bench(config, Path(args.cache_dir), progress=False)
    stages = plan_stages(bench, Timings())
    task, reference = bench.task(stages["task"]), bench.reference(stages["sft"])
    ref_samples = load_reference_samples(stages["ref_eval"], 1.0)
    method = get_method("ppo_gt")
    ppo_config = method.make_config({"iterations": args.iterations, "lr": args.lr, **LEMMA2_PPO_OVERRIDES}, args.kl_coef)

    def reward(variant: str):
        def scores(prompts, completions):
            r = task.gold.score(prompts, completions)
            f = prompt_shift(prompts, config.seed)
            return {"r": r, "r+f": r + f, "r+fx": r + task.gold.score(prompts, [""] * len(prompts)),
                    "f+cr": f + args.control_scale * r}[variant]
        return scores

    runs = [(v, 0) for v in args.variants.split(",")] + [("r", s) for s in range(1, args.seeds)]
    rows, loads = [], [load_average()[0]]
    for variant, seed_index in runs:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        seed = derive_seed(config.seed, "lemma2_ppo", *([seed_index] if seed_index else []))
        start = time.perf_counter()
        samples, _ = ppo_against(task, reference, bench.device, ppo_config, reward(variant), seed, ref_samples, label=variant)
        gold = samples[task.reward_metric].to_numpy()
        kl = (samples["policy_logp"] - samples["ref_logp"]).to_numpy()
        n = len(samples)
        rows.append({"variant": variant, "seed": seed_index, "gold_reward": float(gold.mean()),
                     "gold_se": float(gold.std(ddof=1) / np.sqrt(n)), "kl": float(kl.mean()),
                     "kl_se": float(kl.std(ddof=1) / np.sqrt(n)), "seconds": time.perf_counter() - start})
        loads.append(load_average()[0])
        print(f"{variant} (seed {seed_index}): gold {rows[-1]['gold_reward']:.3f} ± {rows[-1]['gold_se']:.3f}, "
              f"KL {rows[-1]['kl']:.3f} ± {rows[-1]['kl_se']:.3f}", flush=True)

    print(table(rows, ["variant", "seed", "gold_reward", "gold_se", "kl", "kl_se", "seconds"]))
    print(f"preset {args.preset}, kl_coef {args.kl_coef}, {args.iterations} iterations, lr {args.lr}; "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    settings = {k: getattr(args, k) for k in ("preset", "kl_coef", "iterations", "lr", "control_scale")}
    print(f"wrote {write_result(f'lemma2_regimes_kl{args.kl_coef:g}_it{args.iterations}', {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
