"""The SFT stage's step with and without shards, on one torch thread and on two.

``supervised_finetune`` on a preset's corpus (``default``: the stage ``make bench`` runs first,
alone on the machine), length-grouped batches of 64 as in the stage, from the task's fresh model.
Settings alternate repeat by repeat; each run reports its median step over ``--steps`` steps
(the first two left out: warm-up, and the start of a shard worker), and the table the median over
runs.

- ``1 shard, 1 thread``: one pass per batch, one torch thread;
- ``1 shard, 2 threads``: one pass on two intra-op threads (the stage before shards);
- ``2 shards, 2 threads``: two shards at once in two threads, one torch thread each (the stage
  while its shard worker starts, or where none can);
- ``2 shards, 2 processes``: the stage once its worker is up: the second shard in a worker process;
- ``2 shards, 1 thread``: the same shards in turn (what a one-core machine runs).

    python -m benchmarks.shards [--preset default] [--steps 100] [--repeats 5]

Run it under ``OMP_WAIT_POLICY=PASSIVE`` as ``make`` and ``dpo-bench`` do.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from .common import StepClock, fixture, interleave, load_average, median, shards_in, table, write_result
from .trl_support import ticking_optimiser_steps

# shards, torch threads, where the second shard runs
SETTINGS = {"1 shard, 1 thread": (1, 1, "threads"), "1 shard, 2 threads": (1, 2, "threads"), "2 shards, 2 threads": (2, 2, "threads"),
            "2 shards, 2 processes": (2, 2, "processes"), "2 shards, 1 thread": (2, 1, "threads")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="whose SFT stage (its corpus and model; built once into the bench cache)")
    p.add_argument("--steps", type=int, default=100, help="SFT steps per run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each setting, interleaved")
    args = p.parse_args(argv)

    from dpo_bench.methods.sft import SFTConfig, supervised_finetune
    from dpo_bench.training import TrainLog

    fx = fixture(preset=args.preset)
    prompts, completions = fx.task.reference_training_data()
    init = fx.task.initial_model(0)
    own_threads = torch.get_num_threads()
    final: dict[str, torch.nn.Module] = {}
    loads = [load_average()[0]]

    def run(name: str) -> float:
        shards, threads, where = SETTINGS[name]
        torch.set_num_threads(threads)
        model = copy.deepcopy(init)
        clock = StepClock()
        with ticking_optimiser_steps(clock), shards_in(where):
            supervised_finetune(model, prompts, completions, SFTConfig(steps=args.steps, shards=shards), pad_id=fx.task.pad_id,
                                generator=torch.Generator().manual_seed(0), log=TrainLog(), progress=False)
        seconds = median(clock.step_times())
        torch.set_num_threads(own_threads)
        final[name] = model
        loads.append(load_average()[0])
        return seconds

    step_s = interleave({name: (lambda n=name: run(n)) for name in SETTINGS}, args.repeats)
    base = median(step_s["1 shard, 2 threads"])
    rows = [{"setting": name, "median_step_ms": 1000 * median(xs), "speedup_vs_one_pass_on_2_threads": base / median(xs),
             "runs_ms": " ".join(f"{1000 * x:.1f}" for x in xs)} for name, xs in step_s.items()]
    print(table(rows, ["setting", "median_step_ms", "speedup_vs_one_pass_on_2_threads", "runs_ms"]))

    def same(a: str, b: str) -> bool:
        return all(torch.equal(x, y) for x, y in zip(final[a].parameters(), final[b].parameters()))

    identical = same("2 shards, 2 threads", "2 shards, 1 thread") and same("2 shards, 2 processes", "2 shards, 1 thread")
    print(f"2 shards at once (threads, processes) and in turn give identical weights: {identical}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("shards", {"config": vars(args), "rows": rows, "step_seconds": step_s, "identical_weights": identical,
                                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
