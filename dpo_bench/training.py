"""Mechanics every trainer shares: optimiser, learning-rate schedule, minibatches, the NaN guard,
checkpoint schedule and the training log."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from dpo_engine.batching import GROUP_OVERHEAD_TOKENS
from dpo_engine.distributed import Ranks
from dpo_engine.optim import adamw, minibatches

from .configs import field as cfield
from .configs import ConfigError, non_negative, positive
from .precision import FP32, LossScaler, Precision

CheckpointFn = Callable[[int, nn.Module], None]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the method, step and last finite values."""


#: What a cell's training has cost, metric by metric (the ``compute/`` rows of its metrics).
COMPUTE_METRICS = {
    "steps": "compute/steps",  # optimiser steps
    "samples": "compute/samples",  # completions sampled during training (PPO's rollouts)
    "tokens": "compute/tokens",  # non-pad tokens through the forward and backward passes of the updates
    "seconds": "compute/seconds",  # wall seconds of training, checkpoint evaluations left out
    "inference_samples": "compute/inference_samples",  # completions drawn per prompt to answer it (best-of-N: N)
}
#: Metrics measured on the clock, not computed: two runs of one config (in process or as a flow, on
#: Dask workers, resumed) agree on every other metric to the bit, and on these only roughly.
WALL_CLOCK_METRICS = frozenset({COMPUTE_METRICS["seconds"]})


@dataclass
class ComputeMeter:
    """What training has cost so far: optimiser steps, completions sampled, tokens trained on and
    wall seconds. Trainers :meth:`add` to it; the clock runs from :meth:`start`, and stops while
    :meth:`paused` (a checkpoint's evaluation is not training). The tokens are those the updates
    train on: forward passes without a gradient (reference log-probs, PPO's old log-probs and
    values) are left out, and so are the stages every cell shares (the SFT model, the preference
    data, the reward model)."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    inference_samples: int = 1
    _seconds: float = 0.0
    _since: float | None = None
    started: bool = False

    def start(self) -> None:
        self.started = True
        self._since = time.perf_counter()

    def add(self, steps: int = 0, samples: int = 0, tokens: int = 0) -> None:
        self.steps += int(steps)
        self.samples += int(samples)
        self.tokens += int(tokens)

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._seconds + running

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stops inside (a checkpoint's evaluation), and goes on after."""
        self._seconds, self._since = self.seconds, None
        try:
            yield
        finally:
            if self.started:
                self._since = time.perf_counter()

    def metrics(self) -> dict[str, float]:
        """The ``compute/`` metrics so far (:data:`COMPUTE_METRICS`)."""
        values = {"steps": self.steps, "samples": self.samples, "tokens": self.tokens, "seconds": self.seconds,
                  "inference_samples": self.inference_samples}
        return {COMPUTE_METRICS[k]: float(v) for k, v in values.items()}


@dataclass
class TrainLog:
    """Training curves: ``records`` of (step, metric, value, n). Once ``compute`` is started, every
    logged step also records what training has cost up to it (the ``compute/`` metrics), so the
    curves can be drawn against steps, samples, tokens or seconds."""

    records: list[tuple[int, str, float, int]] = field(default_factory=list)
    last_finite: dict[str, float] = field(default_factory=dict)
    compute: ComputeMeter = field(default_factory=ComputeMeter)
    _compute_steps: set[int] = field(default_factory=set, repr=False)

    def log(self, step: int, n: int = 0, **metrics: float) -> None:
        for name, value in metrics.items():
            value = float(value)
            self.records.append((step, name, value, n))
            if math.isfinite(value):
                self.last_finite[name] = value
        if self.compute.started:
            self.log_compute(step)

    def log_compute(self, step: int) -> None:
        """The ``compute/`` metrics at ``step``, once per step (a checkpoint after a logged step adds none)."""
        if step in self._compute_steps:
            return
        self._compute_steps.add(step)
        for name, value in self.compute.metrics().items():
            self.records.append((step, name, value, 0))


def check_finite(loss: torch.Tensor, what: str, step: int, log: TrainLog) -> None:
    if not torch.isfinite(loss).all():
        last = ", ".join(f"{k}={v:.4g}" for k, v in sorted(log.last_finite.items())) or "none"
        raise NonFiniteLossError(f"{what}: loss is {loss.item()} at step {step}; last finite values: {last}")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return adamw(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


LR_SCHEDULES = ("constant", "linear")
LR_SCHEDULE_DOC = ("the learning rate after warm-up: constant (the DPO paper's), or linear, decaying to 0 over the run"
                   "; a constant step keeps a noise floor that decay shrinks")


def lr_factor(step: int, total: int, warmup_steps: int = 0, schedule: str = "constant") -> float:
    """The learning rate of step ``step`` (0-based, of ``total``) as a fraction of the peak: a linear
    warm-up over ``warmup_steps``, then constant, or for ``linear`` times 1 − step/total (the last
    step at 1/total of the peak)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule '{schedule}'; use {' or '.join(LR_SCHEDULES)}")
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * (1.0 - step / total) if schedule == "linear" else warm


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total: int = 1,
                    schedule: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then ``schedule`` (``lr_factor``): constant is the DPO paper's schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup_steps, schedule))


def checkpoint_steps(total: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` evenly spaced steps ending at ``total`` (step 0, the start, is the reference)."""
    n = max(1, min(n_checkpoints, total))
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)})



SHARDS_DOC = (
    "split each micro-batch into this many shards whose gradients are computed at once in threads on the CPU, torch's "
    "threads shared between them; the result depends on the shards, not on whether they run at once (processes of "
    "their own: nproc_per_cell)"
)


EMA_DOC = (
    "if > 0, the policy evaluated at each checkpoint and returned is an exponential moving average of the trained "
    "weights with this decay per optimiser step (Polyak averaging, which smooths the last iterate's noise; tried on the "
    "default task and not adopted by the presets: docs/ppo.md); 0 keeps the trained weights"
)


def check_ema(decay: float) -> None:
    if not 0 <= decay < 1:
        raise ConfigError(f"ema must be in [0, 1), got {decay}")


class WeightAverage:
    """An exponential moving average of ``model``'s parameters (torch's ``AveragedModel``), updated
    after every optimiser step; with ``decay`` 0, nothing: :meth:`current` is the model itself."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = model
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay else None

    def update(self) -> None:
        if self.average is not None:
            self.average.update_parameters(self.model)

    def current(self) -> nn.Module:
        """The weights to evaluate: the average, or the model."""
        return self.model if self.average is None else self.average.module

    def finish(self) -> nn.Module:
        """The model, holding the average's parameters from now on."""
        if self.average is not None:
            with torch.no_grad():
                for mine, averaged in zip(self.model.parameters(), self.average.module.parameters()):
                    mine.copy_(averaged)
        return self.model


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser settings every gradient-trained method shares."""

    steps: int = cfield(300, "optimiser steps")
    batch_size: int = cfield(64, "examples (sequences, pairs or rankings) per step")
    lr: float = cfield(5e-5, "peak learning rate (AdamW)")
    warmup_steps: int = cfield(20, "linear warm-up steps")
    lr_schedule: Literal["constant", "linear"] = cfield("constant", LR_SCHEDULE_DOC)
    accumulation_steps: int = cfield(1, "split each step's batch into this many micro-batches (gradient accumulation)")
    shards: int = cfield(1, SHARDS_DOC)
    group_by_length: bool = cfield(True, "batch items of similar length together: less padding, faster steps (transformers' group_by_length)")
    ema: float = cfield(0.0, EMA_DOC)

    def __post_init__(self) -> None:
        check_ema(self.ema)
        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        non_negative("warmup_steps", self.warmup_steps)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule: '{self.lr_schedule}' is not one of {', '.join(LR_SCHEDULES)}")
        positive("accumulation_steps", self.accumulation_steps)
        positive("shards", self.shards)
        if self.accumulation_steps * self.shards > self.batch_size:
            raise ValueError(
                f"accumulation_steps x shards ({self.accumulation_steps} x {self.shards}) must be <= batch_size ({self.batch_size})"
            )


def shard_indices(idx: torch.Tensor, shards: int, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``idx`` cut into at most ``shards`` parts that take about as long to compute.

    Without ``lengths``: equal runs of items. With them (tokens per item), the items are ordered
    by length and cut into runs, so each part is padded little, at the cuts that make the costliest
    part cheapest. A part costs its rows times its longest row plus one forward's overhead
    (:data:`dpo_engine.batching.GROUP_OVERHEAD_TOKENS`); fewer parts come back when more would not
    make the costliest one cheaper.
    """
    if shards == 1 or len(idx) <= 1:
        return [idx]
    if lengths is None:
        return [part for part in idx.tensor_split(shards) if len(part)]
    order = idx[torch.argsort(lengths[idx], stable=True)]
    sizes = [max(1, int(n)) for n in lengths[order].tolist()]

    def starts(cap: int) -> list[int]:
        """Greedy from the longest items: each part takes as many as fit under ``cap``."""
        out, end = [], len(sizes)
        while end > 0:
            end = max(0, end - max(1, (cap - GROUP_OVERHEAD_TOKENS) // sizes[end - 1]))
            out.append(end)
        return out[::-1]

    lo, hi = sizes[-1] + GROUP_OVERHEAD_TOKENS, len(sizes) * sizes[-1] + GROUP_OVERHEAD_TOKENS
    while lo < hi:  # the least cap that needs at most `shards` parts
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(starts(mid)) <= shards else (mid + 1, hi)
    bounds = starts(lo) + [len(sizes)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def rank_part(idx: torch.Tensor, ranks: Ranks, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's part of a micro-batch: the ranks take :func:`shard_indices`'s parts (so that two
    ranks compute what two shards in one process do), and a rank beyond the parts none."""
    if not ranks.distributed:
        return idx
    parts = shard_indices(idx, ranks.size, lengths)
    return parts[ranks.rank] if ranks.rank < len(parts) else idx[:0]


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# transformers configs whose dropout a model applies as a float (attention dropout inside SDPA), not a module.
DROPOUT_CONFIG_KEYS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout",
                       "attention_probs_dropout_prob", "hidden_dropout_prob", "activation_dropout")


def draws_random_numbers(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` draws random numbers: a dropout module with p > 0,
    or a transformers config with a dropout rate above 0, in training mode."""
    if not model.training:
        return False
    if any(isinstance(m, DROPOUT_MODULES) and m.p > 0 and m.training for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, key, None), (int, float)) and getattr(config, key) > 0 for key in DROPOUT_CONFIG_KEYS)


# One part's loss, metrics and weighted gradient (None for a parameter the loss does not reach).
Part = tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor | None, ...]]


def part_gradient(loss_fn: Callable, params: Sequence[torch.Tensor], part: torch.Tensor, weight: float,
                  precision: Precision = FP32, scaler: LossScaler | None = None) -> Part:
    """One part's loss and metrics, and the gradient of its ``weight``-weighted loss (its forward
    under ``precision``'s autocast, the loss scaled by ``scaler`` before the backward pass)."""
    with precision.autocast():
        loss, metrics = loss_fn(part)
    weighted = loss * weight
    grads = torch.autograd.grad(scaler.scale(weighted) if scaler is not None else weighted, params, allow_unused=True)
    return loss.detach().cpu(), metrics, grads


class Job(NamedTuple):
    """One part of a step's micro-batch: its items and their share of the batch."""

    step: int
    part: torch.Tensor
    weight: float
    in_place: bool  # the micro-batch's only part: its gradient goes straight into .grad


class ShardRunner:
    """Runs a step's shards: at once in threads, or in turn.

    Each shard's gradient is its own ``torch.autograd.grad``, and the step sums them in shard
    order, so the result does not depend on how many ran at once. Concurrency needs the GIL-free
    CPU kernels of torch and no shared random stream: a model that draws random numbers in its
    forward (dropout) runs its shards in turn, as does one on an accelerator. Processes of their
    own are ranks (``nproc_per_cell``, :mod:`dpo_engine.distributed`).

    The process's torch threads are split between the shards running at once: one each on a
    2-core machine with 2 shards (the step's ops are then never split across cores, and the
    weights are bit-identical to the shards run in turn on one thread), several each on a
    machine with more cores, where a larger model's matmuls gain from them.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._own_threads = torch.get_num_threads()
        self.threads_each = max(1, self._own_threads // threads)
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix="shard", initializer=torch.set_num_threads, initargs=(self.threads_each,),
        ) if threads > 1 else None

    @classmethod
    def for_model(cls, model: nn.Module, shards: int, device: torch.device) -> "ShardRunner":
        if shards == 1 or device.type != "cpu" or draws_random_numbers(model):
            return cls(1)
        return cls(min(shards, torch.get_num_threads()))

    def map(self, fn: Callable, items: Sequence) -> list:
        """``fn`` of each item, in order: at once in the threads when there are any, else in turn."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def gradients(self, run_part: Callable[[Job], Part], jobs: Sequence[Job]) -> list[Part]:
        """``run_part`` of each job, in job order."""
        return self.map(run_part, jobs)

    @contextmanager
    def step(self) -> Iterator[None]:
        """A training step's span: while shards run at once, this thread's own torch work (summing
        the gradients, clipping, the optimiser) runs on a shard's share of the threads too (one on
        2 cores). With ``OMP_WAIT_POLICY=PASSIVE`` a second OpenMP thread sleeps between parallel
        regions, and waking it for each small op made them slower: AdamW took 2.4 ms per step on 2
        threads against 0.33 ms on 1 (the sentiment task's GPT-2, an ad hoc timing)."""
        if self._pool is None:
            yield
            return
        torch.set_num_threads(self.threads_each)
        try:
            yield
        finally:
            # Also the count of threads started later, which the shard threads' own setting changed.
            torch.set_num_threads(self._own_threads)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


# The loss's key beside a step's metrics in their one all-reduce (no metric is named so).
LOSS_KEY = "\0loss"


def optimise(
    model: nn.Module,
    config: OptimConfig,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    *,
    n_items: int,
    generator: torch.Generator,
    log: TrainLog,
    label: str,
    progress: bool = True,
    checkpoint: CheckpointFn | None = None,
    n_checkpoints: int = 0,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    log_every: int = 1,
    lengths: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    precision: Precision = FP32,
) -> nn.Module:
    """The loop every method with a loss shares: minibatch indices → ``loss_fn(idx)`` → AdamW step.

    ``loss_fn`` returns the mean loss and extra metrics to log (as ``train/<name>``); a non-finite
    loss stops the run with :class:`NonFiniteLossError`; the model is evaluated through
    ``checkpoint`` at ``n_checkpoints`` evenly spaced steps, the last one included. ``lengths``
    (tokens per item) buckets the batches by length (:func:`minibatches`) and balances shards.

    A step's batch is split into ``config.accumulation_steps`` micro-batches, run in turn, and
    each of them into ``config.shards`` shards, run at once on the CPU's threads
    (:class:`ShardRunner`). Each part's loss is weighted by its share of the batch, so the
    gradient is the whole batch's: its share of the items, or of ``weights`` when the loss is a
    mean over something else (SFT's is over completion tokens: ``weights`` counts them per item).

    ``tokens`` (non-pad tokens each item puts through the forward and backward passes; default
    ``lengths``) and the steps are added to ``log.compute``, the cell's compute.

    Under a process group (:mod:`dpo_engine.distributed`), each rank takes its run of every
    micro-batch, weighted by its share of the whole batch as a shard is, and the ranks' gradients
    are summed before the step: every rank draws the same batches (the same ``generator``) and
    takes the same step. The loss and metrics logged are the whole batch's.

    ``precision`` (:mod:`dpo_bench.precision`): the forward passes under its autocast, the weights
    and the optimiser in float32, fp16's loss scaled before each backward pass.
    """
    model.train()
    ranks = Ranks.current()
    ranks.broadcast_parameters(model)
    optimizer = make_optimizer(model, config.lr, weight_decay)
    schedule = warmup_schedule(optimizer, config.warmup_steps, config.steps, config.lr_schedule)
    evals = set(checkpoint_steps(config.steps, n_checkpoints)) if checkpoint and n_checkpoints else set()
    batches = minibatches(n_items, config.batch_size, generator, lengths if config.group_by_length else None)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    runner = ShardRunner.for_model(model, config.shards, device)
    scaler = precision.scaler()
    average = WeightAverage(model, config.ema)

    def run_part(job: Job) -> Part:
        """One part's loss and metrics, and its weighted gradient: into ``.grad`` when it is the
        micro-batch's only part (``in_place``), else returned, for the step to sum in order."""
        if not job.in_place:
            return part_gradient(loss_fn, params, job.part, job.weight, precision, scaler)
        with precision.autocast():
            part_loss, part_metrics = loss_fn(job.part)
        scaler.scale(part_loss * job.weight).backward()
        return part_loss.detach().cpu(), part_metrics, ()

    def batch_gradients(step: int, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's gradient into ``.grad``; returns its loss and metrics. Each part is weighted
        by its share of the batch's items, or of their ``weights``."""
        total = float(weights[idx].sum()) if weights is not None else 0.0

        def share(part: torch.Tensor) -> float:
            return float(weights[part].sum()) / total if total > 0 else len(part) / len(idx)

        loss, metrics = torch.zeros(()), {}
        for micro in idx.chunk(config.accumulation_steps):
            own = rank_part(micro, ranks, lengths)
            parts = shard_indices(own, config.shards, lengths)
            # A rank left without items (a batch smaller than the ranks) runs one at weight 0: no
            # gradient, and the same metrics' names as the others for their all-reduce.
            jobs = [Job(step, part, share(part), len(parts) == 1) for part in parts] if len(own) else [Job(step, micro[:1], 0.0, True)]
            results = [run_part(jobs[0])] if len(jobs) == 1 else runner.gradients(run_part, jobs)
            for job, (part_loss, part_metrics, grads) in zip(jobs, results):  # in part order, whichever finished first
                if not ranks.distributed:  # under ranks, the whole batch's loss is checked below, on every rank alike
                    check_finite(part_loss, label, step, log)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
                loss = loss + part_loss * job.weight
                for k, v in part_metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v * job.weight
        if ranks.distributed:
            ranks.sum_gradients(params)
            summed = ranks.sum_scalars({**metrics, LOSS_KEY: float(loss)})
            loss = torch.tensor(summed.pop(LOSS_KEY))
            metrics = summed
            check_finite(loss, label, step, log)
        return loss, metrics

    try:
        bar = tqdm(range(1, config.steps + 1), desc=label, disable=not progress, leave=False)
        for step in bar:
            with runner.step():
                idx = next(batches)
                optimizer.zero_grad(set_to_none=True)
                loss, metrics = batch_gradients(step, idx)
                scaler.unscale(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                scaler.step(optimizer)
                schedule.step()
                average.update()
            counted = tokens if tokens is not None else lengths
            log.compute.add(steps=1, tokens=int(counted[idx].sum()) if counted is not None else 0)
            if step % log_every == 0 or step == config.steps:
                log.log(step, len(idx), **{"train/loss": loss.item(), **{f"train/{k}": v for k, v in metrics.items()}})
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            if step in evals:
                evaluated = average.current()
                evaluated.eval()
                checkpoint(step, evaluated)
                model.train()
    finally:
        runner.close()
    return average.finish().eval()
