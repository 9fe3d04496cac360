"""Unlikelihood: raise the likelihood of the chosen completion, lower the rejected one's.

Loss per pair = −log p(y_w|x)/|y_w| − α·Σ_t log(1 − p(y_l,t | x, y_l,<t))/|y_l| (Welleck et al.
2019, the DPO paper's "Unlikelihood" baseline). The penalty is taken per token, as Welleck et al.
do: the sequence probability p(y_l|x) is so small that log(1 − p(y_l|x)) carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ..configs import field, non_negative
from ..logprobs import concat_batches, item_tokens, longest_rows, token_logps
from ..training import OptimConfig, optimise
from .base import MethodContext, ModelPolicy, register_method
from .sft import trainable_copy


@dataclass(frozen=True)
class UnlikelihoodConfig(OptimConfig):
    """Likelihood on chosen, token-level unlikelihood on rejected completions."""

    alpha: float = field(0.5, "α: weight of the unlikelihood term on the rejected completion")
    steps: int = field(200, "optimiser steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        non_negative("alpha", self.alpha)


def unlikelihood_loss(
    chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor, rejected_mask: torch.Tensor, alpha: float,
) -> torch.Tensor:
    """Per-pair loss (B,) from per-token log-probs (B, T) and completion masks (B, T)."""
    nll = -(chosen_token_logps * chosen_mask).sum(-1) / chosen_mask.sum(-1).clamp(min=1)
    # log(1 − p) = log(−expm1(log p)); clamp keeps it finite when p rounds to 1.
    log_one_minus = torch.log(-torch.expm1(rejected_token_logps.clamp(max=-1e-6)))
    ul = -(log_one_minus * rejected_mask).sum(-1) / rejected_mask.sum(-1).clamp(min=1)
    return nll + alpha * ul


@register_method(
    "unlikelihood",
    description="likelihood on chosen plus α·token-level unlikelihood on rejected (DPO paper's Unlikelihood baseline)",
    config=UnlikelihoodConfig,
    needs=("preferences",),
    strength="alpha",
    stronger_when="lower",
    role="baseline",
    data_parallel=True,
)
def train_unlikelihood(ctx: MethodContext, config: UnlikelihoodConfig) -> ModelPolicy:
    prefs = ctx.preferences
    policy = trainable_copy(ctx)

    def loss_fn(idx: torch.Tensor):
        batch = concat_batches(prefs.chosen.select(idx), prefs.rejected.select(idx), ctx.task.pad_id).trim().to(ctx.device)
        logps = token_logps(policy, batch)
        mask = batch.completion_mask[:, 1:].float()
        n = len(idx)
        return unlikelihood_loss(logps[:n], mask[:n], logps[n:], mask[n:], config.alpha).mean(), {}

    optimise(
        policy, config, loss_fn, n_items=len(prefs), generator=ctx.generator, log=ctx.log, label=ctx.label,
        progress=ctx.progress, checkpoint=ctx.checkpoint, n_checkpoints=ctx.n_checkpoints,
        lengths=longest_rows(prefs.chosen, prefs.rejected), tokens=item_tokens(prefs.chosen, prefs.rejected),
        precision=ctx.precision,
    )
    return ModelPolicy(policy, ctx.task)
