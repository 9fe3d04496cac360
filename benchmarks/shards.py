"""The SFT stage's step on two cores: one pass, two shards in threads, or two ranks.

``supervised_finetune`` on a preset's corpus (``default``: the stage ``make bench`` runs first,
alone on the machine), length-grouped batches of 64 as in the stage, from the task's fresh model.
Settings alternate repeat by repeat; each run reports its median step over ``--steps`` steps (the
first two left out: warm-up), and the table the median over runs.

- ``1 shard, 1 thread``: one pass per batch, one torch thread;
- ``1 shard, 2 threads``: one pass on two intra-op threads;
- ``2 shards, 2 threads``: two shards at once in two threads, one torch thread each
  (``SFTConfig.shards = 2``, the stage's default);
- ``2 ranks``: two processes of one thread on torch.distributed (gloo), each a shard of every batch,
  gradients summed by an all-reduce (``nproc_per_cell = 2``);
- ``2 shards, 1 thread``: the same shards in turn (what a one-core machine runs).

    python -m benchmarks.shards [--preset default] [--steps 100] [--repeats 5]

Run it under ``OMP_WAIT_POLICY=PASSIVE`` as ``make`` and ``dpo-bench`` do.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from .common import StepClock, fixture, interleave, load_average, median, table, write_result
from .trl_support import ticking_optimiser_steps

# shards, torch threads (of the process, shared by its ranks), ranks
SETTINGS = {"1 shard, 1 thread": (1, 1, 1), "1 shard, 2 threads": (1, 2, 1), "2 shards, 2 threads": (2, 2, 1),
            "2 ranks": (1, 2, 2), "2 shards, 1 thread": (2, 1, 1)}


def sft_steps(preset: str, steps: int, shards: int) -> tuple[torch.nn.Module, list[float]]:
    """The SFT stage's training for ``steps`` steps from the task's fresh model: the model and each
    step's wall seconds (on every rank: ranks other than 0 run it as their job)."""
    from dpo_bench.methods.sft import SFTConfig, supervised_finetune
    from dpo_bench.training import TrainLog

    fx = fixture(preset=preset)
    prompts, completions = fx.task.reference_training_data()
    model = copy.deepcopy(fx.task.initial_model(0))
    clock = StepClock()
    with ticking_optimiser_steps(clock):
        supervised_finetune(model, prompts, completions, SFTConfig(steps=steps, shards=shards), pad_id=fx.task.pad_id,
                            generator=torch.Generator().manual_seed(0), log=TrainLog(), progress=False)
    return model, clock.step_times()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="whose SFT stage (its corpus and model; built once into the bench cache)")
    p.add_argument("--steps", type=int, default=100, help="SFT steps per run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each setting, interleaved")
    args = p.parse_args(argv)

    from dpo_engine.distributed import RankJob, ranks

    from benchmarks.shards import sft_steps as job  # by its module's name: under `-m` this module is __main__

    fixture(preset=args.preset)  # the stages it reads, built once before the timings
    own_threads = torch.get_num_threads()
    final: dict[str, torch.nn.Module] = {}
    loads = [load_average()[0]]

    def run(name: str) -> float:
        shards, threads, nproc = SETTINGS[name]
        torch.set_num_threads(threads)
        with ranks(nproc, RankJob(job, (args.preset, args.steps, shards)), torch.device("cpu")):
            model, seconds = sft_steps(args.preset, args.steps, shards)
        torch.set_num_threads(own_threads)
        final[name] = model
        loads.append(load_average()[0])
        return median(seconds)

    step_s = interleave({name: (lambda n=name: run(n)) for name in SETTINGS}, args.repeats)
    base = median(step_s["1 shard, 2 threads"])
    rows = [{"setting": name, "median_step_ms": 1000 * median(xs), "speedup_vs_one_pass_on_2_threads": base / median(xs),
             "runs_ms": " ".join(f"{1000 * x:.1f}" for x in xs)} for name, xs in step_s.items()]
    print(table(rows, ["setting", "median_step_ms", "speedup_vs_one_pass_on_2_threads", "runs_ms"]))

    def same(a: str, b: str) -> bool:
        return all(torch.equal(x, y) for x, y in zip(final[a].parameters(), final[b].parameters()))

    identical = same("2 shards, 2 threads", "2 shards, 1 thread") and same("2 ranks", "2 shards, 1 thread")
    print(f"2 shards at once (threads, ranks) and in turn give identical weights: {identical}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("shards", {"config": vars(args), "rows": rows, "step_seconds": step_s, "identical_weights": identical,
                                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
