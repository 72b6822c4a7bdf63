"""``sparse_attention``: the public entry to the kernels, for direct and rewritten use."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import EagerAttention, attention_forward, attention_op, pattern_key, topk_select_op
from .plan.topk import estimate_blocks
from .reference import check_qkv
from .spec.patterns import Dense, Pattern, PerHead, TopK

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device: torch.device) -> str:
    """'triton' on CUDA (or on CPU under TRITON_INTERPRET=1 when asked for), else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"sparse_attention: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("sparse_attention: impl='triton' on a CPU tensor needs "
                         "TRITON_INTERPRET=1 (the Triton interpreter)")
    return impl


def _tile_arg(tile: int | tuple[int, ...] | None) -> list[int]:
    if tile is None:
        return []
    return [tile] if isinstance(tile, int) else list(tile)


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float | None = None,
    return_lse: bool = False, impl: str = "auto",
    q_tile: int | tuple[int, ...] | None = None, kv_tile: int | tuple[int, ...] | None = None,
    key_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention restricted to ``pattern``: softmax(q k^T * scale, masked) v.

    Parameters:
        q: [B, H, Sq, D]; k: [B, H_kv, Skv, D]; v: [B, H_kv, Skv, Dv], H a multiple of H_kv.
        pattern: any pattern: static ones, TopK (its selection is estimated from q and k on
            every call, then the kernels visit only the selected blocks), PerHead mixes.
        scale: defaults to 1 / sqrt(D).
        return_lse: also return the log-sum-exp [B, H, Sq] (fp32; -inf on rows with no key).
        impl: "auto" (Triton on CUDA, the blockwise PyTorch path on CPU), "triton", "torch".
        key_mask: per-key padding, [B or 1, Skv], the same for every head and query: bool
            (True = the key may be seen) or float (added to the key's scores; -inf blocks).
            ANDed with the pattern on the same sparse kernels; not differentiated.

    Other Parameters:
        q_tile, kv_tile: tile shapes (an int, or one size per grid axis); default: the tile
            search of spcompile.plan.choose. TopK's tiles are its blocks.

    Rows that see no key give 0 (LSE -inf), never NaN. Differentiable in q, k and v. Inside
    ``torch.compile`` it traces to one custom op with no graph break; build the pattern outside
    the compiled function (patterns are constants of the graph).
    """
    check_qkv(q, k, v, "sparse_attention")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"sparse_attention: expected a Pattern, got {pattern!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = resolve_impl(impl, q.device)
    key_bias = _key_bias(key_mask, q.shape[0], k.shape[2])
    if isinstance(pattern, Dense) and not return_lse and key_bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if isinstance(pattern, PerHead):
        return _per_head(q, k, v, pattern, scale, return_lse, impl, q_tile, kv_tile, key_bias)
    key = pattern_key(pattern)
    # Plain tensors outside any tracing run the op's bodies directly (with autograd's Function
    # where a gradient is needed); fake, proxy or functional tensors (dynamo, AOTAutograd,
    # export) must see the op.
    eager = all(type(x) is Tensor for x in (q, k, v)) and not torch.compiler.is_compiling()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    blocks = None
    if isinstance(pattern, TopK):
        blocks = estimate_blocks(pattern, q.detach(), k.detach(), scale) if eager else \
            topk_select_op(q, k, key, scale)
    run = attention_op if not eager else EagerAttention.apply if grad else attention_forward
    out, lse = run(q, k, v, key, scale, impl, _tile_arg(q_tile), _tile_arg(kv_tile), blocks,
                   key_bias)
    return (out, lse) if return_lse else out


def _key_bias(key_mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """A key mask as the op's float bias [B or 1, Skv]: bool True -> 0, False -> -inf."""
    if key_mask is None:
        return None
    if key_mask.shape[-1] != kv_len or key_mask.numel() not in (kv_len, batch * kv_len):
        raise ValueError(f"sparse_attention: expected key_mask of shape [{batch} or 1, "
                         f"{kv_len}], got {tuple(key_mask.shape)}")
    m = key_mask.reshape(-1, kv_len)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(
            ~m, float("-inf"))
    if not m.is_floating_point():
        raise TypeError(f"sparse_attention: key_mask must be bool or floating, got {m.dtype}")
    return m.detach()


def _per_head(q, k, v, pattern: PerHead, scale, return_lse, impl, q_tile, kv_tile, key_bias):
    """One launch per run of consecutive heads sharing a pattern; views, not copies, of q/k/v
    whenever the run is aligned to whole GQA groups. Without ``return_lse`` a Dense run is
    SDPA's (FlashAttention's) launch, forward and backward."""
    h, h_kv = q.shape[1], k.shape[1]
    group = h // h_kv
    outs, lses = [], []
    for start, stop, member in pattern.runs(h):
        if start % group == 0 and stop % group == 0:
            ks, vs = k[:, start // group : stop // group], v[:, start // group : stop // group]
        else:  # a run that splits a GQA group: give each query head its own K/V head
            kv_heads = torch.arange(start, stop, device=k.device) // group
            ks, vs = k.index_select(1, kv_heads), v.index_select(1, kv_heads)
        res = sparse_attention(q[:, start:stop], ks, vs, member, scale, return_lse, impl,
                               q_tile, kv_tile, key_bias)
        outs.append(res[0] if return_lse else res)
        lses.append(res[1] if return_lse else None)
    out = torch.cat(outs, 1)
    return (out, torch.cat(lses, 1)) if return_lse else out
