"""What a rewritten site calls: the ``spcompile::attention`` op, one call per run of heads.

The op builds one tile plan per call, so it takes single-head patterns only; a PerHead pattern
is one op call per run of consecutive heads that share a pattern, as
:func:`spcompile.sparse_attention` does eagerly. This function is placed in the rewritten graph
as a plain call: dynamo has finished tracing, and AOTAutograd / Inductor (or the eager inner
backend) trace through it to the op calls, whose registrations give fake shapes and gradients.
It takes the pattern's canonical key, a string, so the graph holds only constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec.patterns import Pattern, PerHead

__all__ = ["head_runs", "site_attention"]


def head_runs(pattern: Pattern, num_heads: int) -> list[tuple[int, int, Pattern]]:
    """(start, stop, pattern) of each run of consecutive heads sharing a pattern."""
    if not isinstance(pattern, PerHead):
        return [(0, num_heads, pattern)]
    per_head = pattern.resolve(num_heads)
    runs, start = [], 0
    while start < num_heads:
        stop = start + 1
        while stop < num_heads and per_head[stop] == per_head[start]:
            stop += 1
        runs.append((start, stop, per_head[start]))
        start = stop
    return runs


def site_attention(q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, impl: str
                   ) -> tuple[Tensor, Tensor]:
    """(out [B, H, S_q, Dv], lse [B, H, S_q]) of ``pattern`` (a canonical key, PerHead
    included) on q [B, H, S_q, D], k/v [B, H_kv, S_kv, D]."""
    from ..ops import pattern_from_key

    p = pattern_from_key(pattern)
    if not isinstance(p, PerHead):
        out, lse = torch.ops.spcompile.attention.default(q, k, v, pattern, scale, impl, [], [])
        return out, lse
    h, h_kv = q.shape[1], k.shape[1]
    group = h // h_kv
    outs, lses = [], []
    for start, stop, member in head_runs(p, h):
        if start % group == 0 and stop % group == 0:
            ks, vs = k[:, start // group : stop // group], v[:, start // group : stop // group]
        else:  # a run that splits a GQA group: each query head gets its own K/V head
            kv_heads = torch.arange(start, stop, device=k.device) // group
            ks, vs = k.index_select(1, kv_heads), v.index_select(1, kv_heads)
        out, lse = torch.ops.spcompile.attention.default(q[:, start:stop], ks, vs, member.key,
                                                         scale, impl, [], [])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)
