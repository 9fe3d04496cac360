"""SFT step throughput: our ``supervised_finetune`` against TRL's ``SFTTrainer``.

The SFT stage's own work: the task's GPT-2 freshly initialised (the same weights on both sides),
the corpus sentences as completions after a BOS prompt, batches of 64 in the same order, the
prompt masked out of the loss (``completion_only_loss=True``), float32, the same AdamW settings
and a constant learning rate. The objectives match (mean NLL per completion token), so the loss of
the first batch must agree within 1e-5; the loss at step 10 is compared too (ours logs every 10).

Ours runs as the SFT stage does: each batch in ``SFTConfig.shards`` shards (2), whose gradients
are computed at once in threads when torch has a thread for each (``--threads 2``), in turn
otherwise. ``--shards 1`` gives the single-pass step. ``--each-best`` runs every
repeat of each side in a process of its own, with the OpenMP waiting that is fastest for it: ours under
``OMP_WAIT_POLICY=PASSIVE`` (what ``make`` and ``dpo-bench`` set), TRL with it unset (threads that
spin while they wait, faster for TRL on an idle machine).

    python -m benchmarks.sft_vs_trl [--steps 12] [--repeats 5] [--threads 1] [--shards 2] [--each-best]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .common import StepClock, fixture, interleave, load_average, median, set_threads, table, write_result
from .trl_support import (
    common_args, order_like_ours, require_trl, run_trl, step_comparison_parser, ticking_optimiser_steps, timed_trainer,
)

TOLERANCE = 1e-5


def ours(fx, model, prompts, completions, *, steps, batch_size, lr, seed, shards) -> tuple[StepClock, dict[int, float]]:
    from dpo_bench.methods.sft import SFTConfig, supervised_finetune
    from dpo_bench.training import TrainLog

    clock = StepClock()
    log = TrainLog()
    with ticking_optimiser_steps(clock):
        supervised_finetune(
            model, prompts, completions, SFTConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=0, group_by_length=False, shards=shards),
            pad_id=fx.task.pad_id, generator=torch.Generator().manual_seed(seed), log=log, progress=False,
        )
    return clock, {step: v for step, name, v, _ in log.records if name == "train/loss"}


def first_batch_loss(fx, model, prompts, completions, order, batch_size) -> float:
    """Our SFT loss on the first batch at the initial weights (what step 1 optimises)."""
    from dpo_bench.logprobs import collate
    from dpo_bench.methods.sft import sft_loss

    idx = order[:batch_size]
    with torch.no_grad():
        return float(sft_loss(model, collate([prompts[i] for i in idx], [completions[i] for i in idx], fx.task.pad_id)))


def trl(fx, model, prompts, completions, order, *, steps, batch_size, lr, workdir) -> tuple[StepClock, list[float]]:
    require_trl()
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # Already tokenised rows (TRL's documented "processed" format): our exact token ids and mask.
    data = Dataset.from_dict({
        "input_ids": [list(prompts[i]) + list(completions[i]) for i in order],
        "completion_mask": [[0] * len(prompts[i]) + [1] * len(completions[i]) for i in order],
    })
    args = SFTConfig(
        **common_args(workdir, steps=steps, batch_size=batch_size, lr=lr, beta2=0.95, max_grad_norm=1.0),
        completion_only_loss=True, packing=False, padding_free=False, max_length=None, shuffle_dataset=False,
        pad_to_multiple_of=None,
    )
    clock = StepClock()
    trainer = timed_trainer(SFTTrainer, clock, fx.task.tokenizer, model=model, args=args, train_dataset=data)
    run_trl(trainer, clock)
    return clock, trainer.losses


# --each-best: each side in its own process, with the OpenMP waiting that is fastest for it.
BEST_WAIT_POLICY = {"ours": "PASSIVE", "trl": None}


def measure(side: str, fx, init, prompts, completions, order, args) -> dict:
    """One timed run of one side: median step and CPU time, and the logged losses."""
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    if side == "ours":
        clock, logged = ours(fx, copy.deepcopy(init), prompts, completions, seed=args.seed, shards=args.shards, **kw)
        step10 = logged.get(10, float("nan"))
        step0 = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            clock, losses = trl(fx, copy.deepcopy(init).train(), prompts, completions, order, workdir=tmp, **kw)
        step0, step10 = losses[0], (losses[9] if len(losses) >= 10 else float("nan"))
    return {"step": median(clock.step_times()), "cpu": median(clock.cpu_times()),
            "step0": step0, "step10": step10, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load": load_average()[0]}


def in_own_process(side: str, argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if BEST_WAIT_POLICY[side]:
        env["OMP_WAIT_POLICY"] = BEST_WAIT_POLICY[side]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sft_vs_trl", *argv, "--side", side], env=env, capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from dpo_bench.methods.sft import SFTConfig

    parser = step_comparison_parser(__doc__, lr=1e-3)
    parser.add_argument("--shards", type=int, default=SFTConfig.shards, help="our SFTConfig.shards (default: the stage's)")
    parser.add_argument("--each-best", action="store_true",
                        help="run each side in its own process with its fastest OpenMP waiting: ours under OMP_WAIT_POLICY=PASSIVE "
                             "(what make and dpo-bench set), TRL with it unset (spinning threads); use with --threads 2")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    set_threads(args.threads)
    require_trl()
    fx = fixture()
    prompts, completions = fx.task.reference_training_data()
    init = fx.task.initial_model(args.seed)
    order = order_like_ours(len(prompts), args.batch_size, args.steps, args.seed)
    if args.side:
        print(json.dumps(measure(args.side, fx, init, prompts, completions, order, args)))
        return
    step0 = {"ours": first_batch_loss(fx, init, prompts, completions, order, args.batch_size)}
    step10: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}
    policies: dict[str, str | None] = {}
    loads = [load_average()[0]]

    def run(side: str) -> float:
        result = in_own_process(side, [a for a in argv if a != "--each-best"]) if args.each_best else \
            measure(side, fx, init, prompts, completions, order, args)
        if result["step0"] is not None:
            step0.setdefault(side, result["step0"])
        step10.setdefault(side, result["step10"])
        cpu.setdefault(side, []).append(result["cpu"])
        policies[side] = result["omp_wait_policy"]
        loads.append(result["load"])
        return result["step"]

    step_s = interleave({"ours": lambda: run("ours"), "trl": lambda: run("trl")}, args.repeats)
    diff0 = abs(step0["trl"] - step0["ours"])
    if diff0 > TOLERANCE:
        raise AssertionError(f"SFT step-0 loss: TRL {step0['trl']:.8f}, ours {step0['ours']:.8f}")
    rows = [{
        "implementation": name, "median_step_ms": 1000 * median(xs), "median_cpu_ms": 1000 * median(cpu[name]),
        "sequences_per_s": args.batch_size / median(xs), "speedup_of_ours": median(xs) / median(step_s["ours"]),
        "loss_step0": step0[name], "loss_step10": step10[name], "repeats": len(xs), "omp_wait_policy": policies[name] or "unset",
    } for name, xs in step_s.items()]
    print(table(rows, ["implementation", "median_step_ms", "median_cpu_ms", "sequences_per_s", "speedup_of_ours", "loss_step0",
                       "loss_step10", "omp_wait_policy"]))
    print(f"step-0 |Δloss| = {diff0:.3g} (tolerance {TOLERANCE:g}); step-10 |Δloss| = {abs(step10['trl'] - step10['ours']):.3g}; "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    name = "sft_vs_trl_each_best" if args.each_best else "sft_vs_trl"
    path = write_result(name, {"config": vars(args), "rows": rows, "step_seconds": step_s, "cpu_seconds": cpu,
                               "abs_diff_step0": diff0, "abs_diff_step10": abs(step10["trl"] - step10["ours"]),
                               "threads": torch.get_num_threads(), "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
