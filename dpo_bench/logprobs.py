"""Sequence log-probabilities with the prompt masked out.

Every method needs log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion tokens only. This
module is the one place that computes it, for any padding (left-padded prompts from the sampler,
right-padded pairs from the collator): positions are derived from the attention mask. Two things
keep it cheap without changing a number beyond float rounding: padding is not computed (GPT-2
runs on the real tokens alone, ``reward.trunk``; other models take a batch's rows in groups of
similar length, ``reward.batching``), and the model's output is computed only where a completion
token is predicted: the vocabulary projection for any transformers causal LM, and for GPT-2 the
last block's MLP too (``reward.trunk``).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from reward import batching
from reward.trunk import last_hidden_at, position_ids, selects_positions


@dataclass(frozen=True)
class SequenceBatch:
    """Prompt + completion token ids for B sequences of length T.

    ``completion_mask[b, t]`` is 1 where token t belongs to the completion (its log-prob counts);
    ``attention_mask`` is 1 on every real token (prompt or completion), 0 on padding.
    """

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    completion_mask: torch.Tensor  # (B, T) long

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, index: torch.Tensor | slice) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[index], self.attention_mask[index], self.completion_mask[index])

    def trim(self) -> "SequenceBatch":
        """Drop columns that are padding in every row (pad to the batch's longest, not a global max)."""
        used = self.attention_mask.any(0).nonzero()
        if used.numel() == 0:
            return self
        lo, hi = int(used[0]), int(used[-1]) + 1
        return SequenceBatch(self.input_ids[:, lo:hi], self.attention_mask[:, lo:hi], self.completion_mask[:, lo:hi])


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> SequenceBatch:
    """Right-padded prompt+completion sequences with the completion marked."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = [_ids(p) + _ids(c) for p, c in zip(prompts, completions)]
    length = max(map(len, rows))
    # One tensor from padded lists: a copy into a tensor per row cost ~13 µs a row (0.86 ms for 64, ad hoc).
    ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], dtype=torch.long)
    ends = torch.tensor([len(row) for row in rows])[:, None]
    starts = torch.tensor([len(p) for p in prompts])[:, None]
    col = torch.arange(length)[None, :]
    return SequenceBatch(ids, (col < ends).long(), ((col >= starts) & (col < ends)).long())


def _ids(tokens: Sequence[int]) -> list[int]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)


def concat_batches(a: SequenceBatch, b: SequenceBatch, pad_id: int) -> SequenceBatch:
    """Stack two right-padded batches (chosen on top of rejected) for one forward pass."""
    length = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return SequenceBatch(
        torch.cat([pad(a.input_ids, pad_id), pad(b.input_ids, pad_id)]),
        torch.cat([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
        torch.cat([pad(a.completion_mask, 0), pad(b.completion_mask, 0)]),
    )


def longest_rows(*batches: SequenceBatch) -> torch.Tensor:
    """Per item, the length of its longest row across ``batches`` (row i of each is item i): the
    row that sets the item's padding in a stacked forward pass; what length-grouped batching sorts by."""
    return batching.longest_rows(*(b.attention_mask for b in batches))


def forward(model: nn.Module, batch: SequenceBatch, output_hidden_states: bool = False, **kwargs):
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
        output_hidden_states=output_hidden_states,
        **kwargs,
    )


def gather_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | ≤ t) for t = 0..T-2, shape (B, T-1), from logits (B, T, V)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def keeps_selected_logits(model: nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=<bool (B, T) mask>)`` returns logits for the masked positions only.

    transformers' causal LMs that slice with ``slice_logits_to_keep`` do (flattened to (N, V)); a
    model that takes ``logits_to_keep`` but slices it itself, a wrapper, or the tabular policy does
    not, and gets the full logits.
    """
    cls = type(model)
    cached = _SELECTS_LOGITS.get(cls)
    if cached is None:
        module = sys.modules.get(cls.__module__)
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        cached = _SELECTS_LOGITS[cls] = takes and getattr(module, "slice_logits_to_keep", None) is not None
    return cached


_SELECTS_LOGITS: dict[type, bool] = {}


def token_logps_and_hidden(model: nn.Module, batch: SequenceBatch, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token completion log-probs (B, T-1) in one padded forward pass and, when ``hidden``,
    the last hidden state where they are predicted: (N, D) at ``completion_mask[:, 1:]``'s N
    positions in row-major order (PPO's value head reads it)."""
    mask = batch.completion_mask[:, 1:].bool()
    # Position t predicts token t+1: the model's output is read where a completion token is predicted.
    keep = nn.functional.pad(mask, (0, 1), value=False)
    targets = batch.input_ids[:, 1:][mask]
    if selects_positions(model):
        # The last block's MLP, the LM head and the softmax only at those positions (reward.trunk).
        states = last_hidden_at(model, batch.input_ids, batch.attention_mask, keep)
        return _scatter_logps(model.get_output_embeddings()(states), targets, mask), (states if hidden else None)
    if keeps_selected_logits(model):
        # The LM head and softmax only where a completion token is predicted: the prompt and the
        # padding cost no vocabulary projection.
        out = forward(model, batch, output_hidden_states=hidden, logits_to_keep=keep)
        if out.logits.dim() != 2 or out.logits.shape[0] != int(mask.sum()):
            raise RuntimeError(f"{type(model).__name__} returned logits of shape {tuple(out.logits.shape)} for a logits_to_keep mask")
        logps = _scatter_logps(out.logits, targets, mask)
    else:
        out = forward(model, batch, output_hidden_states=hidden)
        # masked_fill, not multiplication: a padded position may hold -inf (the tabular policy's mask).
        logps = gather_token_logps(out.logits, batch.input_ids).masked_fill(~mask, 0.0)
    return logps, (out.hidden_states[-1][keep] if hidden else None)


def _scatter_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(target) from logits (N, V) at ``mask``'s N positions, zero elsewhere; shape of ``mask``."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return picked.new_zeros(mask.shape).masked_scatter(mask, picked)


def by_length_groups(batch: SequenceBatch, fn: Callable[[SequenceBatch], tuple[torch.Tensor, ...]], group: bool = True,
                     model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """``fn`` over the batch's rows in length groups (:func:`reward.batching.by_length_groups`),
    each group trimmed to its longest row.

    ``fn`` maps a batch of b rows and width t to tensors of shape (b, t-1) (per-token quantities
    aligned to input_ids[:, 1:]); the results come back in the rows' order, zero where a group's
    trimmed width did not reach. One group is one call on the whole batch. So is a ``model`` (the
    one ``fn`` runs) whose forward :mod:`reward.trunk` computes on the real tokens alone: padding
    costs it nothing.
    """
    def run(rows: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        return fn(SequenceBatch(*(t[rows, lo:hi] for t in (batch.input_ids, batch.attention_mask, batch.completion_mask))))

    if model is not None and selects_positions(model):
        group = False
    grouped = batching.by_length_groups(batch.attention_mask, run, width=batch.input_ids.shape[1] - 1) if group else None
    return fn(batch) if grouped is None else grouped


def token_logps(model: nn.Module, batch: SequenceBatch, group: bool = True) -> torch.Tensor:
    """Per-token log-probs of the completion, zero elsewhere; shape (B, T-1) aligned to input_ids[:, 1:].

    With ``group``, rows of very different lengths go through the model in separate forward
    passes (:func:`by_length_groups`; GPT-2 needs none): the same numbers (and gradients) as one
    padded pass, without computing most of the padding.
    """
    return by_length_groups(batch, lambda b: (token_logps_and_hidden(model, b)[0],), group, model)[0]


def sequence_logps(model: nn.Module, batch: SequenceBatch, group: bool = True) -> torch.Tensor:
    """log π(y|x) summed over completion tokens, shape (B,)."""
    return token_logps(model, batch, group).sum(-1)


@torch.no_grad()
def batched_sequence_logps(model: nn.Module, batch: SequenceBatch, batch_size: int = 256) -> torch.Tensor:
    """:func:`sequence_logps` without gradients over a large batch, in chunks trimmed to their longest row."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(batch), batch_size):
        chunk = batch.select(slice(start, start + batch_size)).trim().to(device)
        out.append(sequence_logps(model, chunk).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
