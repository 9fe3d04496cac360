"""Mixed precision for training: autocast to bfloat16 or float16 with float32 master weights.

The weights, their gradients and the optimiser's state stay float32; the forward passes of
training (and PPO's rollouts and scoring) run under ``torch.autocast``, so matmuls take the lower
precision. float16's narrow range needs the loss scaled before the backward pass and the
gradients unscaled before clipping (``torch.amp.GradScaler``); bfloat16 has float32's range and
needs none. Evaluation runs in float32 whatever the precision, so that KL and rewards are measured
alike across runs. Weights stored in a lower precision are another choice (the hf task's
``dtype``), with less memory and more rounding in every update.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, fp32 elsewhere (the CPU's bfloat16
    matmuls are slower than float32's on most machines); anything else as named."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class Precision:
    """A resolved precision (``fp32``, ``bf16`` or ``fp16``) on a device type (``cpu``, ``cuda``, ...)."""

    name: str = "fp32"
    device_type: str = "cpu"

    @classmethod
    def of(cls, precision: str, device: torch.device) -> "Precision":
        return cls(resolve_precision(precision, device), device.type)

    def autocast(self) -> ContextManager:
        """The forward passes' context: autocast to the lower precision, or nothing for fp32."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def scaler(self) -> "LossScaler":
        """What scales a loss before its backward pass: a GradScaler for fp16, else the identity."""
        return LossScaler(torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None)


FP32 = Precision()


class LossScaler:
    """``torch.amp.GradScaler``'s four calls, each the identity without a scaler: ``scale`` the loss
    before backward, ``unscale`` the gradients before clipping, ``step`` (skipped by the scaler when
    a gradient is not finite), ``update`` the scale."""

    def __init__(self, scaler: torch.amp.GradScaler | None = None):
        self.scaler = scaler

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
