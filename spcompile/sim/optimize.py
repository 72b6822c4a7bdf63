"""Recommendations: which tile shapes to run, and which strides make a neighborhood block-sparse.

Tiles: the candidates are the tile volumes the profile has measured launch configurations for;
for N-d grids, the power-of-two boxes of each volume (``plan.choose.boxes``), pre-ranked by the
tiles they visit (cheap, per axis), then costed by the simulator; the ranking is by predicted
time, not tile count, so wave quantization and partial-tile cost decide between near ties.

Strides (GNA): per axis, a neighborhood is perfectly block-sparse when the stride is a multiple
of the q tile side, the window a multiple of the kv tile side, and window starts fall on kv tile
boundaries. For each tile shape (fastest first) we look, per axis, for the smallest stride (and,
only if no stride suffices, the nearest window) that makes the axis block-sparse, checked exactly
on the per-axis tile states; the distinct changes are costed, those that keep the window first,
then by predicted speedup, each with what it changes in the pattern's meaning.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan.choose import best_boxes, boxes
from ..plan.states import EMPTY, interval_axis_states, neighborhood_window
from ..plan.tiles import grid_of
from ..spec.patterns import Dense, Neighborhood, Pattern, PerHead, TopK
from .hardware import LaunchKey, load_profile
from .report import SimReport
from .simulate import resolve_device, simulate
from .verdict import neighborhood_axis_block_sparse

__all__ = ["Recommendation", "StrideOption", "TileOption", "recommend"]

#: Boxes per tile volume kept for costing after the tile-count pre-ranking.
BOXES_PER_VOLUME = 3
#: Stride changes costed and reported (the smallest changes first).
STRIDE_OPTIONS = 3


def _fmt(t: tuple[int, ...]) -> str:
    return "x".join(map(str, t))


@dataclass(frozen=True)
class TileOption:
    """One tile shape, costed."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    launch: str
    predicted_ms: float
    predicted_speedup: float
    tile_bound: float
    block_sparse: bool
    default: bool

    def to_dict(self) -> dict[str, Any]:
        return {"q_tile": list(self.q_tile), "kv_tile": list(self.kv_tile),
                "launch": self.launch, "predicted_ms": self.predicted_ms,
                "predicted_speedup": self.predicted_speedup, "tile_bound": self.tile_bound,
                "block_sparse": self.block_sparse, "default": self.default}


@dataclass(frozen=True)
class StrideOption:
    """A neighborhood made perfectly block-sparse at given tiles, and what that changes."""

    pattern: Neighborhood
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    stride: tuple[int, ...]
    window: tuple[int, ...]
    flop_bound: tuple[float, float]  # (before, after)
    tile_bound: tuple[float, float]
    predicted_speedup: tuple[float, float]
    semantics: str

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern.to_dict(), "q_tile": list(self.q_tile),
                "kv_tile": list(self.kv_tile), "stride": list(self.stride),
                "window": list(self.window), "flop_bound": list(self.flop_bound),
                "tile_bound": list(self.tile_bound),
                "predicted_speedup": list(self.predicted_speedup), "semantics": self.semantics}


@dataclass
class Recommendation:
    """Ranked tile shapes (fastest first) and stride changes (smallest change first)."""

    current: SimReport
    tiles: list[TileOption] = field(default_factory=list)
    strides: list[StrideOption] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> TileOption | None:
        return self.tiles[0] if self.tiles else None

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current.to_dict(), "tiles": [t.to_dict() for t in self.tiles],
                "strides": [s.to_dict() for s in self.strides], "notes": self.notes}

    def render(self) -> str:
        lines = ["recommendation:"]
        if self.tiles:
            lines.append("  tiles (fastest first):")
            for t in self.tiles:
                mark = "  (default)" if t.default else ""
                lines.append(f"    q {_fmt(t.q_tile):8s} kv {_fmt(t.kv_tile):8s} {t.launch:18s} "
                             f"{t.predicted_speedup:6.2f}x  tile bound {t.tile_bound:6.2f}"
                             f"{'  block-sparse' if t.block_sparse else ''}{mark}")
        if self.strides:
            lines.append("  perfectly block-sparse variants:")
            for s in self.strides:
                lines.append(f"    stride {_fmt(s.stride)}, window {_fmt(s.window)} at q "
                             f"{_fmt(s.q_tile)} kv {_fmt(s.kv_tile)}: {s.semantics}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def recommend(
    pattern: Pattern, q_len: int | None = None, kv_len: int | None = None, *, batch: int = 1,
    heads: int = 24, kv_heads: int | None = None, head_dim: int = 128,
    dtype: torch.dtype | str = "bf16", device: str = "h100", top: int = 5,
) -> Recommendation:
    """Rank tile shapes by predicted time; for neighborhoods, the strides that make the pattern
    perfectly block-sparse and what they change. Arguments as :func:`simulate`."""
    profile, _ = resolve_device(device)
    problem = dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   dtype=dtype, device=profile)
    current = simulate(pattern, q_len, kv_len, **problem)
    q_len, kv_len = current.q_len, current.kv_len
    out = Recommendation(current)
    if isinstance(pattern, (Dense, PerHead, TopK)):
        out.notes.append({Dense: "dense sites run SDPA: nothing to tile",
                          PerHead: "recommend per head group: call recommend on each member",
                          TopK: "top-k tiles are its block size"}[type(pattern)])
        return out
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for q_tile, kv_tile in _tile_candidates(pattern, q_len, kv_len, profile.name):
        if (q_tile, kv_tile) in seen:
            continue
        seen.add((q_tile, kv_tile))
        try:
            r = simulate(pattern, q_len, kv_len, q_tile=q_tile, kv_tile=kv_tile, **problem)
        except ValueError:
            continue
        out.tiles.append(TileOption(
            q_tile, kv_tile, str(r.launch), r.predicted_ms, r.predicted_speedup, r.tile_bound,
            r.block_sparse, (q_tile, kv_tile) == (current.q_tile, current.kv_tile)))
    out.tiles.sort(key=lambda t: t.predicted_ms)
    if isinstance(pattern, Neighborhood):
        out.strides = _stride_options(pattern, out.tiles, current, problem)
        if any(pattern.causal):
            out.notes.append("a causal axis is block-sparse only with a q tile side of 1 on it "
                             "(the diagonal tiles are masked otherwise)")
    keep = out.tiles[:top]
    if not any(t.default for t in keep):
        keep += [t for t in out.tiles if t.default]
    out.tiles = keep
    return out


# ---------------------------------------------------------------------------------------------
# Tile candidates


def _volumes(profile_name: str) -> list[tuple[int, int]]:
    keys = [LaunchKey.parse(k) for k in load_profile(profile_name).kernel.efficiency]
    return sorted({(k.q_tokens, k.kv_tokens) for k in keys}, reverse=True)


def _tile_candidates(pattern: Pattern, q_len: int, kv_len: int, profile_name: str
                     ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    grid = grid_of(pattern)
    volumes = _volumes(profile_name)
    if grid is None:
        return [((q,), (kv,)) for q, kv in volumes]
    out = []
    for q_tokens, kv_tokens in volumes:
        if isinstance(pattern, Neighborhood):
            out += _ranked_boxes(pattern, q_tokens, kv_tokens)[:BOXES_PER_VOLUME]
        else:
            out.append(best_boxes(pattern, q_len, kv_len, q_tokens, kv_tokens))
    return out


def _ranked_boxes(p: Neighborhood, q_tokens: int, kv_tokens: int
                  ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Box pairs by visited tiles (the product of per-axis counts, summed over dilation
    groups), ties to longer last axes (longer contiguous rows)."""
    group = tuple(-(-n // d) for n, d in zip(p.shape, p.dilation, strict=True))

    @functools.cache
    def axis_visits(a: int, g: int, qt: int, kt: int) -> int:
        length = torch.tensor(p.shape[a] // p.dilation[a] + (1 if g < p.shape[a] % p.dilation[a]
                                                              else 0))
        n_q, n_k = -(-group[a] // qt), -(-group[a] // kt)
        fn = neighborhood_window(p.window[a], p.stride[a], p.causal[a])
        return int((interval_axis_states(fn, n_q, qt, n_k, kt, length, length) != EMPTY).sum())

    scored = []
    for qt in boxes(q_tokens, group):
        for kt in boxes(kv_tokens, group):
            visited = sum(
                math.prod(axis_visits(a, g[a], qt[a], kt[a]) for a in range(len(p.shape)))
                for g in itertools.product(*[range(d) for d in p.dilation]))
            scored.append(((visited, -kt[-1] - qt[-1]), qt, kt))
    scored.sort()
    return [(qt, kt) for _, qt, kt in scored]


# ---------------------------------------------------------------------------------------------
# Strides that make a neighborhood perfectly block-sparse


def _axis_options(p: Neighborhood, a: int, qt: int, kt: int) -> tuple[int, int] | None:
    """(stride, window) on axis ``a``: the smallest change that makes it block-sparse."""
    length, w, s, d, causal = p.shape[a], p.window[a], p.stride[a], p.dilation[a], p.causal[a]
    if neighborhood_axis_block_sparse(length, w, s, d, causal, qt, kt):
        return s, w
    if causal:
        return None
    windows = [w]
    if w % kt:
        down, up = (w // kt) * kt, (w // kt + 1) * kt
        # Nearest first; on a tie the larger window (a superset of the keys asked for).
        windows += sorted((x for x in (down, up) if x > 0 and x * d <= length),
                          key=lambda x: (abs(x - w), -x))
    for window in windows:
        stride = max(qt, -(-s // qt) * qt)
        while stride <= window:
            if neighborhood_axis_block_sparse(length, window, stride, d, causal, qt, kt):
                return stride, window
            stride += qt
    return None


def _semantics(p: Neighborhood, stride: tuple[int, ...], window: tuple[int, ...],
               flop_bound: float, before: TileOption, after: SimReport) -> str:
    parts = []
    if stride != p.stride:
        parts.append(f"stride {_fmt(stride)} groups queries into {_fmt(stride)} blocks that "
                     "share one window")
    if window != p.window:
        parts.append(f"window {_fmt(p.window)} -> {_fmt(window)}: each query sees "
                     f"{math.prod(window)} instead of {math.prod(p.window)} keys")
    fb0, fb1 = flop_bound, after.flop_bound
    if abs(fb1 - fb0) <= 0.005 * fb0:
        parts.append(f"FLOP bound unchanged ({fb0:.2f})")
    else:
        parts.append(f"FLOP bound {fb0:.2f} -> {fb1:.2f}")
    parts.append(f"tile bound {before.tile_bound:.2f} -> {after.tile_bound:.2f}")
    parts.append(f"predicted {before.predicted_speedup:.2f}x -> {after.predicted_speedup:.2f}x")
    return "; ".join(parts)


def _stride_options(p: Neighborhood, tiles: list[TileOption], current: SimReport,
                    problem: dict[str, Any]) -> list[StrideOption]:
    """Per tile shape, the smallest per-axis change to block-sparse; one simulation per
    distinct change, at the tile shape that ran it fastest before the change."""
    changes: dict[tuple[tuple[int, ...], tuple[int, ...]], TileOption] = {}
    for t in tiles:  # fastest first: the first tile shape for a change is kept
        per_axis = [_axis_options(p, a, t.q_tile[a], t.kv_tile[a]) for a in range(len(p.shape))]
        if any(x is None for x in per_axis):
            continue
        stride = tuple(x[0] for x in per_axis)  # type: ignore[index]
        window = tuple(x[1] for x in per_axis)  # type: ignore[index]
        if (stride, window) != (p.stride, p.window):
            changes.setdefault((stride, window), t)
    # Keep the window where a stride suffices; among those, the fastest tile shapes first.
    ranked = sorted(changes.items(), key=lambda item: sum(
        w != v for w, v in zip(item[0][1], p.window, strict=True)))
    out = []
    for (stride, window), t in ranked[:STRIDE_OPTIONS]:
        changed = Neighborhood(shape=p.shape, window=window, stride=stride,
                               dilation=p.dilation, causal=p.causal)
        after = simulate(changed, q_tile=t.q_tile, kv_tile=t.kv_tile, **problem)
        out.append(StrideOption(
            changed, t.q_tile, t.kv_tile, stride, window,
            (current.flop_bound, after.flop_bound), (t.tile_bound, after.tile_bound),
            (t.predicted_speedup, after.predicted_speedup),
            _semantics(p, stride, window, current.flop_bound, t, after)))
    out.sort(key=lambda o: (sum(w != v for w, v in zip(o.window, p.window, strict=True)),
                            -o.predicted_speedup[1]))
    return out
