"""Where a PPO iteration's time goes: generation, scoring, log-probs, updates.

Runs our PPO (``ppo``: against the learned reward model, the ``quick`` preset's settings) for a
few iterations with timers around its named steps: the sampler (generation), decoding and the
reward model / gold scorer (scoring), the no-grad old/reference log-probs and values (log-probs);
the rest of the iteration (the epochs of minibatch forward, backward and AdamW) is "updates".
The timers wrap the functions PPO calls; nothing in its loop changes.

    python -m benchmarks.ppo_breakdown [--iterations 8] [--rollout-batch 64]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from .common import StepClock, add_threads_argument, fixture, load_average, median, set_threads, table, write_result

PHASES = ("generation", "scoring", "log-probs", "updates")


class PhaseTimer:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.per_iteration: list[dict[str, float]] = []

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] += time.perf_counter() - start

    def wrap(self, name: str, fn, when=lambda: True):
        def timed(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def end_iteration(self, seconds: float) -> None:
        phases = dict(self.current)
        phases["updates"] = seconds - sum(phases.values())
        self.per_iteration.append(phases)
        self.current = defaultdict(float)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8, help="PPO iterations (the first is warm-up)")
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--method", default="ppo", choices=("ppo", "ppo_gt"))
    p.add_argument("--preset", default="quick", help="the preset whose task, SFT model and reward model PPO trains on")
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)

    import dpo_bench.methods.ppo as ppo
    from dpo_bench.methods.base import MethodContext, get_method

    fx = fixture(preset=args.preset)
    bench, stages = fx.bench, fx.stages
    reward_model = bench.reward_model(stages["reward_model"], stages["sft"])
    judge = fx.task.judge(reward_model)
    timer = PhaseTimer()
    clock = StepClock()
    no_grad = lambda: not torch.is_grad_enabled()  # noqa: E731  (old/ref log-probs run without grad; updates with)

    class TimedLog:
        """The context's TrainLog: PPO logs once per iteration, which closes the iteration's timings."""

        def __init__(self) -> None:
            from dpo_bench.training import TrainLog

            self.inner = TrainLog()

        def log(self, step, n=0, **metrics):
            clock.tick()
            if len(clock.ticks) >= 2:
                timer.end_iteration(clock.ticks[-1] - clock.ticks[-2])
            self.inner.log(step, n, **metrics)

        def __getattr__(self, name):  # everything else (last_finite, compute, ...) is the TrainLog's
            return getattr(self.inner, name)

    class TimedContext(MethodContext):
        def sample(self, model, prompt_ids, temperature=1.0):
            with timer.phase("generation"):
                return super().sample(model, prompt_ids, temperature)

    originals = (ppo.PolicyWithValueHead.logps_and_values, ppo.token_logps, reward_model.score, fx.task.decode_completion)
    ppo.PolicyWithValueHead.logps_and_values = timer.wrap("log-probs", originals[0], no_grad)
    ppo.token_logps = timer.wrap("log-probs", originals[1], no_grad)
    reward_model.score = timer.wrap("scoring", originals[2])
    fx.task.decode_completion = timer.wrap("scoring", originals[3])
    gold = timer.wrap("scoring", judge.score)
    loads = [load_average()[0]]
    try:
        ctx = TimedContext(
            task=fx.task, reference=fx.reference, device=torch.device("cpu"), seed=0, generator=torch.Generator().manual_seed(0),
            checkpoint=lambda step, model: None, n_checkpoints=0, log=TimedLog(), reward_model=reward_model, gold_scores=gold,
            progress=False, label=args.method,
        )
        method = get_method(args.method)
        config = method.make_config({"iterations": args.iterations, "rollout_batch": args.rollout_batch}, None)
        clock.tick()  # the first iteration starts here
        method.train(ctx, config)
    finally:
        ppo.PolicyWithValueHead.logps_and_values, ppo.token_logps = originals[0], originals[1]
        del reward_model.score, fx.task.decode_completion  # back to the class attributes
    loads.append(load_average()[0])
    iterations = timer.per_iteration[1:]  # the first is warm-up
    total = median([sum(it.values()) for it in iterations])
    rows = [{"phase": name, "median_ms": 1000 * median([it.get(name, 0.0) for it in iterations]),
             "share": median([it.get(name, 0.0) for it in iterations]) / total} for name in PHASES]
    rows.append({"phase": "iteration", "median_ms": 1000 * total, "share": 1.0})
    print(table(rows, ["phase", "median_ms", "share"]))
    print(f"{args.method}: {len(iterations)} iterations of {args.rollout_batch} rollouts, {config.epochs} epochs x "
          f"{config.n_minibatches} minibatches, {torch.get_num_threads()} threads; load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result(f"ppo_breakdown_{args.method}", {"config": vars(args), "rows": rows, "iterations": iterations,
                                                          "threads": torch.get_num_threads(), "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
