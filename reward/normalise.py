"""Standardising a scorer's scores on a reference sample: r̂ = (r − mean) / std.

A Bradley-Terry reward model is identified only up to a shift (and, with a learned temperature,
a scale), so its raw scores have no natural unit: on the default task they spread about four times
as widely as the gold reward's on the same completions. A KL coefficient is a price in reward
units, so PPO reads both rewards standardised on the SFT model's samples (Ziegler et al. 2019,
Stiennon et al. 2020, Huang et al. 2024 "The N+ implementation details of RLHF with PPO": the
reward model's scores normalised to mean 0, std 1 on SFT samples): the same kl_coef is then the
same penalty against either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Normaliser:
    """r ↦ (r − mean) / std, fitted on ``n`` scores."""

    mean: float
    std: float
    n: int

    @classmethod
    def fit(cls, scores: Any) -> "Normaliser":
        """Mean and population standard deviation (ddof 0) of ``scores``, so that the normalised
        scores have exactly mean 0 and std 1 on them. A constant scorer (std 0) is only centred."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"cannot fit a normaliser on {values.size} scores, some of them not finite" if values.size
                             else "cannot fit a normaliser on no scores")
        std = float(values.std())
        return cls(float(values.mean()), std if std > 0 else 1.0, int(values.size))

    def __call__(self, scores: Any) -> Any:
        """(scores − mean) / std, for a tensor or an array (same type and shape)."""
        return (scores - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normaliser":
        return cls(float(data["mean"]), float(data["std"]), int(data["n"]))


def normalised_head(weight: torch.Tensor, bias: torch.Tensor, normaliser: Normaliser) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head whose output is ``normaliser`` applied to the head (w, b)'s: w/std and
    (b − mean)/std, since (w·h + b − mean)/std = (w/std)·h + (b − mean)/std."""
    return weight / normaliser.std, (bias - normaliser.mean) / normaliser.std
