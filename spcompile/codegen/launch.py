"""Which forward kernel runs a call: the warp-specialized Gluon kernel on Hopper where it
applies (``sm90``), the Triton kernel everywhere else (``fwd``). Both take the same plan and
return the same (out, lse); the backward reads either.

``SPCOMPILE_SM90=0`` turns the Gluon kernel off (the Triton kernel then runs every call).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from ..plan.tiles import TilePlan
from ..plan.topk import BlockLists
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


def forward_kernel(plan: TilePlan, q: Tensor, v: Tensor, key_bias: Tensor | None = None,
                   lists: BlockLists | None = None) -> str:
    """"sm90" or "triton": the kernel ``forward`` runs for this call."""
    from .sm90 import sm90_eligible

    if (lists is None and q.is_cuda and os.environ.get("SPCOMPILE_SM90", "1") != "0"
            and wgmma_device(q.device.index) and sm90_eligible(plan, q, v, key_bias)):
        return "sm90"
    return "triton"


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
