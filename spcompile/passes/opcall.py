"""What a rewritten site calls: the ``spcompile::attention`` op, one call per run of heads.

The op builds one tile plan per call, so it takes single-head patterns only; a PerHead pattern
is one op call per run of consecutive heads that share a pattern, and TopK a selection op
before it, as :func:`spcompile.sparse_attention` does eagerly (it is called here). This
function is placed in the rewritten graph
as a plain call: dynamo has finished tracing, and AOTAutograd / Inductor (or the eager inner
backend) trace through it to the op calls, whose registrations give fake shapes and gradients.
It takes the pattern's canonical key, a string, so the graph holds only constants.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["site_attention"]


def site_attention(q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, impl: str,
                   key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, S_q, Dv], lse [B, H, S_q]) of ``pattern`` (a canonical key: PerHead and
    TopK included) on q [B, H, S_q, D], k/v [B, H_kv, S_kv, D], with an optional per-key mask
    [B or 1, S_kv] (key padding): exactly what :func:`spcompile.sparse_attention` runs."""
    from ..attention import sparse_attention
    from ..ops import pattern_from_key

    out, lse = sparse_attention(q, k, v, pattern_from_key(pattern), scale, return_lse=True,
                                impl=impl, key_mask=key_mask)
    return out, lse
