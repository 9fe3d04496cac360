"""The DPO family: one trainer, one method per loss in :mod:`dpo_bench.losses`.

Each loss of the registry becomes a method of the same name whose config is the shared
:class:`DPOConfig` plus that loss's own hyper-parameters. Reference log-probs come precomputed
in the context (computed once per reference and dataset, not every step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from ..configs import field, non_negative, positive
from ..logprobs import concat_batches, sequence_logps
from ..losses import LOSSES, LossSpec
from ..training import check_finite, checkpoint_steps, make_optimizer, minibatches, warmup_schedule
from .base import MethodContext, ModelPolicy, register_method
from .sft import trainable_copy


@dataclass(frozen=True)
class DPOConfig:
    """Shared hyper-parameters of the DPO-family trainer."""

    beta: float = field(0.1, "β: strength of the implicit KL constraint (larger stays closer to the reference)")
    steps: int = field(300, "optimiser steps")
    batch_size: int = field(64, "preference pairs (or rankings) per step")
    lr: float = field(5e-5, "peak learning rate (AdamW)")
    warmup_steps: int = field(20, "linear warm-up steps")

    def __post_init__(self) -> None:
        positive("beta", self.beta)
        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        non_negative("warmup_steps", self.warmup_steps)


def loss_params(spec: LossSpec, config: DPOConfig):
    """The loss's own hyper-parameter object, read from the merged method config."""
    if spec.params is None:
        return None
    return spec.params(**{f.name: getattr(config, f.name) for f in fields(spec.params)})


def config_for_loss(spec: LossSpec) -> type:
    """``DPOConfig`` extended by the fields of the loss's parameter dataclass."""
    if spec.params is None or not fields(spec.params):
        extra = []
    else:
        extra = [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata)) for f in fields(spec.params)]

    def __post_init__(self) -> None:
        DPOConfig.__post_init__(self)
        loss_params(spec, self)  # validates the loss's fields

    name = "".join(part.capitalize() for part in spec.name.split("_")) + "Config"
    cls = dataclasses.make_dataclass(name, extra, bases=(DPOConfig,), frozen=True, namespace={"__post_init__": __post_init__})
    cls.__doc__ = f"{spec.description} ({spec.citation})"
    return cls


def train_dpo_family(ctx: MethodContext, config: DPOConfig, spec: LossSpec) -> ModelPolicy:
    prefs = ctx.preferences
    policy = trainable_copy(ctx)
    device = ctx.device
    params = loss_params(spec, config)
    optimizer = make_optimizer(policy, config.lr)
    schedule = warmup_schedule(optimizer, config.warmup_steps)
    evals = set(checkpoint_steps(config.steps, ctx.n_checkpoints))
    ranked_batches, ranked_ref = prefs.ranked, prefs.ref_ranked_logps
    if spec.listwise and not ranked_batches:
        # Pairs are rankings of K = 2.
        ranked_batches = [prefs.chosen, prefs.rejected]
        ranked_ref = torch.stack([prefs.ref_chosen_logps, prefs.ref_rejected_logps], dim=1)
    n_items = len(ranked_batches[0]) if spec.listwise else len(prefs)
    batches = minibatches(n_items, config.batch_size, ctx.generator)
    pad = ctx.task.pad_id
    for step in tqdm(range(1, config.steps + 1), desc=ctx.label, disable=not ctx.progress, leave=False):
        idx = next(batches)
        if spec.listwise:
            ranked = [b.select(idx) for b in ranked_batches]
            batch = ranked[0]
            for b in ranked[1:]:
                batch = concat_batches(batch, b, pad)
            logps = sequence_logps(policy, batch.trim().to(device)).view(len(ranked), -1).T  # (B, K)
            ref = ranked_ref[idx].to(device)
            losses = spec.fn(logps, ref, beta=config.beta, params=params)
            chosen, rejected, ref_c, ref_r = logps[:, 0], logps[:, -1], ref[:, 0], ref[:, -1]
        else:
            chosen_b, rejected_b = prefs.chosen.select(idx), prefs.rejected.select(idx)
            batch = concat_batches(chosen_b, rejected_b, pad).trim().to(device)
            logps = sequence_logps(policy, batch)
            chosen, rejected = logps[: len(idx)], logps[len(idx):]
            ref_c, ref_r = prefs.ref_chosen_logps[idx].to(device), prefs.ref_rejected_logps[idx].to(device)
            losses = spec.fn(
                chosen, rejected, ref_c, ref_r, beta=config.beta, params=params,
                chosen_lengths=chosen_b.completion_lengths.to(device),
                rejected_lengths=rejected_b.completion_lengths.to(device),
            )
        loss = losses.mean()
        check_finite(loss, ctx.label, step, ctx.log)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            margin = config.beta * ((chosen - ref_c) - (rejected - ref_r))
        ctx.log.log(
            step, len(idx),
            **{"train/loss": loss.item(), "train/accuracy": (margin > 0).float().mean().item(),
               "train/margin": margin.mean().item()},
        )
        if step in evals:
            policy.eval()
            ctx.checkpoint(step, policy)
            policy.train()
    policy.eval()
    return ModelPolicy(policy, ctx.task)


def register_loss_method(name: str) -> None:
    """Make the loss ``name`` of :data:`dpo_bench.losses.LOSSES` a method of the same name."""
    spec = LOSSES[name]
    register_method(
        spec.name,
        description=f"{spec.description} [{spec.citation}]",
        config=config_for_loss(spec),
        needs=("rankings",) if spec.listwise else ("preferences",),
        strength="beta",
        # Without a reference, β scales the margin but pulls toward nothing.
        stronger_when=None if spec.reference_free else "higher",
    )(lambda ctx, config: train_dpo_family(ctx, config, spec))


for _name in list(LOSSES):
    register_loss_method(_name)
