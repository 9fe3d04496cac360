"""Supervised fine-tuning: next-token likelihood on completions, the prompt masked out.

Used to train the reference on the task's corpus, and as two of the DPO paper's baselines:
``sft`` (the reference itself) and ``preferred_ft`` (SFT on the chosen completions).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from ..configs import field, non_negative
from ..logprobs import collate, token_logps
from ..policy import apply_lora, freeze_first_blocks
from ..precision import FP32, Precision
from ..training import SHARDS_DOC, CheckpointFn, OptimConfig, TrainLog, optimise
from .base import MethodContext, ModelPolicy, register_method


@dataclass(frozen=True)
class SFTConfig(OptimConfig):
    """Maximum-likelihood training on (prompt, completion) pairs."""

    steps: int = field(1500, "optimiser steps")
    lr: float = field(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = field(100, "linear warm-up steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    # SFT runs alone, before anything else: two shards keep both cores of a 2-core machine busy.
    shards: int = field(2, SHARDS_DOC)

    def __post_init__(self) -> None:
        super().__post_init__()
        non_negative("weight_decay", self.weight_decay)


def sft_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token (prompt tokens carry no loss)."""
    logps = token_logps(model, batch)
    n_tokens = batch.completion_mask[:, 1:].sum().clamp(min=1)
    return -logps.sum() / n_tokens


@dataclass(frozen=True, eq=False)
class SFTBatchLoss:
    """SFT's loss on the items ``idx``."""

    model: nn.Module
    prompts: Sequence[Sequence[int]]
    completions: Sequence[Sequence[int]]
    pad_id: int
    device: torch.device

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        idx = idx.tolist()
        batch = collate([self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.pad_id).to(self.device)
        return sft_loss(self.model, batch), {}


def supervised_finetune(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    config: SFTConfig,
    *,
    pad_id: int,
    generator: torch.Generator,
    log: TrainLog,
    checkpoint: CheckpointFn | None = None,
    n_checkpoints: int = 0,
    label: str = "sft",
    progress: bool = True,
    precision: Precision = FP32,
) -> nn.Module:
    """Train ``model`` in place to maximise log p(completion | prompt); returns it."""
    loss_fn = SFTBatchLoss(model, prompts, completions, pad_id, next(model.parameters()).device)
    return optimise(
        model, config, loss_fn, n_items=len(prompts), generator=generator, log=log, label=label, progress=progress,
        checkpoint=checkpoint, n_checkpoints=n_checkpoints, weight_decay=config.weight_decay, log_every=10,
        lengths=torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)]),
        # The loss is a mean over predicted completion tokens (a first token after an empty prompt has no prediction).
        weights=torch.tensor([len(c) - (len(c) > 0 and len(p) == 0) for p, c in zip(prompts, completions)], dtype=torch.float64),
        precision=precision,
    )


@dataclass(frozen=True)
class ReferenceConfig:
    """The SFT model itself: no training."""


@register_method("sft", description="the SFT model itself (the reference); every other method starts from it", config=ReferenceConfig,
                 role="reference")
def train_reference_method(ctx: MethodContext, config: ReferenceConfig) -> ModelPolicy:
    ctx.checkpoint(0, ctx.reference)
    return ModelPolicy(ctx.reference, ctx.task)


@dataclass(frozen=True)
class PreferredFTConfig(SFTConfig):
    """SFT on the chosen completions only (the DPO paper's "Preferred-FT")."""

    steps: int = field(300, "optimiser steps")
    lr: float = field(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int = field(20, "linear warm-up steps")
    # A grid cell runs on one thread of a worker: shards would only run in turn.
    shards: int = field(1, SHARDS_DOC)


@register_method(
    "preferred_ft",
    description="maximum likelihood on the chosen completions (DPO paper's Preferred-FT baseline)",
    config=PreferredFTConfig,
    needs=("preferences",),
    role="baseline",
    data_parallel=True,
)
def train_preferred_ft(ctx: MethodContext, config: PreferredFTConfig) -> ModelPolicy:
    prefs = ctx.preferences
    prompts, completions = split_batch(prefs.chosen)
    policy = trainable_copy(ctx)
    supervised_finetune(
        policy, prompts, completions, config, pad_id=ctx.task.pad_id, generator=ctx.generator, log=ctx.log,
        checkpoint=ctx.checkpoint, n_checkpoints=ctx.n_checkpoints, label=ctx.label, progress=ctx.progress,
        precision=ctx.precision,
    )
    return ModelPolicy(policy, ctx.task)


def trainable_copy(ctx: MethodContext) -> nn.Module:
    """A trainable copy of the reference, with the context's frozen blocks fixed."""
    policy = copy.deepcopy(ctx.reference)
    for p in policy.parameters():
        p.requires_grad_(True)
    if ctx.freeze_blocks or ctx.freeze_embeddings:
        freeze_first_blocks(policy, ctx.freeze_blocks, ctx.freeze_embeddings)
    # A task that fine-tunes through LoRA adapters (the hf task's `lora`) does so in every method.
    lora = getattr(getattr(ctx.task, "config", None), "lora", None)
    if lora is not None and getattr(lora, "r", 0):
        policy = apply_lora(policy, lora)
    policy.train()
    return policy


def split_batch(batch) -> tuple[list[list[int]], list[list[int]]]:
    """Back from a collated batch to (prompt ids, completion ids) lists."""
    prompts, completions = [], []
    for ids, att, comp in zip(batch.input_ids, batch.attention_mask, batch.completion_mask):
        real = att.bool()
        is_completion = comp.bool()
        prompts.append(ids[real & ~is_completion].tolist())
        completions.append(ids[is_completion].tolist())
    return prompts, completions
