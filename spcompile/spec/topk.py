"""The reference top-k block selection rule (what TopK means, in plain PyTorch).

The fast estimation kernel must select exactly these blocks; this version is the one tests and
``dense_mask`` compare against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .patterns import TopK


def pool_blocks(x: Tensor, block: int) -> Tensor:
    """Mean over each ``block`` tokens of dim -2 (the last block averages what it has).

    x: [B, H, S, D] -> [B, H, ceil(S / block), D] in float32 (float64 stays float64).
    """
    b, h, s, d = x.shape
    n = -(-s // block)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = torch.zeros(b, h, n * block, d, dtype=dtype, device=x.device)
    padded[:, :, :s] = x.to(dtype)
    counts = torch.full((n,), float(block), dtype=dtype, device=x.device)
    counts[-1] = s - (n - 1) * block
    return padded.view(b, h, n, block, d).sum(3) / counts[:, None]


def select_blocks(pattern: TopK, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Bool [B, H, n_blocks, n_blocks]: the key blocks each query block keeps.

    q: [B, H, S, D]; k: [B, H_kv, S, D] with H % H_kv == 0. Scores are
    ``softmax(pool(q) @ pool(k)^T * scale)`` over the eligible key blocks (all, or those at or
    before the diagonal when causal). Forced blocks: the first ``sink`` and blocks
    ``r - local + 1 .. r``. Beyond them: the ``k`` highest-scoring blocks (ties to the lower
    index), or, with ``coverage``, blocks in descending score until the kept set's mass reaches
    ``coverage`` (1.0 keeps every eligible block). With ``share_gqa`` the heads of a group
    average their probabilities first.
    """
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    pattern.check_lengths(s, k.shape[2])
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qp = pool_blocks(q, pattern.block)
    kp = pool_blocks(k, pattern.block).repeat_interleave(h // h_kv, dim=1)
    n = qp.shape[2]
    scores = qp @ kp.transpose(-1, -2) * scale  # [B, H, n, n]
    r = torch.arange(n, device=q.device)[:, None]
    c = torch.arange(n, device=q.device)[None, :]
    eligible = (c <= r) if pattern.causal else torch.ones(n, n, dtype=torch.bool, device=q.device)
    probs = scores.masked_fill(~eligible, float("-inf")).softmax(-1)
    if pattern.share_gqa:
        group = h // h_kv
        probs = probs.view(b, h_kv, group, n, n).mean(2, keepdim=True).expand(-1, -1, group, -1, -1)
        probs = probs.reshape(b, h, n, n)
    forced = (c < pattern.sink) | ((c <= r) & (c > r - pattern.local))
    forced = (forced & eligible).expand(b, h, n, n)
    # Rank the candidates: forced and ineligible blocks go last; ties to the lower index.
    candidate_score = probs.masked_fill(forced | ~eligible, -1.0)
    order = torch.sort(candidate_score, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(candidate_score, -1, order)
    if pattern.k is not None:
        take = (torch.arange(n, device=q.device) < pattern.k) & (ranked >= 0)
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
