"""DPO step throughput: our DPO-family trainer against TRL's ``DPOTrainer``.

Same tiny GPT-2 (the ``quick`` preset's SFT model), the same preference batches in the same order,
the same β, float32 on this CPU, measured in one process, the sides alternated repeat by repeat.
A step is everything between two optimiser steps: batch, forward, loss, backward, clipping,
AdamW, logging. The loss of the first step (the policy still equals the reference) must agree
within 1e-5; the first few steps' losses are reported too (same optimiser settings on both sides).

TRL runs twice: with ``precompute_ref_log_probs=True`` (the reference's log-probs computed once
before training, as ours are) and with its default, a reference forward pass every step.

    python -m benchmarks.dpo_vs_trl [--steps 12] [--repeats 5] [--beta 0.1] [--batch-size 64]
"""

from __future__ import annotations

import copy
import tempfile

import pandas as pd
import torch

from .common import StepClock, fixture, interleave, load_average, median, set_threads, table, write_result
from .trl_support import (
    common_args, order_like_ours, require_trl, run_trl, step_comparison_parser, ticking_optimiser_steps, timed_trainer,
)

TOLERANCE = 1e-5


def ours(fx, *, steps: int, batch_size: int, beta: float, lr: float, seed: int,
         group_by_length: bool = False) -> tuple[StepClock, list[float]]:
    """(step clock, per-step losses) of our trainer; without ``group_by_length`` (our default is on)
    its batches are exactly the ones TRL reads."""
    from dpo_bench.losses import LOSSES
    from dpo_bench.methods.base import MethodContext
    from dpo_bench.methods.dpo_family import DPOConfig, train_dpo_family
    from dpo_bench.training import TrainLog

    clock = StepClock()
    log = TrainLog()
    ctx = MethodContext(
        task=fx.task, reference=fx.reference, device=torch.device("cpu"), seed=seed,
        generator=torch.Generator().manual_seed(seed), checkpoint=lambda step, model: None, n_checkpoints=0,
        log=log, preferences=fx.prefs, progress=False, label="dpo",
    )
    config = DPOConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=0, beta=beta, group_by_length=group_by_length)
    with ticking_optimiser_steps(clock):
        train_dpo_family(ctx, config, LOSSES["dpo"])
    losses = [v for _, name, v, _ in log.records if name == "train/loss"]
    return clock, losses


def trl_dataset(fx, order: list[int]):
    """The train pairs as TRL's standard text columns, rows in our minibatch order.

    The prompt carries the task's BOS token and the completions a leading space, so TRL's own
    tokenisation gives exactly our token ids (checked in :func:`check_same_tokens`).
    """
    from datasets import Dataset

    frame = pd.read_parquet(fx.pairs_path)
    frame = frame[frame["split"] == "train"].reset_index(drop=True)
    bos = fx.task.tokenizer.bos_token
    rows = frame.iloc[order]
    return Dataset.from_dict({
        "prompt": [f"{bos} {p}" for p in rows["prompt"]],
        "chosen": [f" {c}" for c in rows["chosen"]],
        "rejected": [f" {r}" for r in rows["rejected"]],
    })


def check_same_tokens(fx, trainer, order: list[int]) -> None:
    """TRL's tokenised rows must be our collated rows, token for token."""
    for k in range(min(len(order), 64)):
        row = trainer.train_dataset[k]
        i = order[k]
        for name, batch in (("chosen", fx.prefs.chosen), ("rejected", fx.prefs.rejected)):
            ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            theirs = row["prompt_ids"] + row[f"{name}_ids"]
            if ids != theirs:
                raise AssertionError(f"row {i} {name}: TRL tokenised {theirs}, ours {ids}")


def trl(fx, order: list[int], *, steps: int, batch_size: int, beta: float, lr: float, precompute: bool,
        workdir: str) -> tuple[StepClock, list[float]]:
    require_trl()
    from trl import DPOConfig, DPOTrainer

    policy = copy.deepcopy(fx.reference).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    ref_model = None
    if not precompute:
        ref_model = copy.deepcopy(fx.reference).eval()
    args = DPOConfig(
        **common_args(workdir, steps=steps, batch_size=batch_size, lr=lr, beta2=0.95, max_grad_norm=10.0),
        beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=256, max_length=None, pad_to_multiple_of=None,
    )
    clock = StepClock()
    trainer = timed_trainer(DPOTrainer, clock, fx.task.tokenizer, model=policy, ref_model=ref_model, args=args,
                            train_dataset=trl_dataset(fx, order))
    check_same_tokens(fx, trainer, order)
    run_trl(trainer, clock)
    return clock, trainer.losses


def main(argv: list[str] | None = None) -> None:
    p = step_comparison_parser(__doc__, lr=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--group-by-length", action="store_true",
                   help="ours with its default length-grouped batches (TRL still reads the plain order): less padding on our side")
    args = p.parse_args(argv)
    set_threads(args.threads)
    require_trl()
    fx = fixture()
    order = order_like_ours(len(fx.prefs), args.batch_size, args.steps, args.seed)
    kw = dict(steps=args.steps, batch_size=args.batch_size, beta=args.beta, lr=args.lr)
    losses: dict[str, list[float]] = {}
    loads = [load_average()[0]]
    cpu: dict[str, list[float]] = {}

    def side(name, fn):
        def run() -> float:
            clock, step_losses = fn()
            losses.setdefault(name, step_losses)
            cpu.setdefault(name, []).append(median(clock.cpu_times()))
            loads.append(load_average()[0])
            return median(clock.step_times())
        return run

    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            "ours": side("ours", lambda: ours(fx, seed=args.seed, group_by_length=args.group_by_length, **kw)),
            "trl_precomputed_ref": side("trl_precomputed_ref", lambda: trl(fx, order, precompute=True, workdir=tmp, **kw)),
            "trl_ref_model": side("trl_ref_model", lambda: trl(fx, order, precompute=False, workdir=tmp, **kw)),
        }
        step_s = interleave(sides, args.repeats)

    ours_s = median(step_s["ours"])
    rows = []
    for name, xs in step_s.items():
        s = median(xs)
        first = losses[name][0]
        rows.append({
            "implementation": name, "median_step_ms": 1000 * s, "median_cpu_ms": 1000 * median(cpu[name]),
            "pairs_per_s": args.batch_size / s, "speedup_of_ours": s / ours_s,
            "cpu_speedup_of_ours": median(cpu[name]) / median(cpu["ours"]), "loss_step0": first, "abs_diff_step0_vs_ours": abs(first - losses["ours"][0]),
            "max_abs_diff_first_steps": max(abs(a - b) for a, b in zip(losses[name], losses["ours"])),
            "repeats": len(xs),
        })
    for row in rows:
        if row["abs_diff_step0_vs_ours"] > TOLERANCE:
            raise AssertionError(f"step-0 loss of {row['implementation']} differs from ours by {row['abs_diff_step0_vs_ours']:.3g}")
    print(table(rows, ["implementation", "median_step_ms", "median_cpu_ms", "pairs_per_s", "speedup_of_ours", "cpu_speedup_of_ours", "loss_step0",
                       "abs_diff_step0_vs_ours", "max_abs_diff_first_steps"]))
    print(f"load average during the run: {min(loads):.2f}-{max(loads):.2f}; step-0 losses agree within {TOLERANCE:g}")
    path = write_result("dpo_vs_trl_grouped" if args.group_by_length else "dpo_vs_trl", {"config": vars(args), "rows": rows, "step_seconds": step_s, "cpu_seconds": cpu, "losses": losses, "threads": torch.get_num_threads(),
                                       "load_average_range": [min(loads), max(loads)], "tolerance": TOLERANCE})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
