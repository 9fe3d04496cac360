"""A causal LM's last hidden states at chosen positions only.

Training and scoring read a transformer's output at a few positions: log-probs where a completion
token is predicted (43% of the real tokens of the sentiment task's preference pairs), a reward
model at one token per row. Every position still feeds the keys and values of the positions after
it, so all blocks but the last must run everywhere; the last block's queries, attention, output
projection and MLP, five sixths of its matmuls, are needed only at the positions that are read.
On the 2-layer GPT-2 of the benchmarks that takes a quarter of the FLOPs out of a DPO step and two
fifths out of a reward-model step (``python -m benchmarks.flops``).

:func:`last_hidden_at` computes exactly that for transformers' GPT-2, with the model's own
modules and the operations of its SDPA forward: the same hidden states and gradients to float
rounding (``tests/test_trunk.py``). Other models, and GPT-2 configurations it does not reproduce
(dropout active, cross-attention, activation checkpointing, the attention variants) fail
:func:`selects_positions`, and the callers run the model's own forward instead.
"""

from __future__ import annotations

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
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # its name from transformers 5.2x on
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not checkpointing


def last_hidden_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last layer norm) of ``model`` at the positions where
    ``keep`` (B, T) is true, shape (N, D) in row-major order of ``keep``.

    Same values as ``model(input_ids, attention_mask, position_ids=position_ids(attention_mask),
    output_hidden_states=True).hidden_states[-1][keep]``; padding may be on either side. Every
    kept position must be a real token. Call only where :func:`selects_positions` is true.
    """
    if keep.shape != input_ids.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()
    if (keep & ~real).any():
        raise ValueError("keep selects padding positions; only real tokens have a defined hidden state")
    body = _gpt2_body(model)
    width = input_ids.shape[1]
    heads = body.config.n_head
    scale = None if body.config.scale_attn_weights else 1.0
    x = body.wte(input_ids) + body.wpe(position_ids(attention_mask))
    # Causal attention to real tokens. A padding query may see itself too: on some backends a row
    # with nothing to attend to gives NaN, which would reach real tokens through 0-weighted values.
    allowed = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril() & real[:, None, :]
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=input_ids.device)
    for block in body.h[:-1]:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).view(*x.shape[:2], 3, heads, x.shape[-1] // heads).permute(2, 0, 3, 1, 4)
        x = x + _attend_and_project(block, q, k, v, allowed, scale, x.shape[-1])
        x = x + block.mlp(block.ln_2(x))
    return body.ln_f(_last_block_at(body.h[-1], x, allowed, keep, heads, scale))


def _attend_and_project(block: nn.Module, q, k, v, allowed: torch.Tensor, scale: float | None, width: int) -> torch.Tensor:
    """Attention of queries (B, H, Q, d) over keys and values (B, H, T, d) where ``allowed``
    (B, Q, T), merged over heads and projected: (B, Q, width)."""
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    return block.attn.c_proj(mixed.transpose(1, 2).reshape(q.shape[0], q.shape[2], width))


def _last_block_at(block: nn.Module, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor, heads: int, scale: float | None) -> torch.Tensor:
    """The last block's output at the kept positions, (N, D) in row-major order: keys and values
    everywhere, queries, the projection and the MLP only where kept."""
    batch, width, dim = x.shape
    h = block.ln_1(x)
    weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: h @ weight + bias, weight (D, 3D)
    k, v = torch.addmm(bias[dim:], h.reshape(-1, dim), weight[:, dim:]).view(batch, width, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
    # Each row's kept positions, in order, in the first slots of (B, Q); the slots past a row's
    # count hold other positions, computed and dropped.
    counts = keep.sum(1)
    slots = int(counts.max()) if len(counts) else 0
    cols = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :slots]
    used = torch.arange(slots, device=x.device) < counts[:, None]
    hq = h.gather(1, cols[..., None].expand(-1, -1, dim))
    q = torch.addmm(bias[:dim], hq.reshape(-1, dim), weight[:, :dim]).view(batch, slots, heads, dim // heads).transpose(1, 2)
    out = x[keep] + _attend_and_project(block, q, k, v, allowed.gather(1, cols[..., None].expand(-1, -1, width)), scale, dim)[used]
    return out + block.mlp(block.ln_2(out))
