"""Training the reward model with the Bradley-Terry loss −log σ(r(x, y_w) − r(x, y_l))."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dpo_engine.batching import longest_rows
from dpo_engine.optim import adamw, minibatches

from .bradley_terry import bt_loss, pairwise_accuracy
from .model import RewardModel


@dataclass(frozen=True)
class PairTensors:
    """N preference pairs as right- or left-padded token ids with attention masks."""

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "PairTensors":
        return PairTensors(self.chosen_ids[idx], self.chosen_mask[idx], self.rejected_ids[idx], self.rejected_mask[idx])


@dataclass(frozen=True)
class RewardTrainConfig:
    """Bradley-Terry reward-model training."""

    steps: int = field(default=300, metadata={"doc": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"doc": "preference pairs per step"})
    lr: float = field(default=1e-4, metadata={"doc": "learning rate (AdamW)"})
    heldout_fraction: float = field(default=0.1, metadata={"doc": "share of pairs held out to measure accuracy"})
    group_by_length: bool = field(default=True, metadata={"doc": "batch pairs of similar length together: less padding, faster steps"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


def _pad_pair(ids_a, mask_a, ids_b, mask_b, pad_id: int):
    width = max(ids_a.shape[1], ids_b.shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return torch.cat([pad(ids_a, pad_id), pad(ids_b, pad_id)]), torch.cat([pad(mask_a, 0), pad(mask_b, 0)])


def pair_scores(model: RewardModel, pairs: PairTensors, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w), r(x, y_l)) with one forward pass over both."""
    ids, mask = _pad_pair(pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask, pad_id)
    used = mask.any(0)
    ids, mask = ids[:, used], mask[:, used]
    scores = model(ids, mask)
    n = len(pairs)
    return scores[:n], scores[n:]


def train_reward_model(
    model: RewardModel,
    pairs: PairTensors,
    config: RewardTrainConfig,
    *,
    pad_id: int,
    generator: torch.Generator,
    log=None,
    progress: bool = True,
    ranks=None,
    precision=None,
) -> RewardModel:
    """Fit ``model`` to the pairs with the Bradley-Terry loss; ``log(step, **metrics)`` gets curves.

    The pairs are reshuffled every epoch and cut into ``config.batch_size`` batches, of pairs of
    similar length when ``config.group_by_length`` (a pair's length: its longer row).

    ``ranks`` (a ``dpo_engine.distributed.Ranks``: data parallelism on torch.distributed): each
    rank takes its part of every batch, weighted by its share, and the ranks' gradients are summed
    before the step; every rank draws the same batches from ``generator``. ``precision`` (a
    ``dpo_bench.precision.Precision``): the forward passes under its autocast, the loss scaled by its
    scaler (fp16); the weights and the optimiser stay float32.
    """
    device = model.head.weight.device
    model.train()
    if ranks is not None:
        ranks.broadcast_parameters(model)
    optimizer = adamw(model.parameters(), lr=config.lr)
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    scaler = precision.scaler() if precision is not None else None
    lengths = longest_rows(pairs.chosen_mask, pairs.rejected_mask) if config.group_by_length else None
    batches = minibatches(len(pairs), config.batch_size, generator, lengths)
    bar = tqdm(range(1, config.steps + 1), desc="reward model", disable=not progress, leave=False)
    for step in bar:
        idx = next(batches)
        own = ranks.part(idx) if ranks is not None else idx
        # A rank left without pairs (a batch smaller than the ranks) scores one at weight 0.
        share = len(own) / len(idx)
        batch = pairs.select(own if len(own) else idx[:1])
        batch = PairTensors(*(t.to(device) for t in (batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask)))
        with autocast():
            r_w, r_l = pair_scores(model, batch, pad_id)
        r_w, r_l = r_w.float(), r_l.float()
        loss = bt_loss(r_w, r_l).mean()
        accuracy = pairwise_accuracy(r_w.detach(), r_l.detach())
        if ranks is not None and ranks.distributed:
            loss = loss * share
            summed = ranks.sum_scalars({"loss": loss.item(), "accuracy": accuracy * share})
            shown, accuracy = summed["loss"], summed["accuracy"]
        else:
            shown = loss.item()
        if not math.isfinite(shown):
            raise FloatingPointError(f"reward model: loss is {shown} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if ranks is not None:
            ranks.sum_gradients([p for p in model.parameters() if p.requires_grad])
        if scaler is not None:
            scaler.unscale(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if step % 10 == 0 or step == config.steps:
            bar.set_postfix(loss=f"{shown:.4g}", refresh=False)
            if log is not None:
                log(step, len(idx), **{"train/loss": shown, "train/accuracy": accuracy})
    model.eval()
    return model


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, pairs: PairTensors, pad_id: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected for every pair, shape (N,) each, on the CPU."""
    model.eval()
    device = model.head.weight.device
    out_w, out_l = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.select(torch.arange(start, min(start + batch_size, len(pairs))))
        batch = PairTensors(*(t.to(device) for t in (batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask)))
        r_w, r_l = pair_scores(model, batch, pad_id)
        out_w.append(r_w.float().cpu())
        out_l.append(r_l.float().cpu())
    return torch.cat(out_w), torch.cat(out_l)
