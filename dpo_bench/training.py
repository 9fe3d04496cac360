"""Mechanics every trainer shares: optimiser, learning-rate schedule, minibatches, the NaN guard,
checkpoint schedule and the training log."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from reward.train import adamw, minibatches

from .configs import field as cfield
from .configs import non_negative, positive


CheckpointFn = Callable[[int, nn.Module], None]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the method, step and last finite values."""


@dataclass
class TrainLog:
    """Training curves: ``records`` of (step, metric, value, n)."""

    records: list[tuple[int, str, float, int]] = field(default_factory=list)
    last_finite: dict[str, float] = field(default_factory=dict)

    def log(self, step: int, n: int = 0, **metrics: float) -> None:
        for name, value in metrics.items():
            value = float(value)
            self.records.append((step, name, value, n))
            if math.isfinite(value):
                self.last_finite[name] = value


def check_finite(loss: torch.Tensor, what: str, step: int, log: TrainLog) -> None:
    if not torch.isfinite(loss).all():
        last = ", ".join(f"{k}={v:.4g}" for k, v in sorted(log.last_finite.items())) or "none"
        raise NonFiniteLossError(f"{what}: loss is {loss.item()} at step {step}; last finite values: {last}")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return adamw(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant: the DPO paper's schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def checkpoint_steps(total: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` evenly spaced steps ending at ``total`` (step 0, the start, is the reference)."""
    n = max(1, min(n_checkpoints, total))
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)})



@dataclass(frozen=True)
class OptimConfig:
    """The optimiser settings every gradient-trained method shares."""

    steps: int = cfield(300, "optimiser steps")
    batch_size: int = cfield(64, "examples (sequences, pairs or rankings) per step")
    lr: float = cfield(5e-5, "peak learning rate (AdamW)")
    warmup_steps: int = cfield(20, "linear warm-up steps")
    accumulation_steps: int = cfield(1, "split each step's batch into this many micro-batches (gradient accumulation)")
    group_by_length: bool = cfield(True, "batch items of similar length together: less padding, faster steps (transformers' group_by_length)")

    def __post_init__(self) -> None:
        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        non_negative("warmup_steps", self.warmup_steps)
        positive("accumulation_steps", self.accumulation_steps)
        if self.accumulation_steps > self.batch_size:
            raise ValueError(f"accumulation_steps ({self.accumulation_steps}) must be <= batch_size ({self.batch_size})")


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
) -> nn.Module:
    """The loop every method with a loss shares: minibatch indices → ``loss_fn(idx)`` → AdamW step.

    ``loss_fn`` returns the mean loss and extra metrics to log (as ``train/<name>``); a non-finite
    loss stops the run with :class:`NonFiniteLossError`; the model is evaluated through
    ``checkpoint`` at ``n_checkpoints`` evenly spaced steps, the last one included. ``lengths``
    (tokens per item) buckets the batches by length (:func:`minibatches`).
    """
    model.train()
    optimizer = make_optimizer(model, config.lr, weight_decay)
    schedule = warmup_schedule(optimizer, config.warmup_steps)
    evals = set(checkpoint_steps(config.steps, n_checkpoints)) if checkpoint and n_checkpoints else set()
    batches = minibatches(n_items, config.batch_size, generator, lengths if config.group_by_length else None)
    for step in tqdm(range(1, config.steps + 1), desc=label, disable=not progress, leave=False):
        idx = next(batches)
        optimizer.zero_grad(set_to_none=True)
        # Micro-batches weighted by their share of the batch: the gradient equals the whole batch's.
        loss, metrics = torch.zeros(()), {}
        for chunk in idx.chunk(config.accumulation_steps):
            chunk_loss, chunk_metrics = loss_fn(chunk)
            check_finite(chunk_loss, label, step, log)
            weight = len(chunk) / len(idx)
            (chunk_loss * weight).backward()
            loss = loss + chunk_loss.detach().cpu() * weight
            for k, v in chunk_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v * weight
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps:
            log.log(step, len(idx), **{"train/loss": loss.item(), **{f"train/{k}": v for k, v in metrics.items()}})
        if step in evals:
            model.eval()
            checkpoint(step, model)
            model.train()
    model.eval()
    return model
