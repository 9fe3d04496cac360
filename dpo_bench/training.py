"""Mechanics every trainer shares: optimiser, learning-rate schedule, minibatches, the NaN guard,
checkpoint schedule and the training log."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


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
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all frozen?)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant: the DPO paper's schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over ``n`` items, reshuffled every epoch."""
    if n == 0:
        raise ValueError("no training examples")
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def checkpoint_steps(total: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` evenly spaced steps ending at ``total`` (step 0, the start, is the reference)."""
    n = max(1, min(n_checkpoints, total))
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)})


CheckpointFn = Callable[[int, nn.Module], None]
