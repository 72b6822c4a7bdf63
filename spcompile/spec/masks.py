"""Dense boolean masks of patterns, for small sizes: tests, pictures and the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from .patterns import Pattern, PerHead, TopK
from .topk import select_blocks

#: Largest mask dense_mask builds (elements); beyond it the caller wants the tile plan.
MAX_MASK_ELEMENTS = 1 << 28


def dense_mask(
    pattern: Pattern,
    q_len: int,
    kv_len: int,
    *,
    num_heads: int | None = None,
    q: Tensor | None = None,
    k: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The exact mask of ``pattern``: Bool [q_len, kv_len], True where query i may see key j.

    PerHead patterns need ``num_heads`` and return [num_heads, q_len, kv_len]. TopK is
    data-dependent: pass q [B, H, S, D] and k [B, H_kv, S, D]; it returns [B, H, S, S].
    Meant for small sizes; refuses masks over 2**28 elements.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"dense_mask: expected a Pattern, got {pattern!r}")
    q_len, kv_len = int(q_len), int(kv_len)
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"dense_mask: expected q_len, kv_len >= 1, got {q_len}, {kv_len}")
    heads = num_heads or 1
    if q is not None:
        heads = q.shape[0] * q.shape[1]
    if q_len * kv_len * heads > MAX_MASK_ELEMENTS:
        raise ValueError(
            f"dense_mask: a {heads}x{q_len}x{kv_len} mask is too large to build "
            f"(limit {MAX_MASK_ELEMENTS} elements); use spcompile.plan for large sizes"
        )
    pattern.check_lengths(q_len, kv_len)
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    if isinstance(pattern, PerHead):
        if num_heads is None:
            raise ValueError("dense_mask: a PerHead pattern needs num_heads")
        per_head = pattern.resolve(num_heads)
        if any(isinstance(p, TopK) for p in per_head):
            raise NotImplementedError("dense_mask: PerHead with a TopK member needs q and k")
        return torch.stack([dense_mask(p, q_len, kv_len) for p in per_head])
    if isinstance(pattern, TopK):
        if q is None or k is None:
            raise ValueError("dense_mask: TopK is data-dependent; pass q and k")
        blocks = select_blocks(pattern, q, k, scale).cpu()
        out = blocks[:, :, i // pattern.block, j // pattern.block]
        return out & (j <= i) if pattern.causal else out
    return pattern.allowed(i, j, q_len, kv_len).expand(q_len, kv_len).contiguous()
