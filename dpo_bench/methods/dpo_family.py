"""The DPO family: one trainer, one method per loss in :mod:`dpo_bench.losses`.

Each loss of the registry becomes a method of the same name whose config is the shared
:class:`DPOConfig` plus that loss's own hyper-parameters. Reference log-probs come precomputed
in the context (computed once per reference and dataset, not every step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from ..configs import field, positive
from ..logprobs import concat_batches, item_tokens, longest_rows, sequence_logps
from ..losses import LOSSES, LossSpec
from ..training import OptimConfig, optimise
from .base import MethodContext, ModelPolicy, register_method
from .sft import trainable_copy


@dataclass(frozen=True)
class DPOConfig(OptimConfig):
    """Shared hyper-parameters of the DPO-family trainer."""

    beta: float = field(0.1, "β: strength of the implicit KL constraint (larger stays closer to the reference)")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("beta", self.beta)


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
    pad = ctx.task.pad_id
    ranked_batches, ranked_ref = prefs.ranked, prefs.ref_ranked_logps
    if spec.listwise and not ranked_batches:
        # Pairs are rankings of K = 2.
        ranked_batches = [prefs.chosen, prefs.rejected]
        ranked_ref = torch.stack([prefs.ref_chosen_logps, prefs.ref_rejected_logps], dim=1)

    def listwise_loss(idx: torch.Tensor):
        ranked = [b.select(idx) for b in ranked_batches]
        batch = ranked[0]
        for b in ranked[1:]:
            batch = concat_batches(batch, b, pad)
        # One forward over all K completions; rows regrouped to (B, K), best first.
        logps = sequence_logps(policy, batch.trim().to(device)).view(len(ranked), -1).T
        ref = ranked_ref[idx].to(device)
        losses = spec.fn(logps, ref, beta=config.beta, params=params)
        return losses, logps[:, 0], logps[:, -1], ref[:, 0], ref[:, -1]

    def pairwise_loss(idx: torch.Tensor):
        chosen_b, rejected_b = prefs.chosen.select(idx), prefs.rejected.select(idx)
        # Chosen and rejected in one forward pass, padded to the batch's longest row.
        logps = sequence_logps(policy, concat_batches(chosen_b, rejected_b, pad).trim().to(device))
        chosen, rejected = logps[: len(idx)], logps[len(idx):]
        ref_c, ref_r = prefs.ref_chosen_logps[idx].to(device), prefs.ref_rejected_logps[idx].to(device)
        losses = spec.fn(
            chosen, rejected, ref_c, ref_r, beta=config.beta, params=params,
            chosen_lengths=chosen_b.completion_lengths.to(device), rejected_lengths=rejected_b.completion_lengths.to(device),
        )
        return losses, chosen, rejected, ref_c, ref_r

    def loss_fn(idx: torch.Tensor):
        losses, chosen, rejected, ref_c, ref_r = (listwise_loss if spec.listwise else pairwise_loss)(idx)
        with torch.no_grad():
            margin = config.beta * ((chosen - ref_c) - (rejected - ref_r))
        return losses.mean(), {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}

    batches = ranked_batches if spec.listwise else [prefs.chosen, prefs.rejected]
    lengths = longest_rows(*batches)
    optimise(
        policy, config, loss_fn, n_items=len(lengths), generator=ctx.generator,
        log=ctx.log, label=ctx.label, progress=ctx.progress, checkpoint=ctx.checkpoint, n_checkpoints=ctx.n_checkpoints,
        max_grad_norm=10.0, lengths=lengths, tokens=item_tokens(*batches), precision=ctx.precision,
    )
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
        data_parallel=True,
    )(lambda ctx, config: train_dpo_family(ctx, config, spec))


for _name in list(LOSSES):
    register_loss_method(_name)
