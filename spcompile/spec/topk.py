"""The reference top-k block selection rule (what TopK means, in plain PyTorch).

The fast estimation (``spcompile.plan.topk.estimate_blocks``) must select exactly these blocks:
it shares ``block_probs`` and ``forced_blocks`` with this version and differs only in how it
ranks; tests compare the two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .patterns import TopK


def pool_blocks(x: Tensor, block: int) -> Tensor:
    """Mean over each ``block`` tokens of dim -2 (the last block averages what it has).

    x: [B, H, S, D] -> [B, H, ceil(S / block), D] in float32 (float64 stays float64). Sums in
    the accumulation dtype straight from x: no padded or upcast copy of q or k.
    """
    s = x.shape[2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    whole = s // block
    parts = []
    if whole:
        head = x[:, :, : whole * block].unflatten(2, (whole, block))
        parts.append(head.sum(3, dtype=dtype) / block)
    if s % block:
        parts.append(x[:, :, whole * block :].sum(2, keepdim=True, dtype=dtype) / (s % block))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def eligible_blocks(pattern: TopK, n: int, device: torch.device) -> Tensor:
    """Bool [n, n]: key blocks a query block may keep (at or before the diagonal when causal)."""
    r = torch.arange(n, device=device)[:, None]
    c = torch.arange(n, device=device)[None, :]
    return (c <= r) if pattern.causal else torch.ones(n, n, dtype=torch.bool, device=device)


def forced_blocks(pattern: TopK, n: int, device: torch.device) -> Tensor:
    """Bool [n, n]: the blocks always kept: the first ``sink`` and the ``local`` ending at the
    diagonal (eligible ones only)."""
    r = torch.arange(n, device=device)[:, None]
    c = torch.arange(n, device=device)[None, :]
    forced = (c < pattern.sink) | ((c <= r) & (c > r - pattern.local))
    return forced & eligible_blocks(pattern, n, device)


def block_probs(pattern: TopK, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """[B, Hs, n, n] block probabilities: softmax over eligible key blocks of pooled scores.

    Hs is H, or H_kv with ``share_gqa`` (the group's heads average their probabilities).
    """
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    pattern.check_lengths(s, k.shape[2])
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qp = pool_blocks(q, pattern.block) * scale
    kp = pool_blocks(k, pattern.block)
    n = qp.shape[2]
    # [B, H_kv, group, n, D] @ [B, H_kv, 1, D, n]: GQA broadcasts, no repeated copy of k.
    scores = (qp.view(b, h_kv, h // h_kv, n, d) @ kp[:, :, None].transpose(-1, -2)).flatten(1, 2)
    if pattern.causal:
        scores = scores.masked_fill(~eligible_blocks(pattern, n, q.device), float("-inf"))
    probs = scores.softmax(-1)  # [B, H, n, n]
    if pattern.share_gqa:
        probs = probs.view(b, h_kv, h // h_kv, n, n).mean(2)
    return probs


def select_blocks(pattern: TopK, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Bool [B, H, n_blocks, n_blocks]: the key blocks each query block keeps.

    q: [B, H, S, D]; k: [B, H_kv, S, D] with H % H_kv == 0. Scores are
    ``softmax(pool(q) @ pool(k)^T * scale)`` over the eligible key blocks (all, or those at or
    before the diagonal when causal). Forced blocks: the first ``sink`` and blocks
    ``r - local + 1 .. r``. Beyond them: the ``k`` highest-scoring blocks (ties to the lower
    index), or, with ``coverage``, blocks in descending score until the kept set's mass reaches
    ``coverage`` (1.0 keeps every eligible block). With ``share_gqa`` the heads of a group
    average their probabilities first and share one selection.
    """
    h = q.shape[1]
    sel = rank_blocks(pattern, block_probs(pattern, q, k, scale))
    return sel.repeat_interleave(h // k.shape[1], dim=1) if pattern.share_gqa else sel


def rank_blocks(pattern: TopK, probs: Tensor) -> Tensor:
    """The selection [B, Hs, n, n] from block probabilities, by a stable descending sort."""
    n = probs.shape[-1]
    eligible = eligible_blocks(pattern, n, probs.device)
    forced = forced_blocks(pattern, n, probs.device).expand(probs.shape)
    # Rank the candidates: forced and ineligible blocks go last; ties to the lower index.
    candidate_score = probs.masked_fill(forced | ~eligible, -1.0)
    order = torch.sort(candidate_score, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(candidate_score, -1, order)
    if pattern.k is not None:
        take = (torch.arange(n, device=probs.device) < pattern.k) & (ranked >= 0)
    else:
        forced_mass = (probs * forced).sum(-1, keepdim=True)
        # Take a candidate while the mass kept before it is still short of coverage.
        before = forced_mass + torch.cumsum(ranked.clamp_min(0), -1) - ranked.clamp_min(0)
        take = (before < pattern.coverage - 1e-12) & (ranked >= 0)
        if pattern.coverage >= 1.0:
            # All of the mass: every eligible block, also those whose probability is below the
            # rounding slack or underflows to 0 (the exact smallest set reaching 1.0).
            take = ranked >= 0
    chosen = torch.zeros_like(forced).scatter(-1, order, take)
    return forced | chosen
