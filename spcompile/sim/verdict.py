"""Is a pattern perfectly block-sparse at these tiles, per axis, and if not, why not?

Perfectly block-sparse means no visited tile needs a mask: every (Q tile, KV tile) pair is
either empty or full. GNA (Hassani et al., 2025) states the conditions for a neighborhood per
axis: stride % q_tile == 0 (all queries of a tile share one window), window % kv_tile == 0
and window starts on a KV tile boundary (the window is whole tiles). The verdict here is exact,
read from the per-axis tile states the plan is built from; the reasons name the conditions
that fail, so a user knows which knob to turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan.states import PARTIAL, interval_axis_states, neighborhood_window
from ..plan.tiles import TilePlan
from ..spec.patterns import Blocked, Neighborhood, Pattern, Sliding

__all__ = ["AxisVerdict", "neighborhood_axis_block_sparse", "verdicts"]


@dataclass(frozen=True)
class AxisVerdict:
    """One axis (``axis`` None: the whole 1-D sequence) and why it is or is not block-sparse."""

    axis: int | None
    block_sparse: bool
    reason: str

    def to_dict(self) -> dict:
        return {"axis": self.axis, "block_sparse": self.block_sparse, "reason": self.reason}


def _group_lengths(length: int, dilation: int) -> list[int]:
    return sorted({length // dilation + (1 if g < length % dilation else 0)
                   for g in range(dilation)})


def neighborhood_axis_block_sparse(
    length: int, window: int, stride: int, dilation: int, causal: bool, q_tile: int,
    kv_tile: int,
) -> bool:
    """Exact: no partial tile pair on this axis, in any dilation group."""
    fn = neighborhood_window(window, stride, causal)
    for lg in _group_lengths(length, dilation):
        n_q, n_k = -(-lg // q_tile), -(-lg // kv_tile)
        states = interval_axis_states(fn, n_q, q_tile, n_k, kv_tile, torch.tensor(lg),
                                torch.tensor(lg))
        if bool((states == PARTIAL).any()):
            return False
    return True


def _window_starts(length: int, window: int, stride: int, causal: bool) -> list[int]:
    fn = neighborhood_window(window, stride, causal)
    lo, _ = fn(torch.arange(length), torch.tensor(length))
    return sorted(set(lo.tolist()))


def _neighborhood_axis(p: Neighborhood, a: int, q_tile: int, kv_tile: int) -> AxisVerdict:
    length, w, s, d, causal = p.shape[a], p.window[a], p.stride[a], p.dilation[a], p.causal[a]
    ok = neighborhood_axis_block_sparse(length, w, s, d, causal, q_tile, kv_tile)
    why: list[str] = []
    if causal and q_tile > 1:
        why.append("causal: queries of one tile see different keys (j <= i), so the diagonal "
                   "tiles are partial")
    if s % q_tile:
        why.append(f"stride {s} is not a multiple of the q tile side {q_tile} (queries of one "
                   "tile have different windows)")
    if w % kv_tile:
        why.append(f"window {w} is not a multiple of the kv tile side {kv_tile}")
    if not causal:
        lg = max(_group_lengths(length, d))
        bad = [x for x in _window_starts(lg, w, s, causal) if x % kv_tile]
        if bad:
            shown = ", ".join(map(str, bad[:4])) + (", ..." if len(bad) > 4 else "")
            why.append(f"window starts {shown} are not on kv tile boundaries (multiples of "
                       f"{kv_tile})")
    pad = [lg for lg in _group_lengths(length, d) if lg % kv_tile]
    if pad:
        why.append(f"axis length {pad[0]} is not a multiple of the kv tile side {kv_tile} "
                   "(the last tile is padded)")
    if ok:
        if why:
            reason = "no partial tiles on this axis (" + "; ".join(why) + ", but it does not "\
                "matter here)"
        else:
            reason = (f"stride {s} % q tile {q_tile} == 0, window {w} % kv tile {kv_tile} == 0, "
                      "window starts aligned")
        return AxisVerdict(a, True, reason)
    return AxisVerdict(a, False, "; ".join(why) if why else
                       "some tile pairs on this axis are only partly inside the windows")


def verdicts(pattern: Pattern, plan: TilePlan) -> list[AxisVerdict]:
    """Per-axis verdicts for neighborhoods; one whole-sequence verdict for 1-D patterns."""
    if isinstance(pattern, Neighborhood):
        return [_neighborhood_axis(pattern, a, plan.q_tile[a], plan.kv_tile[a])
                for a in range(len(pattern.shape))]
    q_tile, kv_tile = plan.q_layout.tile_size, plan.kv_layout.tile_size
    partial, visited = plan.num_partial, plan.num_visited
    if partial == 0:
        return [AxisVerdict(None, True, f"all {visited} visited tiles are full")]
    share = f"{partial} of {visited} visited tiles are partial"
    if isinstance(pattern, Sliding):
        if pattern.causal or pattern.right_extent == 0:
            edge = "the diagonal and the window's far edge cut"
        else:
            edge = "both edges of the band cut"
        reason = (f"{share}: a sliding window moves with every query, so {edge} diagonally "
                  f"through tiles; Blocked, or Neighborhood with a stride that is a multiple of "
                  f"the q tile ({q_tile}), is block-sparse")
    elif isinstance(pattern, Blocked):
        why = [f"block {pattern.block} is not a multiple of the {name} tile {t}"
               for name, t in (("q", q_tile), ("kv", kv_tile)) if pattern.block % t]
        if pattern.causal:
            why.append("causal blocks are triangular on their diagonal tiles")
        if plan.kv_len % kv_tile:
            why.append(f"kv_len {plan.kv_len} is not a multiple of the kv tile {kv_tile}")
        reason = f"{share}: " + ("; ".join(why) if why else "edge blocks")
    elif plan.gather is not None:
        reason = (f"{share}, {plan.num_gathered} of them the gathered global-key tiles "
                  "(masked, so keys are not counted twice)")
    else:
        reason = share
    return [AxisVerdict(None, False, reason)]
