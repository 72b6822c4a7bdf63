"""The ``spcompile::attention`` custom op: real, fake (meta) and autograd registrations.

The pattern travels as a canonical JSON string (its spec-file tree), so the op is an ordinary
node in a graph: torch.compile sees a constant argument, Inductor compiles around it, and
AOTAutograd traces the backward op. Plans are rebuilt from that string through a cache, so a
call costs a dict lookup after the first.

LSE is an output for callers that merge attention results; it is not differentiable.

TopK is two ops: ``spcompile::topk_select`` estimates the selection (bool blocks [B, Hs, n, n]),
and ``spcompile::attention`` takes it as ``blocks``. The backward reuses the forward's blocks
(saved like any input), so the gradients are those of exactly the attention that ran.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from .blockwise import blockwise_attention, blockwise_attention_backward
from .plan.choose import backward_tiles
from .plan.tiles import TilePlan, build_plan
from .plan.topk import BlockLists, block_lists, estimate_blocks
from .spec.patterns import Pattern, TopK, pattern_from_dict

TileShapes = tuple[tuple[int, ...], tuple[int, ...]]


def pattern_key(pattern: Pattern) -> str:
    """Canonical JSON of a pattern (computed at construction; see ``Pattern.key``)."""
    return pattern.key


@functools.lru_cache(maxsize=512)
def pattern_from_key(key: str) -> Pattern:
    return pattern_from_dict(json.loads(key))


def plan_for(
    key: str, q_len: int, kv_len: int, q_tile: Sequence[int], kv_tile: Sequence[int],
    head_dim: int, specialized: bool = False
) -> TilePlan:
    return _plan_for(key, q_len, kv_len, tuple(q_tile), tuple(kv_tile), head_dim, specialized)


@functools.lru_cache(maxsize=512)
def _plan_for(key: str, q_len: int, kv_len: int, q_tile: tuple[int, ...],
              kv_tile: tuple[int, ...], head_dim: int, specialized: bool) -> TilePlan:
    """One dict lookup per call once warm (build_plan's own checks cost ~20 us a call)."""
    return build_plan(pattern_from_key(key), q_len, kv_len, q_tile or None, kv_tile or None,
                      head_dim, specialized)


@functools.lru_cache(maxsize=512)
def _backward_tiles(key: str, q_len: int, kv_len: int, head_dim: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return backward_tiles(pattern_from_key(key), q_len, kv_len, head_dim)


@functools.lru_cache(maxsize=512)
def _sm90_bwd_tiles(key: str, q_len: int, kv_len: int) -> tuple[TileShapes, TileShapes]:
    """(dQ's, dK/dV's) (q_tile, kv_tile) for the Hopper backward kernels."""
    from .codegen.sm90_bwd import dkdv_tiles, dq_tiles

    pattern = pattern_from_key(key)
    return dq_tiles(pattern, q_len, kv_len), dkdv_tiles(pattern, q_len, kv_len)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spcompile::topk_select", mutates_args=())
def topk_select_op(q: Tensor, k: Tensor, pattern: str, scale: float) -> Tensor:
    """Bool [B, Hs, n, n]: a TopK pattern's selected key blocks per query block (Hs = H, or
    H_kv when a GQA group shares one selection)."""
    return estimate_blocks(_topk(pattern), q, k, scale)


@topk_select_op.register_fake
def _topk_select_fake(q, k, pattern, scale):
    p = _topk(pattern)
    n = -(-q.shape[2] // p.block)
    heads = k.shape[1] if p.share_gqa else q.shape[1]
    return q.new_empty((q.shape[0], heads, n, n), dtype=torch.bool)


def _topk(key: str) -> TopK:
    p = pattern_from_key(key)
    if not isinstance(p, TopK):
        raise TypeError(f"spcompile::topk_select: expected a TopK pattern, got {p.kind}")
    return p


def _lists(pattern: str, blocks: Tensor | None, kv_len: int, heads: int,
           transposed: bool = False) -> BlockLists | None:
    """Run-time lists of a TopK selection (None for static patterns, whose plan has them)."""
    p = pattern_from_key(pattern)
    if isinstance(p, TopK) != (blocks is not None):
        raise ValueError(f"spcompile::attention: blocks are required for TopK and only for it "
                         f"(pattern {p.kind}, blocks {'given' if blocks is not None else 'None'})")
    if blocks is None:
        return None
    assert isinstance(p, TopK)
    return block_lists(p, blocks, kv_len, heads, transposed)


@torch.library.custom_op("spcompile::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, impl: str,
    q_tile: list[int], kv_tile: list[int], blocks: Optional[Tensor] = None,  # noqa: UP045
    key_bias: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Sq, Dv], lse [B, H, Sq]) of ``pattern`` on q [B, H, Sq, D], k/v [B, Hkv, ...].

    ``blocks``: a TopK selection from ``topk_select_op`` (None for every other pattern).
    ``key_bias``: float [B or 1, Skv] added to every score of a key: 0 keeps it, -inf blocks it
    (key padding ANDed with the pattern). Not differentiated.
    """
    return attention_forward(q, k, v, pattern, scale, impl, q_tile, kv_tile, blocks, key_bias)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, impl: str,
    q_tile: list[int], kv_tile: list[int], blocks: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The op's body. Eager calls that need no gradient run it directly: the custom-op and
    autograd dispatch around it cost ~60 us a call on a CPU core, more than a small kernel."""
    def build(specialized: bool) -> TilePlan:
        return plan_for(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.shape[3],
                        specialized)

    lists = _lists(pattern, blocks, k.shape[2], q.shape[1])
    if impl == "triton":
        from .codegen.launch import forward, forward_plan

        plan = forward_plan(build, q, v, key_bias)
        return forward(q, k, v, plan, scale, lists=lists, key_bias=key_bias)
    return blockwise_attention(q, k, v, build(False), scale, lists=lists, key_bias=key_bias)


@attention_op.register_fake
def _attention_fake(q, k, v, pattern, scale, impl, q_tile, kv_tile, blocks=None,
                    key_bias=None):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    return out, lse


@torch.library.custom_op("spcompile::attention_backward", mutates_args=())
def attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pattern: str,
    scale: float, impl: str, q_tile: list[int], kv_tile: list[int],
    blocks: Optional[Tensor] = None,  # noqa: UP045
    key_bias: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(do, q, k, v, out, lse, pattern, scale, impl, q_tile, kv_tile,
                              blocks, key_bias)


def attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pattern: str,
    scale: float, impl: str, q_tile: list[int], kv_tile: list[int],
    blocks: Tensor | None = None, key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's body: (dq, dk, dv) of ``attention_forward``'s output."""
    dq_plan = dkdv_plan = None
    if impl == "triton" and not q_tile and not kv_tile and blocks is None:
        q_tile, kv_tile = (list(t) for t in _backward_tiles(pattern, q.shape[2], k.shape[2],
                                                            q.shape[3]))
        from .codegen.launch import gluon_enabled

        if gluon_enabled(q):  # the Hopper kernels' own tiles (codegen.sm90_bwd)
            dq_t, dkdv_t = _sm90_bwd_tiles(pattern, q.shape[2], k.shape[2])
            dq_plan = plan_for(pattern, q.shape[2], k.shape[2], *dq_t, q.shape[3])
            dkdv_plan = plan_for(pattern, q.shape[2], k.shape[2], *dkdv_t, q.shape[3])
    plan = plan_for(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.shape[3])
    lists = _lists(pattern, blocks, k.shape[2], q.shape[1])
    if impl == "triton":
        from .codegen.launch import backward

        lists_t = _lists(pattern, blocks, k.shape[2], q.shape[1], transposed=True)
        return backward(do, q, k, v, out, lse, plan, scale, lists=lists, lists_t=lists_t,
                        key_bias=key_bias, dq_plan=dq_plan, dkdv_plan=dkdv_plan)
    return blockwise_attention_backward(do, q, k, v, out, lse, plan, scale, lists=lists,
                                        key_bias=key_bias)


@attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, out, lse, pattern, scale, impl, q_tile, kv_tile,
                             blocks=None, key_bias=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale, impl, q_tile, kv_tile, blocks, key_bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, blocks, key_bias)
    ctx.args = (pattern, scale, impl, q_tile, kv_tile)


def _gradients(ctx, do: Tensor, backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
               ) -> tuple[Tensor | None, ...]:
    """The forward's inputs' gradients from ``_setup_context``'s saved state: ``backward`` (the
    backward op, or its body) for q, k and v, none for the rest."""
    q, k, v, out, lse, blocks, key_bias = ctx.saved_tensors
    dq, dk, dv = backward(do.contiguous(), q, k, v, out, lse, *ctx.args, blocks, key_bias)
    return dq, dk, dv, None, None, None, None, None, None, None


def _backward(ctx, do, dlse):
    return _gradients(ctx, do, attention_backward_op)


attention_op.register_autograd(_backward, setup_context=_setup_context)


class EagerAttention(torch.autograd.Function):
    """``attention_op`` with its autograd, for eager calls on plain tensors that need
    gradients: the same bodies without the custom ops' dispatch around them.

    The custom op's Python dispatch and autograd wrapper cost host time on every call, forward
    and backward (on a CPU core: ~45 us for the forward with autograd, against ~8 us for a
    Function). A short sparse kernel takes less than that, so an eager training step would
    wait on the host. Traced calls (torch.compile, export) must still see the op.
    """

    @staticmethod
    def forward(q, k, v, pattern, scale, impl, q_tile, kv_tile, blocks, key_bias):
        return attention_forward(q, k, v, pattern, scale, impl, q_tile, kv_tile, blocks,
                                 key_bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate: torch.func transforms need it
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros for lse's gradient (it is not used)
        _setup_context(ctx, inputs, output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        return _gradients(ctx, do, attention_backward)


# With setup_context separate, Function.apply binds forward's default arguments through
# inspect.signature on every call (~40 us of host time per call on a CPU core, before the
# forward's kernel launches); a signature stored on forward is read instead of rebuilt.
_forward = EagerAttention.forward
_forward.__signature__ = inspect.signature(_forward)  # type: ignore[attr-defined]
