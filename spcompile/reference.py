"""Reference attention: the exact masked softmax, for tests and correctness checks only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .spec.masks import dense_mask
from .spec.patterns import Pattern, PerHead, TopK

#: Largest score matrix reference_attention builds (B * H * Sq * Skv elements).
MAX_REFERENCE_ELEMENTS = 1 << 28


def check_qkv(q: Tensor, k: Tensor, v: Tensor, who: str) -> None:
    """Shapes of q [B, H, Sq, D], k [B, H_kv, Skv, D], v [B, H_kv, Skv, Dv]; H % H_kv == 0."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{who}: expected q, k, v of shape [B, H, S, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{who}: expected k [B, H_kv, Skv, D] and v [B, H_kv, Skv, Dv] matching "
                         f"q [B, H, Sq, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{who}: expected the query heads ({q.shape[1]}) to be a multiple of "
                         f"the key/value heads ({k.shape[1]})")


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale, masked by ``pattern``) v, with GQA; rows with no key give 0.

    q: [B, H, Sq, D]; k: [B, H_kv, Skv, D]; v: [B, H_kv, Skv, Dv]. Computes in float64 when the
    inputs are float64, else float32, and returns q's dtype. The LSE (natural log, [B, H, Sq],
    -inf on empty rows) is float32/float64. Builds the full score matrix: small sizes only.
    """
    check_qkv(q, k, v, "reference_attention")
    b, h, sq, d = q.shape
    h_kv, skv = k.shape[1], k.shape[2]
    if b * h * sq * skv > MAX_REFERENCE_ELEMENTS:
        raise ValueError(f"reference_attention: {b}x{h}x{sq}x{skv} scores exceed the "
                         f"{MAX_REFERENCE_ELEMENTS}-element limit; it is for tests only")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if isinstance(pattern, TopK):
        mask = dense_mask(pattern, sq, skv, q=q, k=k, scale=scale)
    elif isinstance(pattern, PerHead):
        mask = dense_mask(pattern, sq, skv, num_heads=h)[None]
    else:
        mask = dense_mask(pattern, sq, skv)[None, None]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kr = k.to(dtype).repeat_interleave(h // h_kv, dim=1)
    vr = v.to(dtype).repeat_interleave(h // h_kv, dim=1)
    scores = (q.to(dtype) @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(dtype).min))
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no allowed key: exp(-inf - -inf)
    out = (probs @ vr).to(q.dtype)
    return (out, lse) if return_lse else out
