"""A causal LM's last hidden states at chosen positions only, computed on the real tokens alone.

Training and scoring read a transformer's output at a few positions: log-probs where a completion
token is predicted (43% of the real tokens of the sentiment task's preference pairs), a reward
model at one token per row. Every position still feeds the keys and values of the positions after
it, so all blocks but the last must run everywhere; the last block's queries, attention, output
projection and MLP, five sixths of its matmuls, are needed only at the positions that are read.
On the 2-layer GPT-2 of the benchmarks that takes a quarter of the FLOPs out of a DPO step and two
fifths out of a reward-model step (``python -m benchmarks.flops``).

Nor does padding cost anything: every operation but attention is per token and runs on the (N, D)
real tokens of the batch; attention runs on the sequences packed several to a row
(:class:`Packing`). A batch of rows of very different lengths is one pass, not several.

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
    packing = Packing(real)
    # The real tokens only, in row-major order: (N, D).
    x = body.wte(input_ids.flatten()[packing.tokens]) + body.wpe(packing.positions)
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
    kept = keep.flatten()[packing.tokens].nonzero().squeeze(1)  # which of the N tokens are read
    kept_slots = packing.slots[kept]
    q = packing.scatter(torch.addmm(bias[:dim], h[kept], weight[:, :dim]), kept_slots)
    out = x[kept] + block.attn.c_proj(packing.gather(packing.attend(q, k, v, heads, scale), kept_slots))
    return body.ln_f(out + block.mlp(block.ln_2(out)))


# Sequences are packed into rows at least this wide: attention's cost on a CPU is mostly per
# (row, head), so short sequences share a row (``benchmarks/RESULTS.md``, "Packed real tokens").
PACK_WIDTH = 32


class Packing:
    """The real tokens of a padded batch, laid out for attention in packed rows.

    Everything in a transformer but attention is per token: it runs on the (N, D) real tokens
    alone, and padding costs nothing. Attention needs each sequence's tokens side by side: the
    sequences are packed into R rows of W slots (W the longest sequence, at least
    :data:`PACK_WIDTH`; best-fit decreasing), several short sequences per row, and each token
    attends causally within its own sequence (a block-diagonal mask). The same attention as the
    padded batch's, up to float rounding.
    """

    def __init__(self, real: torch.Tensor):
        lengths = real.sum(1)
        self.width = max(PACK_WIDTH, int(lengths.max()) if len(lengths) else 0)
        start, self.rows = pack_rows(lengths.tolist(), self.width)
        device = real.device
        self.tokens = real.flatten().nonzero().squeeze(1)  # (N,) each real token's index in the flattened batch, row-major
        self.positions = position_ids(real).flatten()[self.tokens]  # its position in its sequence
        sequence_of = torch.arange(real.shape[0], device=device).repeat_interleave(lengths)
        self.slots = torch.tensor(start, dtype=torch.long, device=device)[sequence_of] + self.positions  # (N,) its packed slot
        sequence = torch.full((self.rows * self.width,), -1, dtype=torch.long, device=device)
        sequence[self.slots] = sequence_of
        sequence = sequence.view(self.rows, self.width)
        col = torch.arange(self.width, device=device)
        allowed = (sequence[:, :, None] == sequence[:, None, :]) & (col[:, None] >= col[None, :]) & (sequence[:, None, :] >= 0)
        # An empty slot attends to itself: a row of nothing would give NaN, whose 0-weighted
        # values would still reach real tokens through the backward.
        self.allowed = (allowed | torch.eye(self.width, dtype=torch.bool, device=device))[:, None]

    def scatter(self, values: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values (N, C), or those of the tokens at ``slots``, into the packed slots: (R·W, C)."""
        return values.new_zeros(self.rows * self.width, values.shape[-1]).index_copy(0, self.slots if slots is None else slots, values)

    def gather(self, packed: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Back from the packed slots (R·W, C) to every token (or to those at ``slots``), in row-major order."""
        return packed.index_select(0, self.slots if slots is None else slots)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None) -> torch.Tensor:
        """Multi-head attention over packed (R·W, D) queries, keys and values, heads merged: (R·W, D)."""
        rows, width, dim = self.rows, self.width, q.shape[-1]
        q, k, v = (t.view(rows, width, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, scale=scale)
        return mixed.transpose(1, 2).reshape(rows * width, dim)


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
