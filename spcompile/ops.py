"""The ``spcompile::attention`` custom op: real, fake (meta) and autograd registrations.

The pattern travels as a canonical JSON string (its spec-file tree), so the op is an ordinary
node in a graph: torch.compile sees a constant argument, Inductor compiles around it, and
AOTAutograd traces the backward op. Plans are rebuilt from that string through a cache, so a
call costs a dict lookup after the first.

LSE is an output for callers that merge attention results; it is not differentiable.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor

from .blockwise import blockwise_attention, blockwise_attention_backward
from .plan.tiles import TilePlan, build_plan
from .spec.patterns import Pattern, pattern_from_dict


def pattern_key(pattern: Pattern) -> str:
    """Canonical JSON of a pattern (computed at construction; see ``Pattern.key``)."""
    return pattern.key


@functools.lru_cache(maxsize=512)
def pattern_from_key(key: str) -> Pattern:
    return pattern_from_dict(json.loads(key))


def plan_for(
    key: str, q_len: int, kv_len: int, q_tile: list[int], kv_tile: list[int], head_dim: int
) -> TilePlan:
    return build_plan(pattern_from_key(key), q_len, kv_len, tuple(q_tile) or None,
                      tuple(kv_tile) or None, head_dim)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spcompile::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, impl: str,
    q_tile: list[int], kv_tile: list[int],
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Sq, Dv], lse [B, H, Sq]) of ``pattern`` on q [B, H, Sq, D], k/v [B, Hkv, ...]."""
    plan = plan_for(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.shape[3])
    if impl == "triton":
        from .codegen.fwd import attn_fwd

        return attn_fwd(q, k, v, plan, scale)
    return blockwise_attention(q, k, v, plan, scale)


@attention_op.register_fake
def _attention_fake(q, k, v, pattern, scale, impl, q_tile, kv_tile):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    return out, lse


@torch.library.custom_op("spcompile::attention_backward", mutates_args=())
def attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pattern: str,
    scale: float, impl: str, q_tile: list[int], kv_tile: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    plan = plan_for(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.shape[3])
    if impl == "triton":
        from .codegen.bwd import attn_bwd

        return attn_bwd(do, q, k, v, out, lse, plan, scale)
    return blockwise_attention_backward(do, q, k, v, out, lse, plan, scale)


@attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, out, lse, pattern, scale, impl, q_tile, kv_tile):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale, impl, q_tile, kv_tile = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (pattern, scale, impl, q_tile, kv_tile)


def _backward(ctx, do, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)
