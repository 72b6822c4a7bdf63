"""Which kernels run a call: the warp-specialized Gluon kernels on Hopper where they apply
(``sm90``'s forward, ``sm90_bwd``'s dQ and dK/dV), the Triton kernels everywhere else (``fwd``,
``bwd``). Either forward runs any plan it takes and returns the same (out, lse); a call's
default tiles are those of the kernel that will run it (``forward_plan``). The backward reads
either forward's output, and each backward kernel is chosen on its own.

``SPCOMPILE_SM90=0`` turns the Gluon kernels off (the Triton kernels then run every call).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..plan.tiles import TilePlan
from ..plan.topk import BlockLists
from .bwd import attn_bwd, attn_bwd_dkdv, attn_bwd_dq, prepare
from .fwd import attn_fwd


@functools.lru_cache(maxsize=8)
def wgmma_device(index: int | None) -> bool:
    """Whether device ``index`` has Hopper's warpgroup MMA (sm_90: wgmma is not on sm_100)
    and this Triton has Gluon's Hopper module."""
    if torch.cuda.get_device_capability(index)[0] != 9:
        return False
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
    except ImportError:
        return False
    return True


def gluon_enabled(q: Tensor) -> bool:
    """Whether the Gluon kernels may run on q's device."""
    return (q.is_cuda and os.environ.get("SPCOMPILE_SM90", "1") != "0"
            and wgmma_device(q.device.index))


def forward_plan(build: Callable[[bool], TilePlan], q: Tensor, v: Tensor,
                 key_bias: Tensor | None = None) -> TilePlan:
    """The plan a forward call runs: ``build(specialized)`` for the kernel that will take it
    (``sm90.forward_plan`` where the Gluon kernels may run, else the Triton kernel's)."""
    if not gluon_enabled(q):
        return build(False)
    from .sm90 import forward_plan as sm90_forward_plan

    return sm90_forward_plan(build, q.dtype, q.shape[-1], v.shape[-1], key_bias is not None)


def forward_kernel(plan: TilePlan, q: Tensor, v: Tensor, key_bias: Tensor | None = None,
                   lists: BlockLists | None = None) -> str:
    """"sm90" or "triton": the kernel ``forward`` runs for this call."""
    from .sm90 import sm90_eligible

    if lists is None and gluon_enabled(q) and sm90_eligible(plan, q, v, key_bias):
        return "sm90"
    return "triton"


#: The most extra work (visited tile pairs x tile area, against the Triton backward's 64/64
#: plan) a Gluon backward kernel may take on and still be chosen. Its larger tiles waste more
#: on partial tiles. On the H100 (session 15, the persistent dK/dV; same rounds as the Triton
#: kernels), per unit of work the Gluon dK/dV ran 1.17-1.24x and the Gluon dQ 1.14-1.17x the
#: Triton kernels' speed, so both are faster up to about 1.15x the work: dK/dV 1.07x faster
#: at 1.158x the work (na2d31), 1.02x at 1.143x (na3d), 1.10-1.11x at 1.06x (na2d63,
#: flux_na); dQ even at 1.158x (na2d31), 1.07-1.10x at 1.06-1.07x
#: (benchmarks/data/2026-12-07-s15-h100-tune-sm90-bwd-nd.json).
GLUON_BWD_MAX_WORK = 1.16


#: Whether the Gluon dQ kernel (``sm90_bwd.attn_bwd_dq_sm90``) may run. Against the Triton dQ
#: kernel in the same rounds on the H100: 1.20x (blk16k) and 1.27x (flux_gna)
#: (benchmarks/data/2026-12-06-s9-h100-tune-sm90-bwd.json). False runs the Triton dQ.
GLUON_DQ = True


@functools.lru_cache(maxsize=256)
def _work(plan: TilePlan) -> int:
    """Visited tile pairs x tile area (the counts are sums over the plan: once per plan)."""
    return plan.num_visited * plan.q_layout.tile_size * plan.kv_layout.tile_size


def backward_kernels(q: Tensor, v: Tensor, key_bias: Tensor | None, plan: TilePlan,
                     dq_plan: TilePlan | None = None, dkdv_plan: TilePlan | None = None
                     ) -> tuple[str, str]:
    """("sm90" or "triton") for the dQ and the dK/dV kernel ``backward`` runs, given the
    Triton kernels' ``plan`` and the plans of ``sm90_bwd.dq_tiles`` and ``dkdv_tiles`` (None:
    not offered). A Gluon kernel runs where it is in scope and its plan does at most
    ``GLUON_BWD_MAX_WORK`` times the Triton plan's work (dQ: and ``GLUON_DQ`` is on)."""
    from .sm90_bwd import dkdv_in_scope, dq_in_scope

    args = (q.dtype, q.shape[-1], v.shape[-1], key_bias is not None)
    on = gluon_enabled(q)
    limit = GLUON_BWD_MAX_WORK * _work(plan)

    def pick(offered: TilePlan | None, in_scope: Callable[..., bool]) -> str:
        if not on or offered is None or not in_scope(offered, *args):
            return "triton"
        return "sm90" if _work(offered) <= limit else "triton"

    return pick(dq_plan if GLUON_DQ else None, dq_in_scope), pick(dkdv_plan, dkdv_in_scope)


def forward(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float | None = None,
            lists: BlockLists | None = None, key_bias: Tensor | None = None
            ) -> tuple[Tensor, Tensor]:
    """The forward of one call, on the kernel ``forward_kernel`` names (same contract as
    ``fwd.attn_fwd``). The Gluon kernel declines tensors TMA cannot describe (a base or a
    stride not 16-byte aligned); the Triton kernel runs those."""
    if forward_kernel(plan, q, v, key_bias, lists) == "sm90":
        from .sm90 import attn_fwd_sm90

        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        done = attn_fwd_sm90(q, k, v, plan, s)
        if done is not None:
            return done
    return attn_fwd(q, k, v, plan, scale, lists=lists, key_bias=key_bias)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             plan: TilePlan, scale: float | None = None, lists: BlockLists | None = None,
             lists_t: BlockLists | None = None, key_bias: Tensor | None = None,
             dq_plan: TilePlan | None = None, dkdv_plan: TilePlan | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one call (``bwd.attn_bwd``'s contract), each kernel on the Gluon kernel
    where ``backward_kernels`` says so, over ``dq_plan`` / ``dkdv_plan``, else (or where TMA
    cannot address the tensors) on the Triton kernel over ``plan``."""
    if lists is not None:
        return attn_bwd(do, q, k, v, out, lse, plan, scale, lists=lists, lists_t=lists_t,
                        key_bias=key_bias)
    from .sm90_bwd import attn_bwd_dkdv_sm90, attn_bwd_dq_sm90

    q, k, v, do, out, lse, scale = prepare(q, k, v, do, out, lse, scale)
    use_dq, use_dkdv = backward_kernels(q, v, key_bias, plan, dq_plan, dkdv_plan)
    got = None
    if use_dq == "sm90" and dq_plan is not None:
        got = attn_bwd_dq_sm90(do, q, k, v, out, lse, dq_plan, scale)
    dq, delta = got or attn_bwd_dq(do, q, k, v, out, lse, plan, scale, key_bias=key_bias)
    got = None
    if use_dkdv == "sm90" and dkdv_plan is not None:
        got = attn_bwd_dkdv_sm90(do, q, k, v, lse, delta, dkdv_plan, scale)
    dk, dv = got or attn_bwd_dkdv(do, q, k, v, lse, delta, plan, scale, key_bias=key_bias)
    return dq, dk, dv
