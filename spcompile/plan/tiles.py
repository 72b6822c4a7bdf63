"""Tile plans: the single source of truth for what the kernels, the CPU path and the simulator do.

A plan lists, for each Q tile, the KV tiles it visits, split into FULL tiles (no mask) and
PARTIAL tiles (mask evaluated per element), in ascending KV order; empty tiles are never listed.
The forward kernel runs two loops per Q tile over exactly these lists; the backward kernels read
the transposed lists; the simulator costs exactly these tiles; the CPU path computes exactly
these tiles. Q tiles are scheduled longest-first, so the short ones fill the last wave.

Lists are int32 tensors [n_q_tiles, max_count] padded with 0, with counts [n_q_tiles]. They are
built once per (pattern, lengths, tiles) from the structural tile states (see ``states``) and
cached; their size is the number of visited tiles, never S x S.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..spec.patterns import (
    AnyOf,
    Blocked,
    Dense,
    Global,
    Neighborhood,
    Pattern,
    PerHead,
    Sliding,
    TopK,
)
from .boxes import box_lists
from .layout import TokenLayout
from .states import FULL, PARTIAL, has_rule, tile_states

if TYPE_CHECKING:
    from .topk import BlockLists

TileShape = tuple[int, ...]


def grid_of(pattern: Pattern) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(grid, dilation) when the pattern lays tokens out on an N-d grid, else None (1-D)."""
    if isinstance(pattern, Neighborhood):
        return pattern.shape, pattern.dilation
    if isinstance(pattern, AnyOf):
        grids = {g for g in (grid_of(m) for m in pattern.patterns) if g is not None}
        if len(grids) > 1:
            raise NotImplementedError("AnyOf: members on different token grids")
        return grids.pop() if grids else None
    return None


def layouts_for(
    pattern: Pattern, q_len: int, kv_len: int, q_tile: TileShape, kv_tile: TileShape
) -> tuple[TokenLayout, TokenLayout]:
    grid = grid_of(pattern)
    if grid is None:
        if len(q_tile) != 1 or len(kv_tile) != 1:
            raise ValueError(f"a 1-D pattern takes 1-D tiles, got q_tile={q_tile}, "
                             f"kv_tile={kv_tile}")
        return TokenLayout((q_len,), q_tile), TokenLayout((kv_len,), kv_tile)
    shape, dilation = grid
    if len(q_tile) != len(shape) or len(kv_tile) != len(shape):
        raise ValueError(f"a pattern on a {len(shape)}-D grid takes {len(shape)}-D tiles, got "
                         f"q_tile={q_tile}, kv_tile={kv_tile}")
    return TokenLayout(shape, q_tile, dilation), TokenLayout(shape, kv_tile, dilation)


def ascending_lists(hits: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise ascending column indices where ``hits`` [..., n] is True: (idx [..., width]
    int32 padded with 0, count [...] int32). ``width`` None: the longest row (on a GPU, one
    sync). Static plans and TopK's run-time lists both come from here."""
    n = hits.shape[-1]
    cnt = hits.sum(-1, dtype=torch.int32)
    if width is None:
        width = int(cnt.max()) if cnt.numel() else 0
    width = max(1, min(width, n))
    # Hits rank above all others, lower columns first: a top-k, not a sort of the whole row.
    key = hits.to(torch.int32) * n + torch.arange(n - 1, -1, -1, device=hits.device,
                                                   dtype=torch.int32)
    idx = key.topk(width, dim=-1).indices.to(torch.int32)
    slot = torch.arange(width, device=hits.device, dtype=torch.int32)
    return torch.where(slot < cnt[..., None], idx, 0).contiguous(), cnt.contiguous()


def _lists(states: Tensor, value: int) -> tuple[Tensor, Tensor]:
    """Row-wise ascending column indices where states == value: (idx [n, max], count [n])."""
    return ascending_lists(states == value)


@dataclass(frozen=True, eq=False)
class GatherSegment:
    """Global key columns gathered into KV tiles of their own (a key permutation).

    Sparse stripes (every 64th key) touch every KV tile of the sequence, making each one
    PARTIAL. Gathered, they fill a handful of tiles that every Q tile visits after its main
    lists. The union is split into disjoint parts so each allowed pair is counted once: the main
    lists apply ``TilePlan.list_pattern``; a gathered key j counts for query i only where
    ``exclude`` does NOT allow (i, j) (and j <= i + offset when ``causal``).
    """

    tokens: Tensor  # int32 [num_tiles * kv tile size]: ascending key positions, -1 padding
    exclude: Pattern
    causal: bool
    tile_size: int

    @property
    def num_tiles(self) -> int:
        return self.tokens.numel() // self.tile_size


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Which KV tiles each Q tile visits, full or partial. See the module docstring."""

    pattern: Pattern
    q_len: int
    kv_len: int
    q_layout: TokenLayout
    kv_layout: TokenLayout
    states: Tensor  # int8 [n_q_tiles, n_kv_tiles]: EMPTY / PARTIAL / FULL
    exact_by_mask: bool  # states came from the per-pair mask (slow path)
    #: The mask of the main lists' partial tiles: ``pattern`` unless a gather segment took part
    #: of a union away.
    list_pattern: Pattern | None = None
    gather: GatherSegment | None = None
    full_idx: Tensor = field(init=False)
    full_cnt: Tensor = field(init=False)
    part_idx: Tensor = field(init=False)
    part_cnt: Tensor = field(init=False)
    schedule: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.list_pattern is None:
            object.__setattr__(self, "list_pattern", self.pattern)
        full_idx, full_cnt = _lists(self.states, FULL)
        part_idx, part_cnt = _lists(self.states, PARTIAL)
        schedule = longest_first(full_cnt, part_cnt)
        for name, value in (("full_idx", full_idx), ("full_cnt", full_cnt),
                            ("part_idx", part_idx), ("part_cnt", part_cnt),
                            ("schedule", schedule)):
            object.__setattr__(self, name, value)

    # -- shape facts ---------------------------------------------------------------------
    @property
    def q_tile(self) -> TileShape:
        return self.q_layout.tile

    @property
    def kv_tile(self) -> TileShape:
        return self.kv_layout.tile

    @property
    def num_q_tiles(self) -> int:
        return self.q_layout.num_tiles

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_layout.num_tiles

    @property
    def permuted(self) -> bool:
        return not (self.q_layout.is_identity and self.kv_layout.is_identity)

    # -- counts --------------------------------------------------------------------------
    @property
    def num_full(self) -> int:
        return int(self.full_cnt.sum())

    @property
    def num_gathered(self) -> int:
        """Visits of gathered tiles (every Q tile visits every one, masked)."""
        return self.num_q_tiles * self.gather.num_tiles if self.gather is not None else 0

    @property
    def num_partial(self) -> int:
        return int(self.part_cnt.sum()) + self.num_gathered

    @property
    def num_visited(self) -> int:
        return self.num_full + self.num_partial

    @property
    def tile_bound(self) -> float:
        """NATTEN's tile bound: (all tile pairs) / (visited tile pairs), each charged in full."""
        return self.num_q_tiles * self.num_kv_tiles / max(self.num_visited, 1)

    def transposed(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the dK/dV pass: per KV tile, the Q tiles visiting it (full idx/cnt, part idx/cnt)."""
        return _transposed(self)

    @property
    def t_schedule(self) -> Tensor:
        """The dK/dV pass's order of KV tiles: most visiting Q tiles first (``longest_first``)."""
        return _t_schedule(self)

    @property
    def full_box(self) -> Tensor | None:
        """Each Q tile's FULL list as a box of KV tiles (``plan.boxes``), or None when some
        list is not one."""
        return _full_box(self)

    def device_tensors(self, device: torch.device | str) -> dict[str, Tensor]:
        """The lists on ``device``, cached per device."""
        return _device_tensors(self, str(device))


def longest_first(full_cnt: Tensor, part_cnt: Tensor) -> Tensor:
    """Tile ids by visits, most first (int32): programs taken in this order start the longest
    loops in the first wave, and the short ones fill the last."""
    work = (full_cnt + part_cnt).to(torch.long)
    return torch.sort(work, descending=True, stable=True).indices.to(torch.int32)


@functools.lru_cache(maxsize=64)
def _transposed(plan: TilePlan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = plan.states.t().contiguous()
    return (*_lists(st, FULL), *_lists(st, PARTIAL))


@functools.lru_cache(maxsize=64)
def _t_schedule(plan: TilePlan) -> Tensor:
    _, t_full_cnt, _, t_part_cnt = plan.transposed()
    return longest_first(t_full_cnt, t_part_cnt)


@functools.lru_cache(maxsize=64)
def _full_box(plan: TilePlan) -> Tensor | None:
    if not plan.pattern.static:  # run-time lists
        return None
    return box_lists(plan.full_idx, plan.full_cnt, plan.kv_layout)


@functools.lru_cache(maxsize=64)
def _device_tensors(plan: TilePlan, device: str) -> dict[str, Tensor]:
    names = ("full_idx", "full_cnt", "part_idx", "part_cnt", "schedule")
    out = {n: getattr(plan, n).to(device) for n in names}
    t_full_idx, t_full_cnt, t_part_idx, t_part_cnt = plan.transposed()
    out.update(t_full_idx=t_full_idx.to(device), t_full_cnt=t_full_cnt.to(device),
               t_part_idx=t_part_idx.to(device), t_part_cnt=t_part_cnt.to(device),
               t_schedule=plan.t_schedule.to(device))
    if plan.gather is not None:
        out["gather"] = plan.gather.tokens.to(device)
    if plan.full_box is not None:
        out["full_box"] = plan.full_box.to(device)
    return out


def _as_tile(tile: int | TileShape, ndim: int, name: str) -> TileShape:
    if isinstance(tile, int):
        if ndim != 1:
            raise ValueError(f"{name}: a {ndim}-D grid needs a tile shape with {ndim} entries, "
                             f"got {tile}")
        return (tile,)
    out = tuple(int(t) for t in tile)
    if len(out) != ndim or any(t < 1 for t in out):
        raise ValueError(f"{name}: expected {ndim} positive sizes, got {tile}")
    return out


def build_plan(
    pattern: Pattern, q_len: int, kv_len: int,
    q_tile: int | TileShape | None = None, kv_tile: int | TileShape | None = None,
    head_dim: int = 128, specialized: bool = False,
) -> TilePlan:
    """The tile plan of a single-head pattern (cached). Tiles default per ``choose``
    (``specialized``: for the warp-specialized Hopper forward, ``choose.default_tiles``).

    For TopK this is the static half of its plan (see ``plan.topk``): tiles of one block, the
    eligible tiles as the lists; the selection's lists come at run time.
    """
    if isinstance(pattern, PerHead):
        raise TypeError("build_plan: a PerHead pattern has one plan per run of heads; build "
                        "one for each pattern of PerHead.resolve(num_heads)")
    pattern.check_lengths(q_len, kv_len)
    if isinstance(pattern, TopK):
        for name, tile in (("q_tile", q_tile), ("kv_tile", kv_tile)):
            if tile is not None and tuple(_as_tile(tile, 1, name)) != (pattern.block,):
                raise ValueError(f"build_plan: TopK tiles are its blocks; expected {name}="
                                 f"{pattern.block} or None, got {tile}")
        q_tile = kv_tile = pattern.block
    grid = grid_of(pattern)
    ndim = 1 if grid is None else len(grid[0])
    if q_tile is None or kv_tile is None:
        from .choose import default_tiles

        dq, dk = default_tiles(pattern, q_len, kv_len, head_dim, specialized)
        q_tile = dq if q_tile is None else q_tile
        kv_tile = dk if kv_tile is None else kv_tile
    return _build_plan(pattern, int(q_len), int(kv_len), _as_tile(q_tile, ndim, "q_tile"),
                       _as_tile(kv_tile, ndim, "kv_tile"))


@functools.lru_cache(maxsize=256)
def _build_plan(
    pattern: Pattern, q_len: int, kv_len: int, q_tile: TileShape, kv_tile: TileShape
) -> TilePlan:
    q_layout, kv_layout = layouts_for(pattern, q_len, kv_len, q_tile, kv_tile)
    if isinstance(pattern, TopK):
        return TilePlan(pattern, q_len, kv_len, q_layout, kv_layout,
                        _topk_states(pattern, kv_len), exact_by_mask=False)
    split = _split_gather(pattern, kv_layout)
    list_pattern, gather = split if split is not None else (pattern, None)
    states = tile_states(list_pattern, q_layout, kv_layout, kv_len - q_len)
    return TilePlan(pattern, q_len, kv_len, q_layout, kv_layout, states,
                    exact_by_mask=not has_rule(list_pattern), list_pattern=list_pattern,
                    gather=gather)


def _topk_states(pattern: TopK, kv_len: int) -> Tensor:
    """Every eligible block pair, FULL or PARTIAL: the superset any selection is drawn from."""
    from ..spec.topk import eligible_blocks
    from .topk import partial_blocks

    n = -(-kv_len // pattern.block)
    cpu = torch.device("cpu")
    eligible = eligible_blocks(pattern, n, cpu)
    partial = partial_blocks(pattern, n, kv_len, cpu)
    states = torch.where(partial, PARTIAL, FULL).to(torch.int8)
    return torch.where(eligible, states, torch.zeros_like(states))


def _split_gather(pattern: Pattern, kv: TokenLayout) -> tuple[Pattern, GatherSegment] | None:
    """Take a union's global key columns into a gather segment when that visits fewer tiles.

    Applies to ``AnyOf`` with one ``Global`` member of columns only: the gathered tiles replace
    every KV tile the columns touch (each becomes partial otherwise).
    """
    if not isinstance(pattern, AnyOf) or len(pattern.patterns) < 2:
        return None
    members = [m for m in pattern.patterns if isinstance(m, Global) and m.columns and not m.rows]
    if len(members) != 1:
        return None
    glob = members[0]
    keys = glob.is_global(torch.arange(kv.num_tokens)).nonzero().squeeze(1)
    size = kv.tile_size
    n_tiles = -(-keys.numel() // size)
    tokens = kv.token_index().view(kv.num_tiles, size)
    touched = int(glob.is_global(tokens.clamp_min(0)).logical_and(tokens >= 0).any(1).sum())
    if n_tiles == 0 or 2 * n_tiles > touched:
        return None
    rest = tuple(m for m in pattern.patterns if m is not glob)
    list_pattern = rest[0] if len(rest) == 1 and not pattern.causal else AnyOf(
        *rest, causal=pattern.causal)
    padded = torch.full((n_tiles * size,), -1, dtype=torch.int32)
    padded[: keys.numel()] = keys.to(torch.int32)
    return list_pattern, GatherSegment(padded, list_pattern, glob.causal or pattern.causal, size)


# ---------------------------------------------------------------------------------------------
# Visiting a plan: the passes every consumer walks

MaskFn = Callable[[Tensor, Tensor], Tensor]


def kv_tokens(plan: TilePlan, device: torch.device) -> Tensor:
    """Key positions of every KV tile: the layout's tiles, then the gather segment's."""
    tokens = plan.kv_layout.token_index()
    if plan.gather is not None:
        tokens = torch.cat([tokens, plan.gather.tokens.long()])
    return tokens.to(device)


Visit = tuple[Tensor, Tensor, MaskFn | None]


def partial_mask(plan: TilePlan) -> MaskFn:
    """The mask of the main lists' PARTIAL tiles. For TopK the tiles are whole blocks, so only
    causality (and the padding keys every consumer drops) is left to mask."""
    q_len, kv_len = plan.q_len, plan.kv_len
    lp = plan.list_pattern
    assert lp is not None
    if isinstance(lp, TopK):
        offset = kv_len - q_len
        return (lambda qi, kj: kj <= qi + offset) if lp.causal else (lambda qi, kj: kj >= 0)
    return lambda qi, kj: lp.allowed(qi, kj, q_len, kv_len)


def visit_passes(plan: TilePlan, device: torch.device, lists: BlockLists | None = None
                 ) -> list[Visit]:
    """(tile ids [nq, W], counts [nq], mask or None) for FULL, PARTIAL and gathered visits.

    With run-time ``lists`` (TopK) the ids and counts carry their leading list dimension:
    [L, nq, W] and [L, nq]. A mask takes query positions [..., Tq, 1] and key positions
    [..., 1, Tk] (both >= 0).
    """
    q_len, kv_len = plan.q_len, plan.kv_len
    if lists is not None:
        return [(lists.full_idx.long(), lists.full_cnt, None),
                (lists.part_idx.long(), lists.part_cnt, partial_mask(plan))]
    out: list[Visit] = [
        (plan.full_idx, plan.full_cnt, None),
        (plan.part_idx, plan.part_cnt, partial_mask(plan)),
    ]
    if plan.gather is not None:
        g = plan.gather
        n_g, nq = g.num_tiles, plan.num_q_tiles
        idx = (plan.num_kv_tiles + torch.arange(n_g, dtype=torch.int32))[None].expand(nq, n_g)
        cnt = torch.full((nq,), n_g, dtype=torch.int32)

        def gathered(qi: Tensor, kj: Tensor) -> Tensor:
            keep = ~g.exclude.allowed(qi, kj, q_len, kv_len)
            return keep & (kj <= qi + (kv_len - q_len)) if g.causal else keep

        out.append((idx.contiguous(), cnt, gathered))
    return [(i.to(device).long(), c.to(device), m) for i, c, m in out]


# ---------------------------------------------------------------------------------------------
# Exact counts of allowed (query, key) pairs: the FLOP bound's denominator


def allowed_pairs(pattern: Pattern, q_len: int, kv_len: int) -> int:
    """Number of allowed (query, key) pairs, computed without an S x S mask."""
    pattern.check_lengths(q_len, kv_len)
    if isinstance(pattern, Dense):
        return q_len * kv_len
    if isinstance(pattern, Sliding):
        p = torch.arange(q_len) + (kv_len - q_len)
        lo = (p - pattern.left_extent).clamp_min(0)
        hi = (p + pattern.right_extent).clamp_max(kv_len - 1)
        return int((hi - lo + 1).clamp_min(0).sum())
    if isinstance(pattern, Neighborhood):
        return _neighborhood_pairs(pattern)
    if isinstance(pattern, Blocked) and not pattern.causal and q_len == kv_len:
        full, rest = divmod(q_len, pattern.block)
        return full * pattern.block**2 + rest * rest
    return _pairs_from_plan(pattern, q_len, kv_len)


def _neighborhood_pairs(p: Neighborhood) -> int:
    """Per axis the window sizes sum independently; the mask is their product per group."""
    from .states import neighborhood_window

    total = 0
    per_axis: list[dict[int, int]] = []
    for a, length in enumerate(p.shape):
        d = p.dilation[a]
        sums = {}
        for g in range(d):
            lg = length // d + (1 if g < length % d else 0)
            x = torch.arange(lg)
            lo, hi = neighborhood_window(p.window[a], p.stride[a], p.causal[a])(
                x, torch.tensor(lg))
            sums[g] = int((hi - lo + 1).sum())
        per_axis.append(sums)
    for groups in itertools.product(*[range(d) for d in p.dilation]):
        total += math.prod(per_axis[a][g] for a, g in enumerate(groups))
    return total


def _pairs_from_plan(pattern: Pattern, q_len: int, kv_len: int) -> int:
    """Full tiles count their area; partial and gathered tiles are counted element by element."""
    one_d = grid_of(pattern) is None
    plan = build_plan(pattern, q_len, kv_len, 128 if one_d else None, 128 if one_d else None)
    qt = plan.q_layout.token_index().view(plan.num_q_tiles, -1)
    kt = kv_tokens(plan, torch.device("cpu")).view(-1, plan.kv_layout.tile_size)
    total = 0
    for idx, cnt, mask in visit_passes(plan, torch.device("cpu")):
        slots = torch.arange(idx.shape[1])[None, :] < cnt[:, None]
        q_tiles, k_tiles = slots.nonzero(as_tuple=True)[0], idx[slots]
        for start in range(0, q_tiles.numel(), 256):
            qi = qt[q_tiles[start : start + 256]][:, :, None]
            kj = kt[k_tiles[start : start + 256]][:, None, :]
            ok = (qi >= 0) & (kj >= 0)
            if mask is not None:
                ok = ok & mask(qi.clamp_min(0), kj.clamp_min(0))
            total += int(ok.sum())
    return total
