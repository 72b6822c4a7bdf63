"""Tile states: for every (Q tile, KV tile) pair, EMPTY, PARTIAL (needs the mask) or FULL.

Each pattern family registers how it fills the state matrix ``[n_q_tiles, n_kv_tiles]`` (int8)
without looking at individual (query, key) pairs wherever its structure allows:

- windows that are intervals monotone in the query coordinate (sliding, blocked, every axis of a
  neighborhood): per axis, a Q tile sees the union ``[lo(first), hi(last)]`` and every query of
  it sees the intersection ``[lo(last), hi(first)]``; N-d states are the per-axis states
  combined (the mask is an AND over axes, so a tile pair is full iff full on every axis);
- global tokens: per-tile counts of global keys / queries;
- block layouts: 2-D prefix sums over the block matrix;
- anything else: the exact mask evaluated tile pair by tile pair (``classify_by_mask``, chunked,
  never an S x S tensor), reported as the slow path.

States combine like a lattice: intersection (AND of masks) is the elementwise min, union the
elementwise max (a pair full in one member is full in the union; a pair partial in two members
may in truth be full, and is then masked needlessly but correctly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..spec.patterns import (
    AnyOf,
    Blocked,
    BlockLayout,
    Dense,
    Global,
    Neighborhood,
    Pattern,
    Sliding,
    Strided,
)
from .layout import TokenLayout

EMPTY, PARTIAL, FULL = 0, 1, 2

StateRule = Callable[[Pattern, TokenLayout, TokenLayout, int], Tensor]
_RULES: dict[type[Pattern], StateRule] = {}


def state_rule(cls: type[Pattern]) -> Callable[[StateRule], StateRule]:
    """Register how a pattern class fills the tile-state matrix."""

    def register(fn: StateRule) -> StateRule:
        _RULES[cls] = fn
        return fn

    return register


def tile_states(pattern: Pattern, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    """Int8 [q.num_tiles, kv.num_tiles]. ``offset`` = kv_len - q_len (1-D bottom-right align)."""
    rule = _RULES.get(type(pattern), _by_mask)
    return rule(pattern, q, kv, offset)


# ---------------------------------------------------------------------------------------------
# Per-tile facts shared by several rules


def _tile_tokens(layout: TokenLayout) -> Tensor:
    """Long [num_tiles, tile_size] flat token indices, -1 at padding."""
    return layout.token_index().view(layout.num_tiles, layout.tile_size)


def _has_padding(layout: TokenLayout) -> Tensor:
    return (_tile_tokens(layout) < 0).any(1)


def causal_states(q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    """States of the mask ``j <= i + offset`` on flat token positions."""
    qt, kt = _tile_tokens(q), _tile_tokens(kv)
    big = torch.iinfo(torch.long).max
    q_min = torch.where(qt >= 0, qt, big).min(1).values + offset
    q_max = qt.max(1).values + offset
    k_min = torch.where(kt >= 0, kt, big).min(1).values
    k_max = kt.max(1).values
    q_valid = (qt >= 0).any(1)
    out = torch.full((q.num_tiles, kv.num_tiles), PARTIAL, dtype=torch.int8)
    out[(k_min[None, :] > q_max[:, None]) | ~q_valid[:, None]] = EMPTY
    full = (k_max[None, :] <= q_min[:, None]) & ~_has_padding(kv)[None, :]
    out[full & (out != EMPTY)] = FULL
    return out


# ---------------------------------------------------------------------------------------------
# Monotone interval windows


IntervalFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def interval_axis_states(
    window: IntervalFn, n_q: int, q_tile: int, n_k: int, k_tile: int,
    q_len: Tensor, k_len: Tensor,
) -> Tensor:
    """States [n_q, n_k] on one axis for a window ``window(x, q_len) -> (lo, hi)``.

    ``lo``/``hi`` are nondecreasing in x (an empty window has hi < lo); ``q_len``/``k_len`` are
    this group's lengths on the axis (0-d tensors).
    """
    qc = torch.arange(n_q)
    first = qc * q_tile
    last = torch.minimum(first + q_tile - 1, q_len - 1)
    q_valid = first <= q_len - 1
    _, hi_first = window(first, q_len)
    lo_last, hi_last = window(last, q_len)
    kc = torch.arange(n_k)
    k_first = kc * k_tile
    k_last = torch.minimum(k_first + k_tile - 1, k_len - 1)
    k_valid = k_first <= k_len - 1
    k_padded = k_first + k_tile - 1 > k_len - 1
    # Rows with an empty window contribute nothing; windows are monotone so the union of the
    # non-empty ones is [lo of the first non-empty row, hi(last)].
    union_lo = _first_nonempty_lo(window, first, last, q_len)
    meets = (k_first[None, :] <= hi_last[:, None]) & (k_last[None, :] >= union_lo[:, None])
    meets &= q_valid[:, None] & k_valid[None, :]
    inside = (k_first[None, :] >= lo_last[:, None]) & (k_last[None, :] <= hi_first[:, None])
    inside &= ~k_padded[None, :]
    out = torch.where(meets, PARTIAL, EMPTY).to(torch.int8)
    out[meets & inside] = FULL
    return out


def _first_nonempty_lo(window: IntervalFn, first: Tensor, last: Tensor, q_len: Tensor) -> Tensor:
    lo_first, hi_first = window(first, q_len)
    lo = lo_first.clone()
    empty = hi_first < lo_first
    if bool(empty.any()):
        # Rare (queries before the start of a shorter KV): search each tile's rows.
        for t in empty.nonzero().flatten().tolist():
            rows = torch.arange(int(first[t]), int(last[t]) + 1)
            lo_r, hi_r = window(rows, q_len)
            ok = hi_r >= lo_r
            lo[t] = lo_r[ok][0] if bool(ok.any()) else lo_first[t]
    return lo


def _interval_states_1d(
    window: IntervalFn, q: TokenLayout, kv: TokenLayout, q_len: int, kv_len: int
) -> Tensor:
    if q.ndim != 1 or kv.ndim != 1 or q.dilation != (1,) or kv.dilation != (1,):
        raise ValueError("1-D window patterns need 1-D layouts without dilation")
    return interval_axis_states(window, q.num_tiles, q.tile[0], kv.num_tiles, kv.tile[0],
                          torch.tensor(q_len), torch.tensor(kv_len))


@state_rule(Sliding)
def _sliding(p: Sliding, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    kv_len = kv.num_tokens

    def window(x: Tensor, _: Tensor) -> tuple[Tensor, Tensor]:
        pos = x + offset
        return (pos - p.left_extent).clamp_min(0), (pos + p.right_extent).clamp_max(kv_len - 1)

    return _interval_states_1d(window, q, kv, q.num_tokens, kv_len)


@state_rule(Blocked)
def _blocked(p: Blocked, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    kv_len = kv.num_tokens

    def window(x: Tensor, _: Tensor) -> tuple[Tensor, Tensor]:
        pos = x + offset
        start = torch.div(pos, p.block, rounding_mode="floor") * p.block
        end = pos if p.causal else start + p.block - 1
        lo = start.clamp_min(0)
        hi = torch.where(pos < 0, -1, end.clamp_max(kv_len - 1))
        return lo, hi

    return _interval_states_1d(window, q, kv, q.num_tokens, kv_len)


def neighborhood_window(w: int, s: int, causal: bool) -> IntervalFn:
    """NATTEN's window on one axis, in coordinates inside one dilation group."""
    wl, wr = w // 2, w // 2 + w % 2 - 1

    def window(x: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        if causal:
            leader = torch.minimum((x // s) * s + s - 1, length - 1)
            return (leader - w + 1).clamp_min(0), x
        leader = torch.minimum((x // s) * s + s // 2, length - 1)
        center = torch.maximum(torch.minimum(leader, length - 1 - wr), torch.tensor(wl))
        return center - wl, center + wr

    return window


@state_rule(Neighborhood)
def _neighborhood(p: Neighborhood, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    if q.grid != p.shape or kv.grid != p.shape or not q.dilation == kv.dilation == p.dilation:
        raise ValueError("Neighborhood plans need layouts over the pattern's grid and dilation")
    out = torch.zeros(q.num_tiles, kv.num_tiles, dtype=torch.int8)
    for g in range(q.num_groups):
        group = [int(x) for x in torch.tensor(g).new_tensor(
            [(g // _inner(p.dilation, a)) % p.dilation[a] for a in range(len(p.shape))])]
        state = None
        for a in range(len(p.shape)):
            length = q.group_length(a, torch.tensor(group[a]))
            axis = interval_axis_states(
                neighborhood_window(p.window[a], p.stride[a], p.causal[a]),
                q.tiles_per_axis[a], q.tile[a], kv.tiles_per_axis[a], kv.tile[a], length, length,
            )
            state = axis if state is None else _outer_min(state, axis)
        assert state is not None
        qs, ks = g * q.tiles_per_group, g * kv.tiles_per_group
        out[qs : qs + q.tiles_per_group, ks : ks + kv.tiles_per_group] = state
    return out


def _inner(shape: tuple[int, ...], axis: int) -> int:
    out = 1
    for n in shape[axis + 1 :]:
        out *= n
    return out


def _outer_min(a: Tensor, b: Tensor) -> Tensor:
    """N-d AND: [qa, ka] x [qb, kb] -> [qa*qb, ka*kb] with row-major tile numbering."""
    qa, ka = a.shape
    qb, kb = b.shape
    out = torch.minimum(a[:, None, :, None], b[None, :, None, :])
    return out.reshape(qa * qb, ka * kb)


# ---------------------------------------------------------------------------------------------
# Dense, global tokens, block layouts, unions


@state_rule(Dense)
def _dense(p: Dense, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    q_valid = (_tile_tokens(q) >= 0).any(1)
    out = torch.where(_has_padding(kv), PARTIAL, FULL).to(torch.int8)
    out = out[None, :].expand(q.num_tiles, -1).clone()
    out[~q_valid] = EMPTY
    return out


@state_rule(Global)
def _global(p: Global, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    qt, kt = _tile_tokens(q), _tile_tokens(kv)
    out = torch.zeros(q.num_tiles, kv.num_tiles, dtype=torch.int8)
    big = torch.iinfo(torch.long).max
    q_valid = (qt >= 0).any(1)
    if p.columns:
        is_g = p.is_global(kt.clamp_min(0)) & (kt >= 0)
        n_g = is_g.sum(1)
        col = torch.where(n_g > 0, PARTIAL, EMPTY).to(torch.int8)
        col[n_g == kv.tile_size] = FULL
        col = col[None, :].expand(q.num_tiles, -1).clone()
        if p.causal:
            # Non-empty iff some global key of the tile is at or before the last query; full
            # needs the whole KV tile global and before every query.
            min_g = torch.where(is_g, kt, big).min(1).values
            q_max = qt.max(1).values + offset
            causal_full = causal_states(q, kv, offset) == FULL
            col = torch.where((col == FULL) & ~causal_full, PARTIAL, col).to(torch.int8)
            col[min_g[None, :] > q_max[:, None]] = EMPTY
        out = torch.maximum(out, col)
    if p.rows:
        pos = qt + offset
        is_g = p.is_global(pos.clamp_min(0)) & (qt >= 0) & (pos >= 0)
        n_g, n_valid = is_g.sum(1), (qt >= 0).sum(1)
        row = torch.where(n_g > 0, PARTIAL, EMPTY).to(torch.int8)[:, None]
        row = row.expand(-1, kv.num_tiles).clone()
        all_rows = (n_g == n_valid) & (n_g > 0)
        row[all_rows[:, None] & ~_has_padding(kv)[None, :]] = FULL
        if p.causal:
            row = torch.minimum(row, causal_states(q, kv, offset))
        out = torch.maximum(out, row)
    out[~q_valid] = EMPTY
    return out


@state_rule(BlockLayout)
def _block_layout(p: BlockLayout, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    if q.ndim != 1 or kv.ndim != 1:
        raise ValueError("BlockLayout plans need 1-D layouts")
    kv_len = kv.num_tokens
    n_blocks = -(-kv_len // p.block)
    mask = p.block_mask(n_blocks).to(torch.int32)
    # prefix[r, c] = number of set blocks in mask[:r, :c]
    prefix = torch.zeros(n_blocks + 1, n_blocks + 1, dtype=torch.int32)
    prefix[1:, 1:] = mask.cumsum(0).cumsum(1)

    def block_range(layout: TokenLayout, length: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
        first = torch.arange(layout.num_tiles) * layout.tile[0]
        last = torch.minimum(first + layout.tile[0] - 1, torch.tensor(length - 1))
        lo = ((first + shift).clamp(0, kv_len - 1)) // p.block
        hi = ((last + shift).clamp(0, kv_len - 1)) // p.block
        return lo, hi, first <= length - 1

    qlo, qhi, q_valid = block_range(q, q.num_tokens, offset)
    klo, khi, k_valid = block_range(kv, kv_len, 0)
    # Queries placed before key 0 (q_len > kv_len) have no block row and see nothing: a tile
    # holding one is never full, a tile of only those is empty.
    q_first = torch.arange(q.num_tiles) * q.tile[0] + offset
    q_last = torch.minimum(q_first + q.tile[0] - 1, torch.tensor(kv_len - 1))
    r0, r1 = qlo[:, None], qhi[:, None] + 1
    c0, c1 = klo[None, :], khi[None, :] + 1
    count = prefix[r1, c1] - prefix[r0, c1] - prefix[r1, c0] + prefix[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    out = torch.where(count > 0, PARTIAL, EMPTY).to(torch.int8)
    out[(count == area) & ~_has_padding(kv)[None, :] & (q_first >= 0)[:, None]] = FULL
    out[~q_valid[:, None] | ~k_valid[None, :] | (q_last < 0)[:, None]] = EMPTY
    if p.causal:
        out = torch.minimum(out, causal_states(q, kv, offset))
    return out


@state_rule(AnyOf)
def _any_of(p: AnyOf, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    out = tile_states(p.patterns[0], q, kv, offset)
    for member in p.patterns[1:]:
        out = torch.maximum(out, tile_states(member, q, kv, offset))
    if p.causal:
        out = torch.minimum(out, causal_states(q, kv, offset))
    return out


# ---------------------------------------------------------------------------------------------
# The exact, slow path


def classify_by_mask(
    pattern: Pattern, q: TokenLayout, kv: TokenLayout, offset: int,
    max_elements: int = 1 << 25,
) -> Tensor:
    """Exact states from the mask itself, a chunk of Q tiles at a time (never S x S at once)."""
    qt, kt = _tile_tokens(q), _tile_tokens(kv)
    q_len, kv_len = q.num_tokens, kv.num_tokens
    # ``allowed`` takes query indices; offset is applied by the pattern itself.
    del offset
    out = torch.empty(q.num_tiles, kv.num_tiles, dtype=torch.int8)
    per_q_tile = q.tile_size * kv.num_tiles * kv.tile_size
    chunk = max(1, max_elements // per_q_tile)
    kj = kt.clamp_min(0).reshape(1, 1, -1)
    k_ok = (kt >= 0).reshape(1, 1, -1)
    for start in range(0, q.num_tiles, chunk):
        rows = qt[start : start + chunk]
        qi = rows.clamp_min(0)[:, :, None]
        q_ok = (rows >= 0)[:, :, None]
        allowed = pattern.allowed(qi, kj, q_len, kv_len) & k_ok
        allowed = allowed.view(rows.shape[0], q.tile_size, kv.num_tiles, kv.tile_size)
        any_ = (allowed & q_ok[..., None]).any(3).any(1)
        all_ = (allowed | ~q_ok[..., None]).all(3).all(1)
        state = torch.where(any_, PARTIAL, EMPTY).to(torch.int8)
        state[all_ & any_] = FULL
        out[start : start + chunk] = state
    return out


def _by_mask(pattern: Pattern, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    return classify_by_mask(pattern, q, kv, offset)


@state_rule(Strided)
def _strided(p: Strided, q: TokenLayout, kv: TokenLayout, offset: int) -> Tensor:
    # Stride columns hit every tile wider than the stride, so every causal pair is visited
    # anyway; the exact per-pair check costs O(visited pairs x tile area).
    return classify_by_mask(p, q, kv, offset)


def has_rule(pattern: Pattern) -> bool:
    """True when the pattern's states come from structure rather than the per-pair mask."""
    if isinstance(pattern, AnyOf):
        return all(has_rule(m) for m in pattern.patterns)
    return type(pattern) in _RULES and not isinstance(pattern, Strided)
