"""Sequence log-probabilities with the prompt masked out.

Every method needs log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion tokens only. This
module is the one place that computes it, for any padding (left-padded prompts from the sampler,
right-padded pairs from the collator): positions are derived from the attention mask. Two things
keep it cheap without changing a number beyond float rounding: padding is not computed (GPT-2
runs on the real tokens alone, ``dpo_engine.trunk``; other models take a batch's rows in groups of
similar length, ``dpo_engine.batching``), and the model's output is computed only where a completion
token is predicted: the vocabulary projection for any transformers causal LM, and for GPT-2 the
last block's MLP too (``dpo_engine.trunk``).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dpo_engine import batching
from dpo_engine.trunk import last_hidden_at, position_ids, selects_positions


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


def item_tokens(*batches: SequenceBatch) -> torch.Tensor:
    """Per item, its non-pad tokens summed across ``batches`` (row i of each is item i): what its
    forward and backward passes read (a DPO pair: chosen plus rejected), the cell's compute."""
    return torch.stack([b.attention_mask.sum(1) for b in batches]).sum(0)


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


def completion_outputs(model: nn.Module, batch: SequenceBatch, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's next-token logits where a completion token is predicted, (N, V) at
    ``completion_mask[:, 1:]``'s N positions in row-major order, and, when ``hidden``, its last
    hidden state there (N, D) (PPO's value head reads it).

    Three ways, the same numbers: GPT-2 through :func:`dpo_engine.trunk.last_hidden_at` (the last
    block's MLP, the LM head and the softmax only at those positions); a model that keeps selected
    logits with a ``logits_to_keep`` mask (the prompt and the padding cost no vocabulary
    projection); any other from its full logits.
    """
    mask = batch.completion_mask[:, 1:].bool()
    # Position t predicts token t+1: the model's output is read where a completion token is predicted.
    keep = nn.functional.pad(mask, (0, 1), value=False)
    if selects_positions(model):
        states = last_hidden_at(model, batch.input_ids, batch.attention_mask, keep)
        return model.get_output_embeddings()(states), (states if hidden else None)
    if keeps_selected_logits(model):
        out = forward(model, batch, output_hidden_states=hidden, logits_to_keep=keep)
        if out.logits.dim() != 2 or out.logits.shape[0] != int(mask.sum()):
            raise RuntimeError(f"{type(model).__name__} returned logits of shape {tuple(out.logits.shape)} for a logits_to_keep mask")
        logits = out.logits
    else:
        out = forward(model, batch, output_hidden_states=hidden)
        logits = out.logits[:, :-1][mask]
    return logits, (out.hidden_states[-1][keep] if hidden else None)


def token_logps_and_hidden(model: nn.Module, batch: SequenceBatch, hidden: bool = False,
                           full: bool = False) -> tuple[torch.Tensor, ...]:
    """Per-token completion log-probs (B, T-1) in one forward pass and, when ``hidden``, the last
    hidden state where they are predicted (N, D), :func:`completion_outputs`'s (None otherwise);
    with ``full``, a third tensor: the whole next-token log-distribution at every completion
    position, (B, T-1, V), zero elsewhere (the exact per-token KL of PPO's penalty reads it)."""
    mask = batch.completion_mask[:, 1:].bool()
    logits, states = completion_outputs(model, batch, hidden)
    log_dist = torch.log_softmax(logits.float(), dim=-1)
    picked = log_dist.gather(-1, batch.input_ids[:, 1:][mask][:, None]).squeeze(-1)
    logps = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    if not full:
        return logps, states
    return logps, states, scatter_rows(log_dist, mask)


def scatter_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows (N, V) placed at ``mask``'s N true positions (B, T) in row-major order: (B, T, V), zero elsewhere."""
    out = rows.new_zeros((*mask.shape, rows.shape[-1]))
    out[mask] = rows
    return out


def token_log_distributions(model: nn.Module, batch: SequenceBatch, group: bool = True) -> torch.Tensor:
    """The next-token log-distribution at every completion position, (B, T-1, V) aligned to
    input_ids[:, 1:], zero elsewhere; rows in length groups as :func:`token_logps`."""
    return by_length_groups(batch, lambda b: (token_logps_and_hidden(model, b, full=True)[2],), group, model)[0]


def token_kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) at each position of (B, T, V) log-distributions, (B, T), zero where ``mask`` is
    false: Σ_v p_v (log p_v − log q_v), with 0·log 0 = 0. Differentiable in ``log_p``."""
    p = log_p.exp()
    # The log-ratio is zeroed where p is 0 before the product, so that no NaN (-inf - -inf) reaches
    # the gradient either.
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * log_ratio).sum(-1) * mask


def by_length_groups(batch: SequenceBatch, fn: Callable[[SequenceBatch], tuple[torch.Tensor, ...]], group: bool = True,
                     model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """``fn`` over the batch's rows in length groups (:func:`dpo_engine.batching.by_length_groups`),
    each group trimmed to its longest row.

    ``fn`` maps a batch of b rows and width t to tensors of shape (b, t-1) (per-token quantities
    aligned to input_ids[:, 1:]); the results come back in the rows' order, zero where a group's
    trimmed width did not reach. One group is one call on the whole batch. So is a ``model`` (the
    one ``fn`` runs) whose forward :mod:`dpo_engine.trunk` computes on the real tokens alone: padding
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


def completion_logits(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The model's next-token logits where a completion token is predicted: (N, V) at
    ``completion_mask[:, 1:]``'s N positions in row-major order (:func:`completion_outputs`)."""
    return completion_outputs(model, batch)[0]


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) per row of (N, V) logits, shape (N,), in float32 at least.

    0·log 0 = 0 (a token the policy masks with -inf logits, as the tabular policy does); +inf where
    q gives 0 to a token p does not; NaN logits stay NaN. Clamped at 0: a true KL is never
    negative, rounding can make it so. In place, three (N, V) tensors at most.
    """
    dtype = torch.promote_types(p_logits.dtype, torch.float32)
    logp = torch.log_softmax(p_logits.to(dtype), dim=-1)
    terms = logp - torch.log_softmax(q_logits.to(dtype), dim=-1)
    p = logp.exp_()
    # Where p is 0 the term is 0·(-inf) or 0·NaN: 0 by convention.
    return terms.mul_(p).masked_fill_(p == 0, 0.0).sum(-1).clamp_(min=0.0)


# Logits one chunk of batched_token_kl may hold per model, in elements (64 MB in float32): 11 rows
# of 30 tokens with GPT-2's 50k vocabulary; with the tasks' 600, the cap of 256 rows.
TOKEN_KL_LOGITS = 1 << 24


@torch.no_grad()
def batched_token_kl(policy: nn.Module, reference: nn.Module, batch: SequenceBatch, batch_size: int | None = None) -> torch.Tensor:
    """Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) per sequence: the exact per-token KL of the policy
    from the reference, summed over the positions that predict a completion token. Shape (B,),
    float64, on the CPU.

    The positions are those :func:`batched_sequence_logps` counts (``completion_mask[:, 1:]``,
    :func:`completion_logits`): every completion token's, the EOS's included when the completion
    has one; a completion cut at the maximum length has no stop position, and none is added.

    For y sampled from π it estimates the sequence KL(π‖π_ref) better than the log-ratio
    log π(y|x) − log π_ref(y|x) does. Both are unbiased (this one by the chain rule of KL, given
    generation that stops at EOS or at the same maximum length under both models), but every
    term of this one is >= 0, so no estimate is negative; and each term is its step's expected
    log-ratio instead of one draw's, which usually lowers the variance a lot (12x, the median on
    the tests' random tiny GPT-2s). Usually, not always: a later step's KL anti-correlated with an
    earlier step's drawn log-ratio can make it higher (``tests/test_token_kl.py`` has a case
    where the log-ratio is constant).

    Both models run on every row (π_ref on the policy's samples) in eval mode, on their own
    devices (the policy's for the KL); ``batch_size`` rows at a time, by default as many as keep
    the logits of a chunk within :data:`TOKEN_KL_LOGITS` elements per model (at most 256).
    """
    batch = batch.trim()
    if batch_size is None:
        vocab = getattr(getattr(policy, "config", None), "vocab_size", None) or 1
        batch_size = max(1, min(256, TOKEN_KL_LOGITS // (vocab * max(1, batch.input_ids.shape[1]))))
    device = next(policy.parameters()).device
    ref_device = next(reference.parameters()).device
    modes = policy.training, reference.training
    policy.eval()
    reference.eval()

    def token_kl(b: SequenceBatch) -> tuple[torch.Tensor]:
        mask = b.completion_mask[:, 1:].bool()
        q_logits = completion_logits(reference, b.to(ref_device)).to(device)
        kl = kl_rows(completion_logits(policy, b), q_logits)
        return (kl.new_zeros(mask.shape).masked_scatter(mask, kl),)

    # Length groups (as token_logps) unless both models compute padding at no cost.
    group = not (selects_positions(policy) and selects_positions(reference))
    out = []
    try:
        for start in range(0, len(batch), batch_size):
            chunk = batch.select(slice(start, start + batch_size)).trim().to(device)
            out.append(by_length_groups(chunk, token_kl, group)[0].double().sum(-1).cpu())
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
