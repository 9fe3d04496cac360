"""Unlikelihood: raise the likelihood of the chosen completion, lower the rejected one's.

Loss per pair = −log p(y_w|x)/|y_w| − α·Σ_t log(1 − p(y_l,t | x, y_l,<t))/|y_l| (Welleck et al.
2019, the DPO paper's "Unlikelihood" baseline). The penalty is taken per token, as Welleck et al.
do: the sequence probability p(y_l|x) is so small that log(1 − p(y_l|x)) carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..configs import field, non_negative, positive
from ..logprobs import concat_batches, token_logps
from ..training import check_finite, checkpoint_steps, make_optimizer, minibatches, warmup_schedule
from .base import MethodContext, ModelPolicy, register_method
from .sft import trainable_copy


@dataclass(frozen=True)
class UnlikelihoodConfig:
    """Likelihood on chosen, token-level unlikelihood on rejected completions."""

    alpha: float = field(0.5, "α: weight of the unlikelihood term on the rejected completion")
    steps: int = field(200, "optimiser steps")
    batch_size: int = field(64, "preference pairs per step")
    lr: float = field(5e-5, "peak learning rate (AdamW)")
    warmup_steps: int = field(20, "linear warm-up steps")

    def __post_init__(self) -> None:
        non_negative("alpha", self.alpha)
        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        non_negative("warmup_steps", self.warmup_steps)


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
)
def train_unlikelihood(ctx: MethodContext, config: UnlikelihoodConfig) -> ModelPolicy:
    prefs = ctx.preferences
    policy = trainable_copy(ctx)
    optimizer = make_optimizer(policy, config.lr)
    schedule = warmup_schedule(optimizer, config.warmup_steps)
    evals = set(checkpoint_steps(config.steps, ctx.n_checkpoints))
    batches = minibatches(len(prefs), config.batch_size, ctx.generator)
    for step in tqdm(range(1, config.steps + 1), desc=ctx.label, disable=not ctx.progress, leave=False):
        idx = next(batches)
        batch = concat_batches(prefs.chosen.select(idx), prefs.rejected.select(idx), ctx.task.pad_id).trim().to(ctx.device)
        logps = token_logps(policy, batch)
        mask = batch.completion_mask[:, 1:].float()
        n = len(idx)
        loss = unlikelihood_loss(logps[:n], mask[:n], logps[n:], mask[n:], config.alpha).mean()
        check_finite(loss, ctx.label, step, ctx.log)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ctx.log.log(step, n, **{"train/loss": loss.item()})
        if step in evals:
            policy.eval()
            ctx.checkpoint(step, policy)
            policy.train()
    policy.eval()
    return ModelPolicy(policy, ctx.task)
