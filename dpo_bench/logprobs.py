"""Sequence log-probabilities with the prompt masked out.

Every method needs log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion tokens only. This
module is the one place that computes it, for any padding (left-padded prompts from the sampler,
right-padded pairs from the collator): positions are derived from the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


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
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n = len(p), len(p) + len(c)
        ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[i, :n] = 1
        completion[i, n_p:n] = 1
    return SequenceBatch(ids, attention, completion)


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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt sees the positions it trained on."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward(model: nn.Module, batch: SequenceBatch, output_hidden_states: bool = False):
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
        output_hidden_states=output_hidden_states,
    )


def gather_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | ≤ t) for t = 0..T-2, shape (B, T-1), from logits (B, T, V)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def token_logps(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Per-token log-probs of the completion, zero elsewhere; shape (B, T-1) aligned to input_ids[:, 1:]."""
    out = forward(model, batch)
    mask = batch.completion_mask[:, 1:].bool()
    # masked_fill, not multiplication: a padded position may hold -inf (the tabular policy's mask).
    return gather_token_logps(out.logits, batch.input_ids).masked_fill(~mask, 0.0)


def sequence_logps(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """log π(y|x) summed over completion tokens, shape (B,)."""
    return token_logps(model, batch).sum(-1)


@torch.no_grad()
def batched_sequence_logps(model: nn.Module, batch: SequenceBatch, batch_size: int = 256) -> torch.Tensor:
    """:func:`sequence_logps` without gradients over a large batch, in chunks trimmed to their longest row."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(batch), batch_size):
        chunk = batch.select(slice(start, start + batch_size)).trim().to(device)
        out.append(sequence_logps(model, chunk).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
