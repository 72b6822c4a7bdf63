"""Key padding AND a sparsity pattern: the op's ``key_bias`` argument.

A per-key mask (padding) is an additive bias on every score of a key: 0 keeps it, -inf blocks
it. The kernels add it per KV tile, so the pattern is untouched (same positions, same
bottom-right alignment, same plan) and the result is the pattern AND the padding, whatever the
padding's layout (left, right or holes). A query row whose allowed keys are all blocked has, by
spcompile's rule, no key: it gives 0.

Additive masks as models write them (``finfo.min``, -10000) are blocks: a score that far below
the others weighs exactly 0 next to any real key, and the only case where eager attention
differs, a row whose every key is blocked, gives 0 here like any row without a key.
"""

from __future__ import annotations

from torch import Tensor

from .opcall import site_attention

__all__ = ["BLOCKED_BELOW", "padded_sparse_attention"]

BLOCKED_BELOW = -1.0e4
"""An additive mask value at or below this blocks the key (exp(-1e4) is exactly 0 next to any
real score in every dtype)."""


def _key_mask(key_padding: Tensor, kind: str) -> Tensor:
    """The site's mask as ``sparse_attention``'s ``key_mask`` [B or 1, S_kv]: bool (True = kept)
    for allow/block masks, float for an additive one with its blocks made -inf.
    ``key_padding`` broadcasts as a per-key mask (see ``is_key_mask``)."""
    # [B or 1, 1, 1, S_kv] at 4-D; below that, every axis but the keys has size 1.
    batch = key_padding.shape[0] if key_padding.dim() == 4 else 1
    m = key_padding.reshape(batch, key_padding.shape[-1])
    if kind == "additive":
        m = m.float()
        return m.masked_fill(m <= BLOCKED_BELOW, float("-inf"))
    return m.bool() if kind == "allow" else ~m.bool()


def padded_sparse_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor, kind: str,
                            pattern: str, scale: float, impl: str) -> Tensor:
    """out [B, H, S_q, Dv] of ``pattern`` AND the per-key mask ``key_padding`` (``kind``:
    additive, allow or block) on q [B, H, S_q, D], k/v [B, H_kv, S_kv, D]."""
    key_mask = _key_mask(key_padding, kind).to(q.device)
    out, _ = site_attention(q, k, v, pattern, scale, impl, key_mask=key_mask)
    return out
