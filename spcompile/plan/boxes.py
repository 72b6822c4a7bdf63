"""Visiting lists that are boxes of the tile grid, stored as a corner and extents.

A static pattern's FULL tiles for one Q tile are, for the patterns that matter most, a box of
the KV tile grid: a run of tiles for a 1-D sliding window or block, a rectangle or cuboid of
boxes for a 2-D / 3-D neighborhood. The kernel then computes the ``it``-th tile of the box from
``it`` alone,

    kv_tile = corner + sum_a off_a * inner_a,   off = unravel(it, extents),
    inner_a = prod(tiles_per_axis[a + 1:]),

instead of reading it from an index list. The address of every K/V load is then a function of
the loop counter only, so the software pipeliner can issue it stages ahead without first
waiting on a global-memory load of the index (what the per-tile cost of run-time lists,
``list_tile_us`` in the simulator, measures).

The box is derived from the plan's own lists and checked against them entry by entry: a row is
a box exactly when its ascending list equals the box's row-major enumeration, so the two loop
forms visit the same tiles in the same order by construction. Lists that are not boxes (unions,
strided patterns, top-k) keep the list loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import TokenLayout


def box_offsets(it: Tensor, extents: list[Tensor], inner: tuple[int, ...]) -> Tensor:
    """Tile-id offset of the ``it``-th tile of a box from its corner; ``extents`` are the box's
    sizes on axes 1.. (axis 0 takes what is left), ``inner`` the tile-id strides per axis.
    The kernels emit the same arithmetic (``codegen.fwd.box_tile_lines``)."""
    off = torch.zeros_like(it)
    rest = it
    for a in range(len(inner) - 1, 0, -1):
        e = extents[a - 1]
        off = off + (rest % e) * inner[a]
        rest = rest // e
    return off + rest * inner[0]


def tile_strides(layout: TokenLayout) -> tuple[int, ...]:
    """Per axis, how far one step along it moves the tile id (row-major boxes in a group)."""
    per = layout.tiles_per_axis
    return tuple(math.prod(per[a + 1 :]) for a in range(layout.ndim))


def box_lists(idx: Tensor, cnt: Tensor, layout: TokenLayout) -> Tensor | None:
    """Per row of the ascending lists ``idx`` [n, w] / ``cnt`` [n], its box as int32
    [n, ndim]: the corner tile id, then the extents of axes 1..ndim-1. None when some row's
    list is not a box of ``layout``'s tiles (then the kernels read the list).
    """
    n, width = idx.shape
    nd = layout.ndim
    idx = idx.long()
    cnt = cnt.long()
    slot = torch.arange(width)[None, :]
    live = slot < cnt[:, None]
    corner = idx[:, 0]
    _, box = layout.tile_coords(idx)
    _, corner_box = layout.tile_coords(corner)
    extents = []
    for a in range(1, nd):
        top = torch.where(live, box[a], -1).amax(1)
        extents.append((top - corner_box[a] + 1).clamp_min(1))
    it = slot.expand(n, width)
    expect = corner[:, None] + box_offsets(it, [e[:, None] for e in extents], tile_strides(layout))
    if not bool(torch.where(live, expect == idx, True).all()):
        return None
    return torch.stack([corner, *extents], 1).to(torch.int32).contiguous()
