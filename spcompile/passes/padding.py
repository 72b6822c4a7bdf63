"""Key padding AND a sparsity pattern, on the unchanged ``spcompile::attention`` op.

The op takes a pattern and no mask. A per-key mask (padding) is an additive bias ``c_j`` on
every score of key ``j``; it is applied exactly by one more head dimension:

    q' = [q, 1, 0...0]      k' = [k, c_j / scale, 0...0]      (v unchanged)
    scale * q'.k'_j = scale * q.k_j + c_j

Kept keys have ``c_j = 0``: their scores are those of the plain call (the extra terms add an
exact 0). Padded keys have ``c_j = -BLOCKED_SCORE``: their ``exp`` underflows to exactly 0 next
to any real score, as with the -inf / ``finfo.min`` masks models use. An additive per-key mask
is the same bias with its own values (those at or below -BLOCKED_SCORE are blocked either
way). The pattern is untouched (same positions, same bottom-right alignment, same plan), so the
result is the pattern AND the padding, whatever the padding's layout (left, right or holes).

A query row whose allowed keys are all padded has, by spcompile's rule, no key: it gives 0.
The op would average the padded keys there, so such rows are found first (one cheap forward of
the op on the bias column alone, see :func:`_rows_without_keys`); their output is set to 0 and
their q' to 0, which keeps every score of the row next to its LSE: the backward recomputes
``exp(score - LSE)`` on whole tiles, and an LSE of ~ -BLOCKED_SCORE next to a real score of a
key the pattern excludes would overflow there.

The cost: q and k are copied with 8 more head dims (a multiple of 8 stays one), the kernel's
padded head dim may double (64 -> 72 pads to 128 in a tile), and the row check is one more
forward at head dim 16 on one head. A key-padding argument on the op itself would cost one load
of a per-key vector per tile instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..spec.patterns import PerHead
from .opcall import site_attention

__all__ = ["BLOCKED_SCORE", "CHECK_DIM", "EXTRA_DIMS", "TRITON_MAX_HEAD_DIM", "blocked_score",
           "padded_sparse_attention", "padding_problem"]

EXTRA_DIMS = 8
"""Head dims added to q and k: the bias column and zeros up to the next multiple of 8."""

TRITON_MAX_HEAD_DIM = 256
"""The Triton kernels' largest head dim (DESIGN.md: 32-256)."""

CHECK_DIM = 16
"""Head dim of the forward that finds the query rows left without a key (the kernels' smallest
tile of a head dim)."""

BLOCKED_SCORE = 1.0e5
"""How far below its real score a blocked key's score is put: exp(-1e5) is exactly 0 next to
any real score, and float32 still resolves differences of ~0.01 at that magnitude, so LSEs
near it stay meaningful (at 1e30 the rounding of a score alone would overflow exp)."""

# The extra k' column holds -BLOCKED_SCORE / scale, capped where k's dtype cannot hold it:
# float16 tops out at 65504, and 3e4 * scale (>= 1875 for head dims <= 256) still underflows.
_COLUMN_LIMIT = {torch.float16: 3.0e4}


def blocked_score(dtype: torch.dtype, scale: float) -> float:
    """The score (after scale) a blocked key gets below its real one, for k of ``dtype``."""
    return min(BLOCKED_SCORE, _COLUMN_LIMIT.get(dtype, float("inf")) * scale)


def _extra_dims(head_dim: int) -> int:
    return EXTRA_DIMS - head_dim % EXTRA_DIMS if head_dim % EXTRA_DIMS else EXTRA_DIMS


def padding_problem(head_dim: Any, scale: float | None, scale_is_runtime: bool, impl: str
                    ) -> str | None:
    """Why a site with key padding cannot run with :func:`padded_sparse_attention`, or None."""
    reason = "; the op needs a key-padding argument to apply it without the extra head dims"
    if not scale_is_runtime and scale is not None and not scale > 0:
        return f"key padding with scale {scale} <= 0 cannot be a bias column{reason}"
    if impl == "triton" and isinstance(head_dim, int) and \
            head_dim + _extra_dims(head_dim) > TRITON_MAX_HEAD_DIM:
        return (f"key padding needs head dim {head_dim} + {_extra_dims(head_dim)}, above the "
                f"kernels' {TRITON_MAX_HEAD_DIM}{reason}")
    return None


def _key_bias(key_padding: Tensor, kind: str) -> Tensor:
    """float32 [B or 1, S_kv]: 0 for a kept key, the mask's value for an additive one, -inf for a
    blocked one. ``key_padding`` broadcasts as a per-key mask (see ``is_key_mask``)."""
    # [B or 1, 1, 1, S_kv] at 4-D; below that, every axis but the keys has size 1.
    batch = key_padding.shape[0] if key_padding.dim() == 4 else 1
    m = key_padding.reshape(batch, key_padding.shape[-1])
    if kind == "additive":
        return m.float()
    keep = m.bool() if kind == "allow" else ~m.bool()
    return torch.zeros(keep.shape, dtype=torch.float32, device=m.device).masked_fill(
        ~keep, float("-inf"))


def _rows_without_keys(column: Tensor, q: Tensor, k: Tensor, pattern: str, scale: float,
                       impl: str, blocked: float) -> Tensor:
    """Bool [B, H or 1, S_q, 1]: query rows whose allowed keys are all blocked (or none).

    One forward of the op on the bias column alone (head dim CHECK_DIM, one head unless the
    pattern differs per head): a row's LSE is its best key bias, 0 for a kept key and
    ~ -blocked when every allowed key is blocked.
    """
    from ..ops import pattern_from_key

    b, h, sq, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if not isinstance(pattern_from_key(pattern), PerHead):
        h = kv_heads = 1
    q0 = torch.cat([q.new_ones(b, h, sq, 1), q.new_zeros(b, h, sq, CHECK_DIM - 1)], -1)
    k0 = torch.cat([column.expand(b, kv_heads, kv_len, 1),
                    k.new_zeros(b, kv_heads, kv_len, CHECK_DIM - 1)], -1)
    v0 = k.new_zeros(b, kv_heads, kv_len, CHECK_DIM)
    _, lse = site_attention(q0, k0, v0, pattern, scale, impl)
    return (lse < -0.5 * blocked)[..., None]


def padded_sparse_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor, kind: str,
                            pattern: str, scale: float, impl: str) -> Tensor:
    """out [B, H, S_q, Dv] of ``pattern`` AND the per-key mask ``key_padding`` (``kind``:
    additive, allow or block) on q [B, H, S_q, D], k/v [B, H_kv, S_kv, D]; see the module
    docstring for why this is exact. ``scale`` must be > 0."""
    b, _, _, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    blocked = blocked_score(k.dtype, scale)
    column = (_key_bias(key_padding, kind).clamp_min(-blocked) / scale).to(q.device, k.dtype)
    column = column[:, None, :, None]
    no_key = _rows_without_keys(column, q, k, pattern, scale, impl, blocked)
    extra = _extra_dims(d)
    q2 = torch.cat([q, q.new_ones(*q.shape[:-1], 1), q.new_zeros(*q.shape[:-1], extra - 1)], -1)
    # Rows without a key get q' = 0: their scores are all 0, so the op's LSE stays next to
    # every score of the row, and exp(score - LSE) in the backward cannot overflow.
    q2 = q2.masked_fill(no_key, 0.0)
    k2 = torch.cat([k, column.expand(b, kv_heads, kv_len, 1),
                    k.new_zeros(*k.shape[:-1], extra - 1)], -1)
    out, _ = site_attention(q2, k2, v, pattern, scale, impl)
    return out.masked_fill(no_key, 0.0)
