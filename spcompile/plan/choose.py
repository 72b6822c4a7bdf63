"""Tile shapes: which boxes to cut the grid into, chosen by the tile bound they give.

Token counts per tile come from the H100 sweeps in benchmarks/data/: 1-D patterns ran best
with 128-token Q tiles and 64-token KV tiles (blk16k 10.3x vs 8.9x with 128/128,
2026-11-23-h100-tune.json). N-d boxes hold 128 Q tokens and 128 or 64 KV tokens: at equal tile
bound 128/128 runs ~10% faster (``ND_KV_RATE``), so 64-token KV boxes win only where they visit
enough fewer tile-equivalents (na3d). Head dims above 128 halve the Q tile to keep K/V stages in
shared memory. For an N-d grid, every box of a volume made of powers of two that fits the grid
is a candidate; the plan of each is cheap (per-axis states), so we build them all and keep the
one that visits the fewest tile-equivalents. Ties go to boxes whose last axis is longest (longer
contiguous runs of tokens per row in memory).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from ..spec.patterns import Neighborhood, Pattern
from .states import EMPTY, interval_axis_states, neighborhood_window
from .tiles import TileShape, build_plan, grid_of

#: Per-tile rate of the N-d forward by KV tokens per box (Q boxes of 128 tokens, 8 warps,
#: 3 stages both), relative to 128. Measured on the H100 as (speedup ratio) / (tile-bound
#: ratio) of 64- against 128-token KV boxes over 12 row pairs, two runs
#: (benchmarks/data/2026-11-23-s5-h100-tune-nd.json, -rescale.json): median 0.906, range
#: 0.87-1.06.
ND_KV_RATE = {128: 1.0, 64: 0.906}


#: KV tokens per tile of 1-D plans for the warp-specialized Hopper forward (``codegen.sm90``).
#: At 64 tokens each consumer's MMAs (64 x 64 x 128) are too short to hide the per-tile barrier
#: round trips. On the H100, over SDPA in the same rounds: sw16k 6.87x at 128 against 6.00x at
#: 64, blk16k 13.16x against 12.36x (the Triton kernel: 5.97x, 11.79x)
#: (benchmarks/data/2026-12-06-s9-h100-tune-sm90-fwd.json). The tile bounds of the suite's 1-D
#: rows are the same at 64 and 128.
SPECIALIZED_KV_1D = 128


def tile_tokens(ndim: int, head_dim: int, specialized: bool = False) -> tuple[int, int]:
    """(Q tokens, KV tokens) per tile for a layout of ``ndim`` axes (N-d: the larger KV box;
    ``default_tiles`` also weighs the smaller one). ``specialized``: for the warp-specialized
    Hopper forward (``SPECIALIZED_KV_1D``)."""
    if head_dim > 128:
        return 64, 64
    if ndim == 1:
        return 128, SPECIALIZED_KV_1D if specialized else 64
    return 128, 128


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


def _candidates(volume: int, grid: tuple[int, ...]) -> list[TileShape]:
    """``boxes``, or when the grid holds fewer tokens than a tile (a 7x7 grid, a small dilation
    group), the one box covering it, padded along the last axis: tiles keep the token counts the
    kernels are tuned and built for."""
    out = boxes(volume, grid)
    if out:
        return out
    sides = [1 << max(0, math.ceil(math.log2(n))) for n in grid[:-1]]
    return [(*sides, volume // math.prod(sides))]


@functools.lru_cache(maxsize=128)
def default_tiles(
    pattern: Pattern, q_len: int, kv_len: int, head_dim: int = 128, specialized: bool = False
) -> tuple[TileShape, TileShape]:
    """(q_tile, kv_tile) for the forward kernels: fixed sizes for 1-D, the best boxes for N-d
    grids. ``specialized``: the call runs on the warp-specialized Hopper forward."""
    grid = grid_of(pattern)
    q_tokens, kv_tokens = tile_tokens(1 if grid is None else len(grid[0]), head_dim,
                                      specialized)
    if grid is None:
        return (q_tokens,), (kv_tokens,)
    if head_dim > 128:
        return best_boxes(pattern, q_len, kv_len, q_tokens, kv_tokens)
    # Cost of each KV box size: tile-equivalents visited, over the size's per-tile rate.
    options = []
    for kv, rate in ND_KV_RATE.items():
        visited, qt, kt = _best_boxes(pattern, q_len, kv_len, q_tokens, kv)
        options.append((visited * kv / rate, -kv, qt, kt))
    _, _, qt, kt = min(options)
    return qt, kt


def backward_tiles(
    pattern: Pattern, q_len: int, kv_len: int, head_dim: int = 128
) -> tuple[TileShape, TileShape]:
    """(q_tile, kv_tile) for the backward kernels when the caller chose none: 64-token tiles.

    The backward needs only the forward's output and LSE, so its tiles are its own. Its dK/dV
    and dQ loops each hold five tile products, and 128-token tiles run them at 8 warps and one
    or two stages; 64-token tiles run at 4 warps, 2 stages. On the H100 (head-major programs,
    benchmarks/data/2026-11-23-s4-h100-bwd-orders.json), fwd+bwd over SDPA's: sw32k 7.03x at the
    forward's 128/64 -> 9.60x at 64/64, blk16k 6.21x -> 8.24x; N-d boxes of 64 tokens beat
    every 128-token pair tried (na2d31 6.11x vs 4.02-4.47x, na3d 5.86x vs 3.24-4.17x,
    hunyuan_gna 7.20x vs 5.49-5.87x).
    """
    if grid_of(pattern) is None:
        return (64,), (64,)
    return best_boxes(pattern, q_len, kv_len, 64, 64)


def best_boxes(
    pattern: Pattern, q_len: int, kv_len: int, q_tokens: int, kv_tokens: int
) -> tuple[TileShape, TileShape]:
    """The box pair visiting the fewest tile-equivalents.

    A neighborhood's tile states are the outer product of per-axis states, so the number of
    visited tile pairs is the product of per-axis counts (summed over dilation groups): each
    candidate costs a few tiny per-axis matrices, not a plan.
    """
    _, qt, kt = _best_boxes(pattern, q_len, kv_len, q_tokens, kv_tokens)
    return qt, kt


def _best_boxes(
    pattern: Pattern, q_len: int, kv_len: int, q_tokens: int, kv_tokens: int
) -> tuple[int, TileShape, TileShape]:
    """(visited tile pairs, q box, kv box) of ``best_boxes``."""
    grid = grid_of(pattern)
    assert grid is not None
    shape, dilation = grid
    group = tuple(-(-n // d) for n, d in zip(shape, dilation, strict=True))
    if not isinstance(pattern, Neighborhood):
        candidates = [(qt, kt) for qt in _candidates(q_tokens, group)
                      for kt in _candidates(kv_tokens, group)]
        costs = [build_plan(pattern, q_len, kv_len, qt, kt).num_visited for qt, kt in candidates]
        visited, (qt, kt) = min(zip(costs, candidates, strict=True),
                                key=lambda c: (c[0], -c[1][0][-1]))
        return visited, qt, kt

    @functools.cache
    def axis_visits(a: int, g: int, qt: int, kt: int) -> int:
        length = torch.tensor(shape[a] // dilation[a] + (1 if g < shape[a] % dilation[a] else 0))
        n_q, n_k = -(-group[a] // qt), -(-group[a] // kt)
        window = neighborhood_window(pattern.window[a], pattern.stride[a], pattern.causal[a])
        return int((interval_axis_states(window, n_q, qt, n_k, kt, length, length) != EMPTY).sum())

    best: tuple[int, int, TileShape, TileShape] | None = None
    for qt in _candidates(q_tokens, group):
        for kt in _candidates(kv_tokens, group):
            visited = sum(
                math.prod(axis_visits(a, g[a], qt[a], kt[a]) for a in range(len(shape)))
                for g in itertools.product(*[range(d) for d in dilation])
            )
            key = (visited, -kt[-1] - qt[-1], qt, kt)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[0], best[2], best[3]
