"""Small models that write attention the ways real code does, for the detect-pass tests.

Every hand-written module spells one variant on purpose (``Spelling``): the product
(``@``/``torch.matmul``/``Tensor.matmul``/einsum), how ``k^T`` is taken, where the scale goes, how
the mask is applied, which softmax with which casts, dropout. Models are wrapped in
``Stack(layers=[Block(attn=...)])`` so that module paths look like ``layers.0.attn``.
HuggingFace and timm models are built from tiny random configs (no downloads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, SEQ, BATCH = 32, 4, 8, 2


@dataclass(frozen=True)
class Spelling:
    """One way to write ``softmax(q k^T * scale + mask) v`` by hand."""

    qk: str = "@"  # "@" | "matmul" | "method"
    kt: str = "transpose"  # "transpose" (-2, -1) | "transpose23" | "permute" | "mT" | "swapaxes"
    scale: str = "mul"  # "mul" | "rmul" | "div" | "div_sqrt" | "pre_q" | "pre_qk" | "mul_" |
    #                     "none"
    mask: str = "none"  # "none" | "add" | "radd" | "iadd" | "fill_inf" | "fill_min" | "fill_" |
    #                    "where"
    mask_source: str = "input"  # "input" (a forward argument) | "built" (causal, in forward)
    softmax: str = "F"  # "F" | "torch" | "method" | "dim3" | "float_to" | "dtype_type_as"
    dropout: str = "none"  # "none" | "F_eval" | "module"
    pv: str = "@"  # "@" | "matmul" | "einsum"


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HuggingFace's repeat_kv: [B, H_kv, S, D] -> [B, H_kv * n_rep, S, D]."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, h, n_rep, s, d)
    return x.reshape(b, h * n_rep, s, d)


class HandAttention(nn.Module):
    """q/k/v projections, heads, a hand-written core spelled by ``spelling``, output proj."""

    def __init__(self, spelling: Spelling = Spelling(), dim: int = DIM, heads: int = HEADS,
                 kv_heads: int | None = None, kv_repeat: str = "expand", p: float = 0.1) -> None:
        super().__init__()
        self.s, self.heads, self.kv_heads = spelling, heads, kv_heads or heads
        self.head_dim = dim // heads
        self.kv_repeat = kv_repeat
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(p)
        self.p = p
        self.scaling = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        if rep > 1 and self.kv_repeat == "expand":
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        elif rep > 1 and self.kv_repeat == "interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # "broadcast": k and v keep their heads; matmul broadcasts a single one (MQA)
        out = self.core(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        s = self.s
        if s.scale == "pre_q":
            q = q * self.scaling
        elif s.scale == "pre_qk":
            q, k = q * math.sqrt(self.scaling), k * math.sqrt(self.scaling)
        kt = {"transpose": lambda: k.transpose(-2, -1), "transpose23": lambda: k.transpose(2, 3),
              "permute": lambda: k.permute(0, 1, 3, 2), "mT": lambda: k.mT,
              "swapaxes": lambda: torch.swapaxes(k, -1, -2)}[s.kt]()
        w = {"@": lambda: q @ kt, "matmul": lambda: torch.matmul(q, kt),
             "method": lambda: q.matmul(kt)}[s.qk]()
        if s.scale == "mul":
            w = w * self.scaling
        elif s.scale == "rmul":
            w = self.scaling * w
        elif s.scale == "div":
            w = w / (self.head_dim ** 0.5)
        elif s.scale == "div_sqrt":
            w = w / math.sqrt(q.size(-1))
        elif s.scale == "mul_":
            w.mul_(self.scaling)
        if s.mask_source == "built":
            n = q.shape[-2]
            allow = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            mask = allow if s.mask == "where" else ~allow
            if s.mask in ("add", "radd", "iadd"):
                mask = torch.zeros(n, n, device=q.device).masked_fill(~allow, float("-inf"))
        if s.mask == "add":
            w = w + mask
        elif s.mask == "radd":
            w = mask + w
        elif s.mask == "iadd":  # T5: scores += position_bias_masked
            w += mask
        elif s.mask == "fill_inf":
            w = w.masked_fill(mask, float("-inf"))
        elif s.mask == "fill_min":
            w = w.masked_fill(mask, torch.finfo(w.dtype).min)
        elif s.mask == "fill_":
            w.masked_fill_(mask, float("-inf"))
        elif s.mask == "where":
            w = torch.where(mask, w, torch.finfo(w.dtype).min)
        if s.softmax == "F":
            p = F.softmax(w, dim=-1)
        elif s.softmax == "torch":
            p = torch.softmax(w, -1)
        elif s.softmax == "method":
            p = w.softmax(dim=-1)
        elif s.softmax == "dim3":
            p = F.softmax(w, dim=3)
        elif s.softmax == "float_to":
            p = w.float().softmax(-1).to(q.dtype)
        else:  # "dtype_type_as"
            p = F.softmax(w, dim=-1, dtype=torch.float32).type_as(q)
        if s.dropout == "F_eval":
            p = F.dropout(p, p=self.p, training=False)
        elif s.dropout == "module":
            p = self.attn_drop(p)
        if s.pv == "einsum":
            return torch.einsum("bhij,bhjd->bhid", p, v)
        return torch.matmul(p, v) if s.pv == "matmul" else p @ v


class SdpaAttention(nn.Module):
    """F.scaled_dot_product_attention with its arguments spelled out."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, kv_heads: int | None = None,
                 causal: bool = False, scale: float | None = None, p: float = 0.0,
                 gqa: str = "repeat", fn: str = "F") -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.causal, self.scale, self.p, self.gqa = causal, scale, p, gqa
        self.fn = F.scaled_dot_product_attention if fn == "F" else \
            torch._C._nn.scaled_dot_product_attention
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1,
                                                                                   4).unbind(0)
        rep = self.heads // self.kv_heads
        kwargs = {}
        if rep > 1 and self.gqa == "repeat":
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        elif rep > 1:
            kwargs["enable_gqa"] = True
        out = self.fn(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0,
                      is_causal=self.causal, scale=self.scale, **kwargs)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DiffusersAttention(nn.Module):
    """diffusers' pre-2.0 AttnProcessor: heads folded into the batch, baddbmm scores, bmm."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, scores: str = "baddbmm") -> None:
        super().__init__()
        self.heads, self.scale, self.scores = heads, (dim // heads) ** -0.5, scores
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def head_to_batch_dim(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        t = t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        return t.reshape(b * self.heads, n, c // self.heads)

    def batch_to_head_dim(self, t: torch.Tensor) -> torch.Tensor:
        bh, n, d = t.shape
        t = t.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3)
        return t.reshape(bh // self.heads, n, self.heads * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.head_to_batch_dim(self.to_q(x))
        k = self.head_to_batch_dim(self.to_k(x))
        v = self.head_to_batch_dim(self.to_v(x))
        if self.scores == "bmm":
            probs = (torch.bmm(q, k.transpose(1, 2)) * self.scale).softmax(dim=-1)
        else:
            if mask is None:
                bias, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype,
                                         device=q.device), 0
            else:
                bias, beta = mask.repeat_interleave(self.heads, dim=0), 1
            probs = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=beta, alpha=self.scale)
            probs = probs.softmax(dim=-1).to(q.dtype)
        return self.to_out(self.batch_to_head_dim(torch.bmm(probs, v)))


class BartAttention(nn.Module):
    """BART before transformers 4.40: q scaled before the head split, heads folded into the
    batch for bmm, the mask added on a [B, H, S, S] view of the scores."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim)
                                                                for _ in range(4))

    def _shape(self, t: torch.Tensor, n: int, b: int) -> torch.Tensor:
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        flat = (b * self.heads, -1, self.head_dim)
        q = self._shape(self.q_proj(x) * self.scaling, n, b).view(*flat)
        k = self._shape(self.k_proj(x), n, b).view(*flat)
        v = self._shape(self.v_proj(x), n, b).view(*flat)
        w = torch.bmm(q, k.transpose(1, 2))
        if mask is not None:
            w = w.view(b, self.heads, n, n) + mask
            w = w.view(b * self.heads, n, n)
        w = F.softmax(w, dim=-1)
        out = torch.bmm(w, v).view(b, self.heads, n, self.head_dim).transpose(1, 2)
        return self.out_proj(out.reshape(b, n, c))


class EinsumAttention(nn.Module):
    """einsum attention in three layouts: "bhsd", "bshd" (no transposes) and "ellipsis"."""

    def __init__(self, layout: str = "bhsd", dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.layout, self.heads, self.head_dim = layout, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)  # [B, S, H, D]
        scale = self.head_dim ** -0.5
        if self.layout == "bshd":
            w = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            out = torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v)
            return self.proj(out.reshape(b, n, c))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.layout == "ellipsis":
            w = torch.einsum("...id,...jd->...ij", q, k) * scale
            out = torch.einsum("...ij,...jd->...id", w.softmax(-1), v)
        else:
            w = torch.einsum("b h i d, b h j d -> b h i j", q * scale, k)
            out = torch.einsum("bhij,bhjd->bhid", w.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(self.norm(x), mask) if mask is not None else \
            x + self.attn(self.norm(x))


class Stack(nn.Module):
    """``layers.<i>.attn`` for each given attention module."""

    def __init__(self, *attns: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(a) for a in attns)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --------------------------------------------------------------------------------------------
# A DiT-style video block: 3-D token grid, qkv linear, heads, per-head RMS norm, SDPA


class VideoAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q, self.norm_k = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VideoDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = VideoAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, gate = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)
        x = x + gate * self.attn(self.norm1(x) + shift)
        return x + self.mlp(self.norm2(x))


class VideoDiT(nn.Module):
    """Latent video [B, C, T, H, W] -> tokens over the flattened T*H*W grid -> blocks."""

    def __init__(self, channels: int = 4, dim: int = DIM, heads: int = HEADS,
                 depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv3d(channels, dim, kernel_size=1)
        self.cond = nn.Linear(1, dim)
        self.transformer_blocks = nn.ModuleList(VideoDiTBlock(dim, heads) for _ in range(depth))

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.embed(latents)  # [B, dim, T, H, W]
        b, c, frames, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, T*H*W, dim]
        cond = self.cond(t[:, None])
        for block in self.transformer_blocks:
            x = block(x, cond)
        return x.transpose(1, 2).reshape(b, c, frames, h, w)


# --------------------------------------------------------------------------------------------
# Things that look like attention but must not be rewritten, and things that are not attention


class ReturnsWeights(nn.Module):
    """Returns the softmax output too (like ``output_attentions=True``)."""

    def __init__(self, what: str = "probs") -> None:
        super().__init__()
        self.what = what
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5
        probs = scores.softmax(-1)
        return probs @ v, probs if self.what == "probs" else scores


class Custom(nn.Module):
    """Attention with one unusual step, chosen by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        w = q @ k.transpose(-2, -1)
        if self.kind == "wrong_dim":
            out = w.softmax(dim=-2) @ v
        elif self.kind == "softcap":  # Gemma 2 logit soft-capping
            out = (torch.tanh(w / 50.0) * 50.0).softmax(-1) @ v
        elif self.kind == "temperature":
            out = (w * self.temperature).softmax(-1) @ v
        elif self.kind == "alibi":  # a constant additive bias, not a 0/-inf mask
            pos = torch.arange(n, device=x.device)
            bias = -(pos[None, :] - pos[:, None]).abs().float() * 0.5
            out = (w * 0.25 + bias).softmax(-1) @ v
        elif self.kind == "mask_5d":
            mask = torch.zeros(1, b, HEADS, n, n, device=x.device)
            out = ((w * 0.5 + mask).softmax(-1) @ v)[0]
        else:
            raise ValueError(self.kind)
        return out.transpose(1, 2).reshape(b, n, DIM)


class MLP(nn.Module):
    """Matmuls without attention: an MLP written with @, and a softmax router."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(64, DIM)), nn.Parameter(torch.randn(DIM, 64))
        self.router = nn.Parameter(torch.randn(4, DIM))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(x @ self.w1.t()) @ self.w2.t()
        gates = torch.softmax(x @ self.router.T, dim=-1)
        return h, gates.topk(2, dim=-1).values


def flat_qkv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on [B*H, S, D] inputs with nothing around that tells the number of heads."""
    w = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    return torch.bmm(w.softmax(-1), v)


def pretransposed_key(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The key arrives already transposed ([B, H, D, S]); no untransposed key exists."""
    return torch.softmax(q @ kt * 0.25, dim=-1) @ v
