"""The CPU path: blockwise attention in plain PyTorch, driven by the same tile plan as the kernels.

It visits exactly the plan's tiles, one "slot" of the per-Q-tile lists at a time for all Q tiles
at once, evaluates the pattern's ``allowed`` only on PARTIAL tiles, and keeps an online softmax
like the kernels. Memory per step is B x H x S x kv_tile scores, never S x S. It is written with
out-of-place ops so autograd differentiates it (the CPU backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .plan.tiles import MaskFn, TilePlan, kv_tokens, visit_passes

if TYPE_CHECKING:
    from .plan.topk import BlockLists


def _gather_tiles(x: Tensor, tokens: Tensor, n_tiles: int) -> Tensor:
    """x [B, H, S, D] -> [B, H, n_tiles, tile, D] in tile order (padding rows: token 0's values)."""
    b, h, _, d = x.shape
    return x.index_select(2, tokens.clamp_min(0)).view(b, h, n_tiles, -1, d)


@dataclass
class _Tiles:
    """What both passes need: q/k/v (and friends) in tile order, and which pairs count."""

    plan: TilePlan
    q_tok: Tensor  # [nq * Tq] query positions of the permuted rows, -1 padding
    k_tok: Tensor  # [nk * Tk] key positions (layout tiles, then gathered tiles)
    acc_dtype: torch.dtype
    batch: int
    kv_heads: int
    group: int

    @classmethod
    def of(cls, plan: TilePlan, q: Tensor, k: Tensor) -> _Tiles:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return cls(plan, plan.q_layout.token_index().to(q.device), kv_tokens(plan, q.device),
                   acc, q.shape[0], k.shape[1], q.shape[1] // k.shape[1])

    @property
    def nq(self) -> int:
        return self.plan.num_q_tiles

    @property
    def tq(self) -> int:
        return self.plan.q_layout.tile_size

    @property
    def tk(self) -> int:
        return self.plan.kv_layout.tile_size

    @property
    def nk(self) -> int:
        return self.k_tok.numel() // self.tk

    def rows(self, x: Tensor) -> Tensor:
        """[B, H, S, X] -> [B, H_kv, G, nq, Tq, X]: the GQA group shares each K/V tile."""
        return _gather_tiles(x.to(self.acc_dtype), self.q_tok, self.nq).view(
            self.batch, self.kv_heads, self.group, self.nq, self.tq, -1)

    def keys(self, x: Tensor) -> Tensor:
        """[B, H_kv, S, X] -> [B, H_kv, nk, Tk, X]."""
        return _gather_tiles(x.to(self.acc_dtype), self.k_tok, self.nk)

    def lists(self, idx: Tensor, cnt: Tensor) -> tuple[Tensor, Tensor]:
        """Lists as [B', Hkv', G', nq, W] / [B', Hkv', G', nq], broadcastable to the heads: a
        static plan's [nq, W] is shared by every head; run-time lists [B * Hs, nq, W] have one
        list per head, or per GQA group (Hs = H_kv)."""
        if idx.dim() == 2:
            return idx.view(1, 1, 1, *idx.shape), cnt.view(1, 1, 1, -1)
        g = self.group if idx.shape[0] == self.batch * self.kv_heads * self.group else 1
        return (idx.view(self.batch, self.kv_heads, g, *idx.shape[1:]),
                cnt.view(self.batch, self.kv_heads, g, -1))

    def take(self, x: Tensor, tiles: Tensor) -> Tensor:
        """Key tiles x [B, H_kv, nk, Tk, X] at ``tiles`` [B', Hkv', G', nq] -> [B, H_kv, G', nq,
        Tk, X] (one gather per (batch, kv head))."""
        bi = torch.arange(self.batch, device=x.device).view(-1, 1, 1, 1)
        hi = torch.arange(self.kv_heads, device=x.device).view(1, -1, 1, 1)
        return x[bi, hi, tiles]

    def key_bias(self, key_bias: Tensor | None, kv_len: int) -> Tensor | None:
        """[B or 1, S_kv] per-key bias -> [B, H_kv, nk, Tk, 1] in tile order (or None)."""
        if key_bias is None:
            return None
        kb = key_bias.to(self.acc_dtype).reshape(-1, 1, kv_len, 1)
        return self.keys(kb.expand(self.batch, self.kv_heads, kv_len, 1))

    def keep(self, tiles: Tensor, active: Tensor, mask: MaskFn | None) -> Tensor:
        """Bool [..., nq, Tq, Tk]: pairs of this slot that count (active slot, mask, real keys)."""
        keep = active[..., None, None]
        if mask is None:
            return keep
        kj = self.k_tok.view(self.nk, self.tk)[tiles]  # [..., nq, Tk]
        qi = self.q_tok.view(self.nq, self.tq)
        allowed = mask(qi.clamp_min(0)[:, :, None], kj.clamp_min(0)[..., None, :])
        return keep & allowed & (kj >= 0)[..., None, :]


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float | None = None,
    lists: BlockLists | None = None, key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32/fp64) over the plan's tiles, or
    over run-time ``lists`` (TopK). ``key_bias`` [B or 1, Skv] is added to every score of a key
    (0 kept, -inf blocked: key padding)."""
    b, h, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    t = _Tiles.of(plan, q, k)
    qt, kt, vt = t.rows(q), t.keys(k), t.keys(v)
    kb = t.key_bias(key_bias, k.shape[2])
    m = torch.full((b, t.kv_heads, t.group, t.nq, t.tq), float("-inf"), dtype=t.acc_dtype,
                   device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(*m.shape, v.shape[-1], dtype=t.acc_dtype, device=q.device)
    for idx, cnt, mask in visit_passes(plan, q.device, lists):
        idx, cnt = t.lists(idx, cnt)
        for slot in range(int(cnt.max()) if cnt.numel() else 0):
            active = slot < cnt  # [B', Hkv', G', nq]
            tiles = idx[..., slot]
            ks, vs = t.take(kt, tiles), t.take(vt, tiles)  # [B, H_kv, G', nq, Tk, D]
            s = qt @ ks.transpose(-1, -2) * scale
            if kb is not None:
                s = s + t.take(kb, tiles).transpose(-1, -2)
            keep = t.keep(tiles, active, mask)
            s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m - m_use)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vs
            m = m_new
    empty = denom == 0
    out_t = acc / torch.where(empty, torch.ones_like(denom), denom)[..., None]
    lse_t = torch.where(empty, torch.full_like(m, float("-inf")),
                        m + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    # Back to token order: drop padding rows.
    valid = (t.q_tok >= 0).nonzero().squeeze(1)
    out_flat = out_t.reshape(b, h, t.nq * t.tq, -1).index_select(2, valid)
    lse_flat = lse_t.reshape(b, h, t.nq * t.tq).index_select(2, valid)
    order = torch.argsort(t.q_tok[valid])
    return out_flat[:, :, order].to(q.dtype), lse_flat[:, :, order]


def blockwise_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: TilePlan,
    scale: float | None = None, lists: BlockLists | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) over the plan's tiles, the same recurrences as the Triton backward.

    P is recomputed from the saved LSE (rows with LSE -inf give P = 0); dK/dV of each visited
    KV tile are summed with index_add over slots, so memory stays per slot.
    """
    b, h, sq, d = q.shape
    h_kv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    t = _Tiles.of(plan, q, k)
    qt, dot = t.rows(q), t.rows(do)
    delta = (do.to(t.acc_dtype) * out.to(t.acc_dtype)).sum(-1, keepdim=True)
    deltat = t.rows(delta)[..., 0]
    lse_t = t.rows(lse.to(t.acc_dtype)[..., None])[..., 0]
    lse_t = torch.where(torch.isinf(lse_t), torch.full_like(lse_t, float("inf")), lse_t)
    kt, vt = t.keys(k), t.keys(v)
    kb = t.key_bias(key_bias, k.shape[2])
    dq_t = torch.zeros_like(qt)
    dk_t = torch.zeros_like(kt)
    dv_t = torch.zeros_like(vt)
    q_valid = (t.q_tok.view(t.nq, t.tq) >= 0)[:, :, None]
    bi = torch.arange(b, device=q.device).view(-1, 1, 1, 1)
    hi = torch.arange(h_kv, device=q.device).view(1, -1, 1, 1)
    for idx, cnt, mask in visit_passes(plan, q.device, lists):
        idx, cnt = t.lists(idx, cnt)
        for slot in range(int(cnt.max()) if cnt.numel() else 0):
            active = slot < cnt
            tiles = idx[..., slot]
            ks, vs = t.take(kt, tiles), t.take(vt, tiles)
            s = qt @ ks.transpose(-1, -2) * scale
            if kb is not None:
                s = s + t.take(kb, tiles).transpose(-1, -2)
            keep = t.keep(tiles, active, mask) & q_valid
            # Masked pairs (and inactive slots) give exactly 0: a where, not a product, since an
            # excluded key may score far above the row's LSE (exp overflows, inf * 0 is NaN).
            p = torch.where(keep, torch.exp(s - lse_t[..., None]), 0.0)
            dp = dot @ vs.transpose(-1, -2)
            ds = p * (dp - deltat[..., None])
            dq_t += ds @ ks * scale
            dk_slot = ds.transpose(-1, -2) @ qt * scale  # [B, H_kv, G, nq, Tk, D]
            dv_slot = p.transpose(-1, -2) @ dot
            at = (bi, hi, tiles.expand(b, h_kv, t.group, t.nq))
            dk_t.index_put_(at, dk_slot, accumulate=True)
            dv_t.index_put_(at, dv_slot, accumulate=True)

    def scatter(x: Tensor, tok: Tensor, length: int, heads: int) -> Tensor:
        """Tile rows back to token rows; a key in the main tiles and in the gather segment
        gets both contributions."""
        flat = x.reshape(b, heads, -1, x.shape[-1])
        valid = (tok >= 0).nonzero().squeeze(1)
        outp = torch.zeros(b, heads, length, x.shape[-1], dtype=x.dtype, device=x.device)
        return outp.index_add(2, tok[valid], flat.index_select(2, valid))

    dq = scatter(dq_t, t.q_tok, sq, h).to(q.dtype)
    dk = scatter(dk_t, t.k_tok, k.shape[2], h_kv).to(k.dtype)
    dv = scatter(dv_t, t.k_tok, v.shape[2], h_kv).to(v.dtype)
    return dq, dk, dv
