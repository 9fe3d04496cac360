"""Time one cell of a preset (train + evaluation) against its cached upstream stages.

The shared stages a cell reads (task, SFT model, preferences, reference log-probs, reward model,
reference evaluation) are built once into the cache and reused; the cell itself is rebuilt every
repeat in this process, so the time is the cell's own. The cell's time is split into training and
evaluation (every call of the evaluation at a checkpoint or an extra temperature).

    python -m benchmarks.cell --preset default --cell "dpo β=0.3" [--cell "ppo kl_coef=0.1"] [--threads 1] [--repeats 1]

``--cell`` matches the start of a cell's label as the run logs it (``dpo β=0.3 seed=0``);
``--list`` prints the preset's cells. ``--ablate`` also runs every cell without the forward's
speed-ups, alternating with the normal run on the same upstream stages: ``dpo_engine.trunk`` with
every shared prefix computed once per sequence, then transformers' own GPT-2 forward instead of
``dpo_engine.trunk``'s (a batch's rows in length groups, completion-only logits), then one padded pass
per batch, then logits over every position too. ``--nproc 1 2`` instead alternates the cell on
one process and on two ranks of torch.distributed (``nproc_per_cell``; the process's threads shared
between its ranks: ``--threads 2`` gives one process two threads, or two ranks one each).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

from .common import (
    DEFAULT_CACHE, add_threads_argument, load_average, median, models_own_forward, prefixes_unshared, set_threads, table, write_result,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--cell", action="append", default=[], help="start of a cell's label (repeatable)")
    p.add_argument("--list", action="store_true", help="list the preset's cells and exit")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, help=f"stage cache (default {DEFAULT_CACHE}-<preset>)")
    p.add_argument("--name", help="results file name (default cell_<preset>)")
    p.add_argument("--ablate", action="store_true",
                   help="alternate with runs on transformers' own GPT-2 forward: with length groups, in one padded pass, and with full logits too")
    p.add_argument("--nproc", type=int, nargs="+", metavar="N",
                   help="alternate runs on N processes (ranks, nproc_per_cell) for each N given, e.g. --nproc 1 2")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.nproc and args.ablate:
        raise SystemExit("--nproc and --ablate are separate comparisons: give one")

    import dpo_bench.logprobs as logprobs
    import dpo_engine.batching as batching
    from dpo_bench.stages import cells as cells_module
    from dpo_bench.bench import load_config
    from dpo_bench.run import Timings, plan_stages, upstream_for
    from dpo_bench.stages import Bench, run_cell
    from dpo_bench.stages.cells import _variant_preferences

    config = load_config(args.preset)
    cells = config.cells()
    if args.list or not args.cell:
        print("\n".join(c.label for c in cells))
        return
    chosen = []
    for prefix in args.cell:
        match = [c for c in cells if c.label.startswith(prefix)]
        if not match:
            raise SystemExit(f"no cell of preset {args.preset!r} starts with {prefix!r}; --list shows them")
        chosen.append(match[0])

    threads = set_threads(args.threads)
    config = dataclasses.replace(config, threads=threads)
    cache = args.cache_dir or Path(f"{DEFAULT_CACHE}-{args.preset}")
    bench = Bench(config, cache, progress=False)
    stages = plan_stages(bench, Timings())

    # Count the evaluation's time wherever run_cell calls it.
    spent = {"evaluation": 0.0}
    evaluate = cells_module.evaluate_policy

    def timed_evaluate(*a, **k):
        start = time.perf_counter()
        try:
            return evaluate(*a, **k)
        finally:
            spent["evaluation"] += time.perf_counter() - start

    cells_module.evaluate_policy = timed_evaluate

    saved_overhead, saved_keeps = batching.GROUP_OVERHEAD_TOKENS, logprobs.keeps_selected_logits

    def set_speedups(on: str) -> None:
        """"all": as shipped; "unshared": shared prefixes computed for each sequence; "groups": the
        model's own forward in length groups, completion-only logits; "logits": one padded pass per
        batch; "none": full logits too."""
        batching.GROUP_OVERHEAD_TOKENS = saved_overhead if on in ("all", "unshared", "groups") else 10**9
        logprobs.keeps_selected_logits = (lambda model: False) if on == "none" else saved_keeps

    variants = [("current", "all"), ("prefixes unshared", "unshared"), ("own forward, length groups", "groups"),
                ("own forward, one pass", "logits"), ("own forward, one pass, full logits", "none")] if args.ablate else [("current", "all")]
    nprocs = {name: 1 for name, _ in variants}
    if args.nproc:
        variants = [(f"{n} rank{'s' if n > 1 else ''}", "all") for n in args.nproc]
        nprocs = {f"{n} rank{'s' if n > 1 else ''}": n for n in args.nproc}
    rows = []
    for cell in chosen:
        up = upstream_for(cell, stages)
        if cell.preferences:  # the variant's own preference data is upstream too: cache it first
            up = _variant_preferences(bench, cell, up)
            cell = dataclasses.replace(cell, preferences=())
        runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "evaluation": []} for name, _ in variants}
        for r in range(args.repeats):
            for name, on in (variants if r % 2 == 0 else variants[::-1]):
                set_speedups(on)
                spent["evaluation"] = 0.0
                load = load_average()[0]
                # A fresh run each time: with the cache off, a run builds each stage once.
                ranked = dataclasses.replace(bench.config, nproc_per_cell=nprocs[name])
                uncached = dataclasses.replace(bench, config=ranked, use_cache=False, started=0.0)
                wall, cpu = time.perf_counter(), time.process_time()
                ablation = {"all": contextlib.nullcontext, "unshared": prefixes_unshared}.get(on, models_own_forward)
                with ablation():
                    run_cell(uncached, cell, up)
                runs[name]["wall"].append(time.perf_counter() - wall)
                runs[name]["cpu"].append(time.process_time() - cpu)
                runs[name]["evaluation"].append(spent["evaluation"])
                print(f"{cell.label} [{name}]: {runs[name]['wall'][-1]:.1f} s (evaluation {spent['evaluation']:.1f} s), load {load:.2f}", flush=True)
        set_speedups("all")
        for name, _ in variants:
            x = runs[name]
            rows.append({
                "cell": cell.label, "variant": name, "wall_s": median(x["wall"]), "cpu_s": median(x["cpu"]),
                "evaluation_s": median(x["evaluation"]), "training_s": median(x["wall"]) - median(x["evaluation"]), "walls": x["wall"],
            })
    columns = ["cell", "variant", "wall_s", "training_s", "evaluation_s", "cpu_s"]
    print(table(rows, columns))
    path = write_result(args.name or f"cell_{args.preset}", {"preset": args.preset, "threads": threads, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
