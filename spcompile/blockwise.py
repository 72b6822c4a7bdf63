"""The CPU path: blockwise attention in plain PyTorch, driven by the same tile plan as the kernels.

It visits exactly the plan's tiles, one "slot" of the per-Q-tile lists at a time for all Q tiles
at once, evaluates the pattern's ``allowed`` only on PARTIAL tiles, and keeps an online softmax
like the kernels. Memory per step is B x H x S x kv_tile scores, never S x S. It is written with
out-of-place ops so autograd differentiates it (the CPU backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .plan.tiles import TilePlan, kv_tokens, visit_passes


def _gather_tiles(x: Tensor, tokens: Tensor, n_tiles: int) -> Tensor:
    """x [B, H, S, D] -> [B, H, n_tiles, tile, D] in tile order (padding rows: token 0's values)."""
    b, h, _, d = x.shape
    return x.index_select(2, tokens.clamp_min(0)).view(b, h, n_tiles, -1, d)


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32/fp64) over the plan's tiles."""
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_tok = plan.q_layout.token_index().to(q.device)
    k_tok = kv_tokens(plan, q.device)
    nq, tq, tk = plan.num_q_tiles, plan.q_layout.tile_size, plan.kv_layout.tile_size
    nk = k_tok.numel() // tk
    # [B, H_kv, G, nq, Tq, D]: the GQA group shares each K/V tile.
    qt = _gather_tiles(q.to(acc_dtype), q_tok, nq).view(b, h_kv, group, nq, tq, d)
    kt = _gather_tiles(k.to(acc_dtype), k_tok, nk)
    vt = _gather_tiles(v.to(acc_dtype), k_tok, nk)
    q_tiles = q_tok.view(nq, tq)
    k_tiles = k_tok.view(nk, tk)
    m = torch.full((b, h_kv, group, nq, tq), float("-inf"), dtype=acc_dtype, device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(b, h_kv, group, nq, tq, v.shape[-1], dtype=acc_dtype, device=q.device)
    for idx, cnt, mask in visit_passes(plan, q.device):
        for slot in range(int(cnt.max()) if cnt.numel() else 0):
            active = slot < cnt  # [nq]
            tiles = idx[:, slot]
            ks, vs = kt[:, :, tiles], vt[:, :, tiles]  # [B, H_kv, nq, Tk, D]
            s = torch.einsum("bhgqmd,bhqnd->bhgqmn", qt, ks) * scale
            keep = active[:, None, None].expand(nq, tq, tk)
            if mask is not None:
                kj = k_tiles[tiles]  # [nq, Tk]
                allowed = mask(q_tiles.clamp_min(0)[:, :, None], kj.clamp_min(0)[:, None, :])
                keep = keep & allowed & (kj >= 0)[:, None, :]
            s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m - m_use)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("bhgqmn,bhqnd->bhgqmd", p, vs)
            m = m_new
    empty = denom == 0
    out_t = acc / torch.where(empty, torch.ones_like(denom), denom)[..., None]
    lse_t = torch.where(empty, torch.full_like(m, float("-inf")),
                        m + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    # Back to token order: drop padding rows.
    valid = (q_tok >= 0).nonzero().squeeze(1)
    out_flat = out_t.reshape(b, h, nq * tq, -1).index_select(2, valid)
    lse_flat = lse_t.reshape(b, h, nq * tq).index_select(2, valid)
    order = torch.argsort(q_tok[valid])
    return out_flat[:, :, order].to(q.dtype), lse_flat[:, :, order]


def blockwise_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: TilePlan,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) over the plan's tiles, the same recurrences as the Triton backward.

    P is recomputed from the saved LSE (rows with LSE -inf give P = 0); dK/dV of each visited
    KV tile are summed with index_add over slots, so memory stays per slot.
    """
    b, h, sq, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_tok = plan.q_layout.token_index().to(q.device)
    k_tok = kv_tokens(plan, q.device)
    nq, tq, tk = plan.num_q_tiles, plan.q_layout.tile_size, plan.kv_layout.tile_size
    nk = k_tok.numel() // tk

    def rows(x: Tensor) -> Tensor:  # [B, H, S, X] -> [B, H_kv, G, nq, Tq, X]
        return _gather_tiles(x.to(acc_dtype), q_tok, nq).view(b, h_kv, group, nq, tq, -1)

    qt, dot = rows(q), rows(do)
    delta = (do.to(acc_dtype) * out.to(acc_dtype)).sum(-1, keepdim=True)
    deltat = rows(delta)[..., 0]
    lse_t = rows(lse.to(acc_dtype)[..., None])[..., 0]
    lse_t = torch.where(torch.isinf(lse_t), torch.full_like(lse_t, float("inf")), lse_t)
    kt = _gather_tiles(k.to(acc_dtype), k_tok, nk)
    vt = _gather_tiles(v.to(acc_dtype), k_tok, nk)
    dq_t = torch.zeros_like(qt)
    dk_t = torch.zeros_like(kt)
    dv_t = torch.zeros_like(vt)
    q_tiles, k_tiles = q_tok.view(nq, tq), k_tok.view(nk, tk)
    q_valid = (q_tiles >= 0)[:, :, None]
    for idx, cnt, mask in visit_passes(plan, q.device):
        for slot in range(int(cnt.max()) if cnt.numel() else 0):
            active = slot < cnt
            tiles = idx[:, slot]
            ks, vs = kt[:, :, tiles], vt[:, :, tiles]
            s = torch.einsum("bhgqmd,bhqnd->bhgqmn", qt, ks) * scale
            keep = active[:, None, None] & q_valid
            if mask is not None:
                kj = k_tiles[tiles]
                allowed = mask(q_tiles.clamp_min(0)[:, :, None], kj.clamp_min(0)[:, None, :])
                keep = keep & allowed & (kj >= 0)[:, None, :]
            p = torch.exp(s - lse_t[..., None]) * keep
            dp = torch.einsum("bhgqmd,bhqnd->bhgqmn", dot, vs)
            ds = p * (dp - deltat[..., None])
            dq_t += torch.einsum("bhgqmn,bhqnd->bhgqmd", ds, ks) * scale
            dk_slot = torch.einsum("bhgqmn,bhgqmd->bhqnd", ds, qt) * scale
            dv_slot = torch.einsum("bhgqmn,bhgqmd->bhqnd", p, dot)
            use = active.nonzero().squeeze(1)
            dk_t.index_add_(2, tiles[use], dk_slot[:, :, use])
            dv_t.index_add_(2, tiles[use], dv_slot[:, :, use])

    def scatter(t: Tensor, tok: Tensor, length: int, heads: int) -> Tensor:
        """Tile rows back to token rows; a key in the main tiles and in the gather segment
        gets both contributions."""
        flat = t.reshape(b, heads, -1, t.shape[-1])
        valid = (tok >= 0).nonzero().squeeze(1)
        outp = torch.zeros(b, heads, length, t.shape[-1], dtype=t.dtype, device=t.device)
        return outp.index_add(2, tok[valid], flat.index_select(2, valid))

    dq = scatter(dq_t, q_tok, sq, h).to(q.dtype)
    dk = scatter(dk_t, k_tok, k.shape[2], h_kv).to(k.dtype)
    dv = scatter(dv_t, k_tok, v.shape[2], h_kv).to(v.dtype)
    return dq, dk, dv
