"""Rows of very different lengths in separate forward passes, each padded to its own longest row.

A batch padded to its longest row computes every row at that length. Sorting the rows by length
and cutting them into a few groups computes far less padding, for the price of one more forward
pass per group; :func:`length_groups` chooses the cuts. The result of a model on the groups, put
back in the rows' order, is the result on the whole batch (up to the order of float additions):
the trainers' batches, losses and gradients do not change.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Callable, Sequence

import torch

# What one extra forward pass costs, counted in padded tokens: a sub-batch pays off only when it
# saves more padding than this. Measured on the sentiment task's GPT-2 (git show 8338f62:benchmarks/RESULTS.md, "Choosing the per-pass overhead").
GROUP_OVERHEAD_TOKENS = 64


def length_groups(lengths: Sequence[int] | torch.Tensor, overhead: int | None = None) -> list[list[int]]:
    """Rows split into groups of similar length, so each group is padded to its own longest row.

    Rows are sorted by length and cut where the padding a cut saves exceeds ``overhead`` tokens
    (one more forward pass). Exact: dynamic programming over the distinct lengths minimises
    Σ_groups (rows × longest) + overhead × groups. Returns row indices, shortest rows first.
    """
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if not order:
        return []
    counts = Counter(lengths)
    distinct = sorted(counts)
    ends = list(itertools.accumulate(counts[v] for v in distinct))  # rows with length <= distinct[j]
    # best[j]: cheapest cover of the rows with length <= distinct[j - 1]; cut[j]: its last group's start.
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            rows = ends[j - 1] - (ends[i - 1] if i else 0)
            cost = best[i] + rows * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(distinct)
    while j > 0:
        i = cut[j]
        groups.append(order[(ends[i - 1] if i else 0):ends[j - 1]])
        j = i
    return groups[::-1]


def used_columns(attention_mask: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the columns where some row has a real token."""
    used = attention_mask.any(0).nonzero()
    if used.numel() == 0:
        return 0, attention_mask.shape[1]
    return int(used[0]), int(used[-1]) + 1


def by_length_groups(
    attention_mask: torch.Tensor, fn: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]], width: int | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """``fn(rows, lo, hi)`` for each of the batch's :func:`length_groups`, the results put back in row order.

    ``fn`` computes the rows ``rows`` (an index tensor) trimmed to the columns [lo, hi) and returns
    tensors whose first dimension is those rows: shape (b,), or (b, w, ...) for per-position results
    (a scalar or a vector per position), which land in columns [lo, lo + w) of an output ``width``
    wide (zero elsewhere). ``None`` when the batch is one group: the caller then makes its single
    pass itself.
    """
    groups = length_groups(attention_mask.sum(-1)) if attention_mask.shape[0] > 1 else []
    if len(groups) <= 1:
        return None
    outs: list[torch.Tensor] | None = None
    for rows in groups:
        index = torch.tensor(rows, device=attention_mask.device)
        lo, hi = used_columns(attention_mask[index])
        parts = fn(index, lo, hi)
        if outs is None:
            outs = [p.new_zeros((attention_mask.shape[0], *((width, *p.shape[2:]) if p.dim() >= 2 else ()))) for p in parts]
        for k, p in enumerate(parts):
            if p.dim() == 1:
                outs[k] = outs[k].index_put((index,), p)
            else:
                cols = torch.arange(lo, lo + p.shape[1], device=p.device)
                outs[k] = outs[k].index_put((index[:, None], cols[None, :]), p)
    return tuple(outs)


def longest_rows(*attention_masks: torch.Tensor) -> torch.Tensor:
    """Per item, the length of its longest row across the masks (row i of each is item i): the row
    that sets the item's padding in a stacked forward pass; what length-grouped batching sorts by."""
    return torch.stack([m.sum(1) for m in attention_masks]).amax(0)
