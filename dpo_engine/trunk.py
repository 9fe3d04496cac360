"""A causal LM's last hidden states at chosen positions only, computed on the real tokens alone.

Training and scoring read a transformer's output at a few positions: log-probs where a completion
token is predicted (43% of the real tokens of the sentiment task's preference pairs), a reward
model at one token per row. Every position still feeds the keys and values of the positions after
it, so all blocks but the last must run everywhere; the last block's queries, attention, output
projection and MLP, five sixths of its matmuls, are needed only at the positions that are read.
On the 2-layer GPT-2 of the benchmarks that takes a quarter of the FLOPs out of a DPO step and two
fifths out of a reward-model step (``python -m benchmarks.flops``).

Nor does padding cost anything: every operation but attention is per token and runs on the real
tokens of the batch alone; attention runs on the sequences packed several to a row
(:class:`Packing`). A batch of rows of very different lengths is one pass, not several. Nor is a
prefix that several sequences share computed more than once: a token's hidden states depend only
on the tokens up to it, so a DPO pair's prompt, or the opening words two sentences have in common,
are computed once and read by every sequence that holds them.

:func:`last_hidden_at` computes exactly that for transformers' GPT-2, with the model's own
modules and the operations of its SDPA forward: the same hidden states and gradients to float
rounding (``tests/test_trunk.py``). Other models, and GPT-2 configurations it does not reproduce
(dropout active, cross-attention, activation checkpointing, the attention variants) fail
:func:`selects_positions`, and the callers run the model's own forward instead.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

_GPT2_MODULE = "transformers.models.gpt2.modeling_gpt2"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt sees the positions it trained on."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _gpt2_body(model: nn.Module) -> nn.Module | None:
    """The ``GPT2Model`` inside ``model`` (a ``GPT2LMHeadModel`` or the body itself), else None."""
    if type(model).__module__ != _GPT2_MODULE:
        return None
    body = getattr(model, "transformer", model)
    return body if type(body).__name__ == "GPT2Model" else None


def selects_positions(model: nn.Module) -> bool:
    """Whether :func:`last_hidden_at` reproduces ``model``'s forward pass in its current mode
    (dropout counts only in training mode)."""
    body = _gpt2_body(model)
    if body is None:
        return False
    config = body.config
    if config.add_cross_attention or config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        return False
    # The last block's QKV projection is split by its weight (queries where kept, keys and values
    # everywhere): it must be the plain Conv1D, not an adapter or a quantised layer around it.
    if len(body.h) == 0 or type(body.h[-1].attn.c_attn).__name__ != "Conv1D":
        return False
    if body.training and max(config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) > 0:
        return False
    # Checkpointing is switched on in the body and its blocks (transformers' GradientCheckpointingLayer).
    # Looking there alone, not through the model's `is_activation_checkpointing`, which walks every
    # module: 75 µs a call, on every forward (ad hoc).
    return not any(getattr(m, "gradient_checkpointing", False) for m in (model, body, *body.h))


def last_hidden_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last layer norm) of ``model`` at the positions where
    ``keep`` (B, T) is true, shape (N, D) in row-major order of ``keep``.

    Same values as ``model(input_ids, attention_mask, position_ids=position_ids(attention_mask),
    output_hidden_states=True).hidden_states[-1][keep]``; padding may be on either side, and costs
    nothing (:class:`Packing`). Every kept position must be a real token. Call only where
    :func:`selects_positions` is true.
    """
    if keep.shape != input_ids.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()
    if (keep & ~real).any():
        raise ValueError("keep selects padding positions; only real tokens have a defined hidden state")
    body = _gpt2_body(model)
    heads = body.config.n_head
    scale = None if body.config.scale_attn_weights else 1.0
    packing = Packing(real, input_ids)
    # The distinct prefixes' last tokens only (the real tokens, when no prefix is shared): (M, D).
    x = body.wte(packing.ids) + body.wpe(packing.positions[packing.unique])
    dim = x.shape[-1]
    for block in body.h[:-1]:
        q, k, v = packing.scatter(block.attn.c_attn(block.ln_1(x))).split(dim, dim=1)
        x = x + block.attn.c_proj(packing.gather(packing.attend(q, k, v, heads, scale)))
        x = x + block.mlp(block.ln_2(x))
    # The last block: keys and values of every token; queries, the projection and the MLP only where kept.
    block = body.h[-1]
    h = block.ln_1(x)
    weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: h @ weight + bias, weight (D, 3D)
    k, v = packing.scatter(torch.addmm(bias[dim:], h, weight[:, dim:])).split(dim, dim=1)
    kept = packing.node[keep.flatten()[packing.tokens].nonzero().squeeze(1)]  # the prefixes read, one per kept position
    read, back = (kept, None) if packing.shares_nothing else torch.unique(kept, return_inverse=True)
    read_slots = packing.unique_slots[read]
    q = packing.scatter(torch.addmm(bias[:dim], h.index_select(0, read), weight[:, :dim]), read_slots)
    out = x.index_select(0, read) + block.attn.c_proj(packing.gather(packing.attend(q, k, v, heads, scale), read_slots))
    out = body.ln_f(out + block.mlp(block.ln_2(out)))
    # Rows are picked with index_select, never a tensor index: on the CPU the backward of x[index]
    # adds repeated rows (here a prefix that several kept positions read) in whatever order its
    # threads finish, and a run's gradients differed from the next in the last bits;
    # index_select's backward (index_add) adds them in order.
    return out if back is None else out.index_select(0, back)


# Sequences are packed into rows at least this wide: attention's cost on a CPU is mostly per
# (row, head), so short sequences share a row (``git show 8338f62:benchmarks/RESULTS.md``, "Packed real tokens").
PACK_WIDTH = 32

# Whether a prefix several sequences share is computed once (``git show 8338f62:benchmarks/RESULTS.md``, "Shared
# prefixes"); off, every real token is computed, as before. The same numbers up to float rounding.
SHARE_PREFIXES = True


class Packing:
    """The real tokens of a padded batch, laid out for attention in packed rows.

    Everything in a transformer but attention is per token: it runs on the real tokens alone, and
    padding costs nothing. Nor need it run twice on one prefix: a token's hidden states depend only
    on the tokens up to it (and their positions, which count real tokens), so the tokens of
    sequences that begin alike are computed once, at the ``unique`` tokens that stand for them.
    Attention needs each sequence's tokens side by side: the sequences are packed into R rows of W
    slots (W the longest sequence, at least :data:`PACK_WIDTH`; best-fit decreasing), several short
    sequences per row, and each token attends causally within its own sequence (a block-diagonal
    mask); a shared token's values are copied into every sequence that holds it, and its output is
    read from one of them. The same attention as the padded batch's, up to float rounding.
    """

    def __init__(self, real: torch.Tensor, input_ids: torch.Tensor):
        lengths = real.sum(1)
        self.width = max(PACK_WIDTH, int(lengths.max()) if len(lengths) else 0)
        start, self.rows = pack_rows(lengths.tolist(), self.width)
        device = real.device
        self.tokens = real.flatten().nonzero().squeeze(1)  # (N,) each real token's index in the flattened batch, row-major
        self.positions = position_ids(real).flatten()[self.tokens]  # its position in its sequence
        sequence_of = torch.arange(real.shape[0], device=device).repeat_interleave(lengths)
        self.slots = torch.tensor(start, dtype=torch.long, device=device)[sequence_of] + self.positions  # (N,) its packed slot
        ids = input_ids.flatten()[self.tokens]
        itself = torch.arange(len(ids), device=device)
        stands_for = shared_prefixes(ids, self.positions, sequence_of, lengths) if SHARE_PREFIXES else itself
        self.unique = (stands_for == itself).nonzero().squeeze(1)  # (M,) the tokens computed
        self.shares_nothing = len(self.unique) == len(ids)
        if self.shares_nothing:
            self.unique = self.node = itself
        else:
            index = torch.empty_like(stands_for)
            index[self.unique] = torch.arange(len(self.unique), device=device)
            self.node = index[stands_for]  # (N,) which of the M computed tokens each real token is
        self.ids = ids[self.unique]  # (M,) the computed tokens' ids
        # Each slot's computed token; an empty slot takes the first (any finite values do: it is
        # masked out of every real token's attention, and its own output is never read).
        self.source = torch.zeros(self.rows * self.width, dtype=torch.long, device=device)
        self.source[self.slots] = self.node
        sequence = torch.full((self.rows * self.width,), -1, dtype=torch.long, device=device)
        sequence[self.slots] = sequence_of
        sequence = sequence.view(self.rows, self.width)
        col = torch.arange(self.width, device=device)
        allowed = (sequence[:, :, None] == sequence[:, None, :]) & (col[:, None] >= col[None, :]) & (sequence[:, None, :] >= 0)
        # An empty slot attends to itself: a row of nothing would give NaN, whose 0-weighted
        # values would still reach real tokens through the backward.
        self.allowed = (allowed | torch.eye(self.width, dtype=torch.bool, device=device))[:, None]
        self.unique_slots = self.slots[self.unique]

    def scatter(self, values: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The computed tokens' values (M, C) into every slot that holds them: (R·W, C). With
        ``slots``, ``values`` are those of the tokens at these slots alone, and the other slots get
        the first's (queries whose output is not read)."""
        if len(values) == 0:  # nothing to copy (no token, or none read): index_select refuses an empty source
            return values.new_zeros(self.rows * self.width, values.shape[-1])
        if slots is None:
            return values.index_select(0, self.source)
        source = torch.zeros(self.rows * self.width, dtype=torch.long, device=values.device)
        source[slots] = torch.arange(len(slots), device=values.device)
        return values.index_select(0, source)

    def gather(self, packed: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Back from the packed slots (R·W, C) to the computed tokens (M, C), or to those at ``slots``."""
        return packed.index_select(0, self.unique_slots if slots is None else slots)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None) -> torch.Tensor:
        """Multi-head attention over packed (R·W, D) queries, keys and values, heads merged: (R·W, D)."""
        rows, width, dim = self.rows, self.width, q.shape[-1]
        q, k, v = (t.view(rows, width, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, scale=scale)
        return mixed.transpose(1, 2).reshape(rows * width, dim)


def shared_prefixes(ids: torch.Tensor, positions: torch.Tensor, sequence_of: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """For each real token (``ids``, row-major, at ``positions`` of the sequences ``sequence_of``),
    the real token that stands for it: the same token at the same position of the first sequence
    that has the same prefix up to there. A token that stands for itself is computed.

    The sequences, sorted in lexicographic order, put those that share a prefix side by side: a
    token is new where its sequence leaves the common prefix with the one before it, and every
    other token is the one above it. No hashing: equal prefixes are compared token by token.
    """
    if len(ids) == 0:
        return ids.new_zeros(0)
    rows, longest = len(lengths), int(lengths.max())
    aligned = ids.new_full((rows, longest), -1)  # each sequence's tokens from the left, -1 after its end
    aligned[sequence_of, positions] = ids
    distinct, which = torch.unique(aligned, dim=0, return_inverse=True)  # sorted lexicographically
    common = (distinct[1:] == distinct[:-1]).cumprod(1).sum(1)  # each one's common prefix with the one before
    common = torch.cat([common.new_zeros(1), common])
    order = torch.arange(len(distinct), device=ids.device)
    new = torch.arange(longest, device=ids.device)[None, :] >= common[:, None]
    # The run of sorted sequences that share the prefix up to each position, named by its first.
    run = torch.where(new, order[:, None], -1).cummax(0).values
    # The first input sequence of each distinct one, then of each run, and where its tokens start.
    sequence = torch.full((len(distinct),), rows, dtype=torch.long, device=ids.device)
    sequence = sequence.scatter_reduce(0, which, torch.arange(rows, device=ids.device), "amin")
    earliest = torch.full_like(run, rows).scatter_reduce(0, run, sequence[:, None].expand_as(run), "amin")
    begins = lengths.cumsum(0) - lengths
    return begins[earliest[run[which[sequence_of], positions], positions]] + positions


def pack_rows(lengths: list[int], width: int) -> tuple[list[int], int]:
    """Sequences of ``lengths`` packed into rows of ``width`` slots, best fit, longest first.

    Returns each sequence's first slot (row · width + offset) and the number of rows. Deterministic.
    """
    start = [0] * len(lengths)
    used: list[int] = []  # slots taken in each row
    room: dict[int, list[int]] = {}  # free slots -> the rows with that much room
    sizes: list[int] = []  # the keys of ``room`` with rows, sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n == 0:  # takes no slot
            continue
        at = bisect.bisect_left(sizes, n)
        if at < len(sizes):
            free = sizes[at]
            row = room[free].pop()
            if not room[free]:
                sizes.pop(at)
        else:
            row = len(used)
            used.append(0)
        start[i] = row * width + used[row]
        used[row] += n
        free = width - used[row]
        if not room.get(free):
            room[free] = []
            bisect.insort(sizes, free)
        room[free].append(row)
    return start, len(used)
