"""Tile shapes: which boxes to cut the grid into, chosen by the tile bound they give.

The kernels run 128-token Q tiles and 128- or 64-token KV tiles (the sizes at which a Hopper
flash-attention loop is efficient). For an N-d grid, every box of that volume made of powers of
two that fits the grid is a candidate; the plan of each is cheap (per-axis states), so we build
them all and keep the one that visits the fewest tile-equivalents. Ties go to boxes whose last
axis is longest (longer contiguous runs of tokens per row in memory).
"""

from __future__ import annotations

import functools
import math

from ..spec.patterns import Pattern
from .tiles import TileShape, build_plan, grid_of

Q_TOKENS = 128
KV_TOKENS = 128


def boxes(volume: int, grid: tuple[int, ...]) -> list[TileShape]:
    """Power-of-two boxes of exactly ``volume`` tokens; no side longer than needed for the grid."""
    limits = [1 << max(0, math.ceil(math.log2(n))) for n in grid]
    out: list[TileShape] = []

    def rec(prefix: tuple[int, ...], left: int) -> None:
        axis = len(prefix)
        if axis == len(grid) - 1:
            if left <= limits[axis]:
                out.append((*prefix, left))
            return
        side = 1
        while side <= min(left, limits[axis]):
            rec((*prefix, side), left // side)
            side *= 2

    rec((), volume)
    return out


@functools.lru_cache(maxsize=128)
def default_tiles(pattern: Pattern, q_len: int, kv_len: int) -> tuple[TileShape, TileShape]:
    """(q_tile, kv_tile) for the kernels; 1-D patterns get (128,), (128,)."""
    grid = grid_of(pattern)
    if grid is None:
        return (Q_TOKENS,), (KV_TOKENS,)
    return best_boxes(pattern, q_len, kv_len, Q_TOKENS, KV_TOKENS)


def best_boxes(
    pattern: Pattern, q_len: int, kv_len: int, q_tokens: int, kv_tokens: int
) -> tuple[TileShape, TileShape]:
    grid = grid_of(pattern)
    assert grid is not None
    shape, dilation = grid
    group = tuple(-(-n // d) for n, d in zip(shape, dilation, strict=True))
    best: tuple[float, int, TileShape, TileShape] | None = None
    for qt in boxes(q_tokens, group):
        for kt in boxes(kv_tokens, group):
            plan = build_plan(pattern, q_len, kv_len, qt, kt)
            # Cost in tile-equivalents: visited KV tiles times their size, per Q tile.
            cost = plan.num_visited * kv_tokens * plan.num_q_tiles * q_tokens
            key = (cost, -kt[-1] - qt[-1], qt, kt)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[2], best[3]
