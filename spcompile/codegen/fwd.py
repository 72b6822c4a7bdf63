"""The forward kernel: per Q tile, two loops over exactly the plan's KV tiles.

    for each FULL kv tile:    s = q k^T            (no mask arithmetic at all)
    for each PARTIAL kv tile: s = mask(q k^T)      (the pattern's expression, emit.mask_expr)

Online softmax in fp32 with exp2 (the scale folded into log2 e). FULL tiles that form a box of
the KV tile grid (a run in 1-D, a rectangle or cuboid of boxes in N-d) are computed from the
loop counter (``plan.boxes``), so no K/V load waits on an index load. Work items (Q tile rank in
the longest-first schedule, batch x head) are numbered head-major, so the programs in flight
share one head's K/V in L2 (``LaunchConfig.head_major``). By default each program runs one
item; the opt-in persistent variant (``LaunchConfig.persistent``, or
SPCOMPILE_PERSISTENT=1) launches about one wave of programs that stride over the items in the
same order, generated from the same body. Token permutation is fused: row r of a tile loads
token ``tok(tile, r)`` straight from the unpermuted [B, H, S, D] tensors (emit.layout_code).

Rows that see no key give 0 and LSE -inf, never NaN: the running max is replaced by 0 while it
is still -inf, so exp2(-inf - 0) = 0.
"""

from __future__ import annotations

import functools
import math
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..plan.boxes import tile_strides
from ..plan.layout import TokenLayout
from ..plan.tiles import TilePlan
from .cache import load_source
from .emit import layout_code, mask_expr, needs_aux

if TYPE_CHECKING:
    from ..plan.topk import BlockLists

_TEMPLATE = '''
import triton
import triton.language as tl


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, SCHEDULE, AUX, GATHER, KBIAS,
    FULL_BOX,{desc_args} sm_scale, AUX_STRIDE, s_kbb,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os, s_lb, s_lh,
    full_stride, part_stride, lst_full, lst_part, lst_cnt, BH,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr, LIST_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
{work}'''

# Row, column and head-dim offsets and guards: the same opening in every generated kernel.
OFFSETS = """\
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V"""

# How a program picks its work items (Q tile rank, batch x head). Default: one item per
# program, the grid is every item and the hardware hands the next one to whichever SM frees up
# first. ``item_split`` numbers the items (see ``LaunchConfig.head_major``).
_ONE_ITEM = '''\
    pid = tl.program_id(0)
{order}
'''

# Persistent: a grid of about one wave of programs, each striding over the items in the same
# order; ``_BODY`` runs indented one level deeper inside the loop. Program p takes items p,
# p + G, p + 2G, ...: the first pass takes the G longest tiles, later passes shorter ones.
# Unlike the one-item launch, this assignment is fixed: a program that drew long items cannot
# hand its later ones to an idle SM. Whether that costs more than the per-program setup saved
# is what ``benchmarks/tune.py --persistent`` measures.
_GRID_STRIDE = '''\
    for work in tl.range(tl.program_id(0), {num_q_tiles} * BH, tl.num_programs(0)):
{order}
'''

# One work item: everything after the choice of (rank, bh), shared by both variants.
_BODY = '''\
    b = bh // H
    h = bh % H
    hk = h // GROUP
{lists}
    tile = tl.load(SCHEDULE + rank)
{offsets}

    # This tile's query rows, straight from the unpermuted layout.
{q_layout}
    q_row = q_tok
    q_row_ok = q_ok
{q_2d}
    qpos = q_tok + {offset}
{q_load}
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

{loops}
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
{o_store}
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + b.to(tl.int64) * s_lb + h.to(tl.int64) * s_lh + q_row, lse, mask=q_row_ok)
'''


def _indent(lines: list[str], n: int) -> str:
    return textwrap.indent("\n".join(lines), " " * n)


def _to_2d(prefix: str, ndim: int, shape: str) -> list[str]:
    names = [f"{prefix}_tok", f"{prefix}_ok"] + [f"{prefix}x{a}" for a in range(ndim)]
    return [f"{n} = {n}{shape}" for n in names]


def kernel_name(plan: TilePlan, kind: str) -> str:
    grid = "x".join(map(str, plan.q_layout.grid))
    tiles = "q" + "x".join(map(str, plan.q_tile)) + "-kv" + "x".join(map(str, plan.kv_tile))
    return f"{kind}-{plan.pattern.kind}-{grid}-{tiles}"


def variant_name(plan: TilePlan, kind: str, **flags: bool) -> str:
    """A generated module's name: ``kernel_name`` plus every flag that is on, in order."""
    return kernel_name(plan, kind) + "".join(f"-{k}" for k, on in flags.items() if on)


def kv_source_lines(plan: TilePlan, source: str) -> list[str]:
    """Lines defining k_tok, k_ok and kx* for the KV tile of this step.

    ``source`` is "tile" (tile id ``kv_tile`` of the layout) or "gather" (the ``it``-th tile of
    the plan's gather segment: explicit token positions, coordinates recovered from them).
    """
    if source == "tile":
        return layout_code(plan.kv_layout, "k", "kv_tile", "offs_n", "")
    grid = plan.kv_layout.grid
    lines = ["k_tok = tl.load(GATHER + it * BLOCK_N + offs_n)", "k_ok = k_tok >= 0"]
    for a in range(len(grid)):
        inner = math.prod(grid[a + 1 :])
        lines.append(f"kx{a} = (k_tok // {inner}) % {grid[a]}")
    return lines


def step_mask(plan: TilePlan, source: str, masked: bool) -> str | None:
    """The mask of one step: None for FULL tiles, the list pattern's for PARTIAL ones, and for
    gathered keys "not already counted by the lists" (plus causality)."""
    if source == "gather":
        assert plan.gather is not None
        expr = f"(({mask_expr(plan.gather.exclude)}) == 0)"
        return f"{expr} & (k_tok <= qpos)" if plan.gather.causal else expr
    assert plan.list_pattern is not None
    return f"({mask_expr(plan.list_pattern)})" if masked else None


# This tile's per-key bias: KBIAS holds bias / scale, -inf for a blocked key.
KEY_BIAS_LOAD = ("kb = tl.load(KBIAS + b.to(tl.int64) * s_kbb + k_col, mask=k_col_ok,"
                 " other=float('-inf'))")


def key_bias_lines(axis: str) -> list[str]:
    """Add this tile's per-key bias to the scores ``qk``; ``axis`` is "[None, :]" for [M, N]
    scores, "[:, None]" for transposed ones."""
    return [KEY_BIAS_LOAD, f"qk = qk + kb{axis}"]


def _fwd_step(plan: TilePlan, source: str, masked: bool, tma: bool = False,
              bias: bool = False) -> list[str]:
    """One KV tile of the online softmax; ``masked`` adds the pattern and padding guards.

    With ``tma`` (1-D layouts on Hopper), K and V tiles arrive through tensor descriptors; rows
    past the sequence end come back as zeros and are masked like any padding. With ``bias``
    every tile adds the per-key bias (key padding) and takes the guarded softmax: a FULL tile
    may then hold only blocked keys.
    """
    mask = step_mask(plan, source, masked)
    lines = kv_source_lines(plan, source)
    row_ok = "k_col_ok[:, None] & " if mask is not None else ""
    lines += ["k_col = k_tok", "k_col_ok = k_ok"]
    if tma and source == "tile":
        kv = plan.kv_layout
        lines += [
            "k = " + _tma_load(kv, "KD", "kv_tile", "hk", "H_KV", "BLOCK_N", "BLOCK_D"),
            "v = " + _tma_load(kv, "VD", "kv_tile", "hk", "H_KV", "BLOCK_N", "BLOCK_DV"),
        ]
    else:
        lines += [
            f"k = tl.load(k_base + k_col[:, None] * s_ks + offs_d[None, :],"
            f" mask={row_ok}d_ok[None, :], other=0.0)",
            f"v = tl.load(v_base + k_col[:, None] * s_vs + offs_dv[None, :],"
            f" mask={row_ok}dv_ok[None, :], other=0.0)",
        ]
    lines += ["qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)"]
    if mask is not None:
        lines += _to_2d("k", plan.kv_layout.ndim, "[None, :]")
        lines += [f"qk = tl.where(k_ok & {mask}, qk, float('-inf'))"]
    if bias:
        lines += key_bias_lines("[None, :]")
    if mask is None and not bias:
        lines += [
            "m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)",
            "p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per element",
            "alpha = tl.math.exp2(m_i - m_new)",
        ]
    else:
        lines += [
            "m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)",
            "m_use = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with no key yet",
            "p = tl.math.exp2(qk * qk_scale - m_use[:, None])",
            "alpha = tl.math.exp2(m_i - m_use)",
        ]
    lines += [
        "l_i = l_i * alpha + tl.sum(p, 1)",
        "acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)",
        "m_i = m_new",
    ]
    return lines


def item_split(item: str, tile: str, heads: str, num_heads: str, num_tiles: int,
               head_major: bool) -> list[str]:
    """Lines splitting work item ``item`` into its tile (``tile``) and its batch x head
    (``heads``, ``num_heads`` of them). Tile-major: every head's first tile in the first wave.
    Head-major: the programs in flight share a head (and its tensors in L2)."""
    if head_major:
        return [f"{heads} = {item} // {num_tiles}", f"{tile} = {item} % {num_tiles}"]
    return [f"{tile} = {item} // {num_heads}", f"{heads} = {item} % {num_heads}"]


def list_pointers(plan: TilePlan, heads: str) -> list[str]:
    """Lines defining l_fi, l_fc, l_pi, l_pc: this program's lists. A static plan has one set
    for every head; run-time (TopK) lists lead with l = (b * heads + h) // LIST_GROUP."""
    names = (("l_fi", "FULL_IDX", "lst_full"), ("l_fc", "FULL_CNT", "lst_cnt"),
             ("l_pi", "PART_IDX", "lst_part"), ("l_pc", "PART_CNT", "lst_cnt"))
    if plan.pattern.static:
        return [f"{var} = {arg}" for var, arg, _ in names]
    lines = [f"lh = ((b * {heads} + h) // LIST_GROUP).to(tl.int64)"]
    return lines + [f"{var} = {arg} + lh * {stride}" for var, arg, stride in names]


def box_tile_lines(plan: TilePlan, tile: str) -> tuple[list[str], str]:
    """(lines before the loop, the ``it``-th tile's id): the FULL box of Q tile ``tile``, read
    once, and the arithmetic of ``plan.boxes.box_offsets`` on the loop counter."""
    nd = plan.kv_layout.ndim
    inner = tile_strides(plan.kv_layout)
    before = [f"f_box = FULL_BOX + {tile} * {nd}", "f_corner = tl.load(f_box)"]
    before += [f"f_ext{a} = tl.load(f_box + {a})" for a in range(1, nd)]
    terms, rest = [], "it"
    for a in range(nd - 1, 0, -1):
        terms.append(f"({rest} % f_ext{a}) * {inner[a]}")
        rest = f"({rest} // f_ext{a})"
    terms.append(f"{rest} * {inner[0]}" if inner[0] != 1 else rest)
    return before, "f_corner + " + " + ".join(reversed(terms))


def fwd_loops(plan: TilePlan, step: Callable[[TilePlan, str, bool], list[str]],
              tile: str = "tile", box: bool = False) -> str:
    """The visiting loops over the plan: FULL tiles, PARTIAL list, then the gather segment.

    ``box``: the FULL tiles are computed from the plan's box (``TilePlan.full_box``) instead of
    read from the list. A static plan without PARTIAL tiles (blocked, GNA on stride-aligned
    tiles) gets no PARTIAL loop: never entered, its mask arithmetic still set the register
    budget (ptxas: the 128x64-tile forward at 255 registers with 60-96 bytes spilled; without
    the loop 254 and none).
    """
    before, kv_full = (box_tile_lines(plan, tile) if box
                       else ([], f"tl.load(l_fi + {tile} * full_stride + it)"))
    out = [
        f"n_full = tl.load(l_fc + {tile})",
        *before,
        "for it in range(n_full):",
        f"    kv_tile = {kv_full}",
        *("    " + x for x in step(plan, "tile", False)),
    ]
    if not plan.pattern.static or bool(plan.part_cnt.any()):
        out += [
            f"n_part = tl.load(l_pc + {tile})",
            "for it in range(n_part):",
            f"    kv_tile = tl.load(l_pi + {tile} * part_stride + it)",
            *("    " + x for x in step(plan, "tile", True)),
        ]
    if plan.gather is not None:
        out += [f"for it in range({plan.gather.num_tiles}):",
                *("    " + x for x in step(plan, "gather", True))]
    return _indent(out, 4)


_Q_LOAD = ("q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_tok * s_qs"
           " + offs_d[None, :], mask=q_ok & d_ok[None, :], other=0.0)")
_O_STORE = ("tl.store(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + q_tok * s_os"
            " + offs_dv[None, :], out.to(O.dtype.element_ty), mask=q_ok & dv_ok[None, :])")
def tma_eligible(plan: TilePlan) -> bool:
    """Tiles that are boxes of the grid without dilation load through descriptors: a run of
    tokens (1-D), or a box of a [B, H, X, Y] / [B*H, T, X, Y] view (2-D, 3-D)."""
    return all(d == 1 for d in plan.q_layout.dilation) and plan.q_layout.ndim <= 3


def tma_coords(layout: TokenLayout, tile: str, head: str, heads: str) -> str:
    """The descriptor coordinates of a tile's box: [b, head, starts..., 0] (3-D merges b, h)."""
    if layout.ndim == 1:
        return f"[b, {head}, {tile} * {layout.tile[0]}, 0]"
    starts = []
    for a in range(layout.ndim):
        inner = math.prod(layout.tiles_per_axis[a + 1 :])
        starts.append(f"(({tile} // {inner}) % {layout.tiles_per_axis[a]}) * {layout.tile[a]}")
    lead = [f"b * {heads} + {head}"] if layout.ndim == 3 else ["b", head]
    return "[" + ", ".join([*lead, *starts, "0"]) + "]"


def _tma_load(layout: TokenLayout, desc: str, tile: str, head: str, heads: str, rows: str,
              cols: str) -> str:
    return f"{desc}.load({tma_coords(layout, tile, head, heads)}).reshape({rows}, {cols})"


def _o_store_tma(layout: TokenLayout) -> str:
    box = ", ".join(str(t) for t in layout.tile)
    lead = "1" if layout.ndim == 3 else "1, 1"
    return (f"OD.store({tma_coords(layout, 'tile', 'h', 'H')},"
            f" out.to(O.dtype.element_ty).reshape({lead}, {box}, BLOCK_DV))")


def fwd_source(plan: TilePlan, tma: bool = False, persistent: bool = False,
               bias: bool = False, box: bool = False, head_major: bool = False) -> str:
    """The forward kernel's source for this plan (everything but dtypes and head dims inlined).

    ``persistent`` wraps the same body in a grid-stride loop over the work items (see
    ``_GRID_STRIDE``); one body for both variants, so they cannot drift apart. With ``tma`` it
    loads Q, K and V through descriptors but stores O through pointers: a descriptor store
    inside the loop gets a shared-memory staging buffer of its own (the one-item kernel reuses
    freed pipeline buffers for it). Compiled for sm_90, that took the 128x128-tile, 8-warp,
    3-stage kernel from 224 KiB to 256 KiB, past the H100's 227 KiB per program (and the
    128x64 4-warp one from 96 to 128 KiB, one program per SM instead of two). ``bias`` adds a
    per-key bias (key padding) to every tile. ``box``: see ``fwd_loops``; ``head_major``: the
    item order, see ``LaunchConfig``.
    """
    tma_store = tma and not persistent
    q_layout = layout_code(plan.q_layout, "q", "tile", "offs_m", "")
    body = _BODY.format(
        offsets=OFFSETS,
        lists=_indent(list_pointers(plan, "H"), 4),
        q_layout=_indent(q_layout, 4),
        q_2d=_indent(_to_2d("q", plan.q_layout.ndim, "[:, None]"), 4),
        offset=plan.kv_len - plan.q_len,
        q_load=_indent([("q = " + _tma_load(plan.q_layout, "QD", "tile", "h", "H", "BLOCK_M",
                                              "BLOCK_D")) if tma else _Q_LOAD], 4),
        o_store=_indent([_o_store_tma(plan.q_layout) if tma_store else _O_STORE], 4),
        loops=fwd_loops(plan, functools.partial(_fwd_step, tma=tma, bias=bias), box=box),
    )
    order = item_split("work" if persistent else "pid", "rank", "bh", "BH", plan.num_q_tiles,
                       head_major)
    if persistent:
        work = (_GRID_STRIDE.format(num_q_tiles=plan.num_q_tiles, order=_indent(order, 8))
                + textwrap.indent(body, "    "))
    else:
        work = _ONE_ITEM.format(order=_indent(order, 4)) + body
    return _TEMPLATE.format(desc_args=" QD, KD, VD, OD," if tma else "", work=work)


@functools.lru_cache(maxsize=16)
def _no_key_bias(device: str) -> Tensor:
    """The KBIAS placeholder of launches without a bias (never read), one per device: no
    allocation on every call."""
    return torch.empty(1, dtype=torch.float32, device=device)


def key_bias_arg(key_bias: Tensor | None, batch: int, kv_len: int, scale: float,
                 device: torch.device) -> tuple[Tensor, int]:
    """(KBIAS, its batch stride) for a launch: the bias over the scale in fp32 (the kernels add
    it to raw q.k), batch-broadcast by a stride of 0; a placeholder when there is none."""
    if key_bias is None:
        return _no_key_bias(str(device)), 0
    kb = (key_bias.to(device, torch.float32) / scale).reshape(-1, kv_len).contiguous()
    if kb.shape[0] not in (1, batch):
        raise ValueError(f"key_bias: expected [{batch} or 1, {kv_len}], got {tuple(kb.shape)}")
    return kb, kb.stride(0) if kb.shape[0] > 1 else 0


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched. ``persistent`` and ``programs_per_sm`` apply to the forward only.

    ``persistent``: launch about one wave of programs that loop over the work items (Q tile
    rank, batch x head) in the longest-first order, instead of one program per item. Off by
    default until measured (``benchmarks/tune.py --persistent``); ``SPCOMPILE_PERSISTENT=1``
    turns it on in ``default_config``.

    ``programs_per_sm``: the persistent grid is ``min(items, SMs x programs_per_sm)``. 2 is a
    guess, not a measurement: at the 4-warp default (128x64 tiles) two programs fit on an H100
    SM and one can load while the other computes, as the one-item launch does; where only one
    fits (128x128 tiles, 3 stages, head dim 128) the second waits its turn. Measure 1 vs 2.

    ``box_loops``: static plans whose FULL lists are boxes of KV tiles compute each tile from
    the loop counter (``plan.boxes``) rather than load it from the list.

    ``head_major``: number the work items head by head (Q tiles longest-first within each)
    instead of rank by rank across all heads. Rank-major spreads the programs in flight over
    every head, so their K/V working set is every head's; head-major keeps it to one or two
    heads, which an H100's 50 MB L2 can hold where the other cannot.
    """

    num_warps: int
    num_stages: int
    persistent: bool = False
    programs_per_sm: int = 2
    box_loops: bool = True
    head_major: bool = True

    def __post_init__(self) -> None:
        if self.programs_per_sm < 1:
            raise ValueError(f"programs_per_sm must be >= 1, got {self.programs_per_sm}")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def persistent_default() -> bool:
    """Whether ``default_config`` asks for the persistent forward: ``SPCOMPILE_PERSISTENT=1``.
    Read per call, so a process can compare both (it is one dict lookup)."""
    return os.environ.get("SPCOMPILE_PERSISTENT", "0") == "1"


def default_config(plan: TilePlan) -> LaunchConfig:
    """Warps and pipeline stages, from the H100 sweep (benchmarks/data/*-h100-tune.json; with
    box loops and head-major items, 2026-11-23-s4-h100-loops.json confirms both defaults).

    128x64 tiles: 4 warps, 2 stages (blk16k 10.3x; 8 warps 7.6x). 128x128 tiles: 8 warps,
    3 stages (na2d31 5.8x, hunyuan_gna 7.5x; 4 warps 4.1x / 5.6x). N-d boxes of 128x64 tokens
    run best at 8 warps, 3 stages too (2026-11-23-s5-h100-tune-nd.json: na2d31 6.37x vs 5.37x
    at 4 warps, 2 stages; na3d 6.16x vs 5.84x). Four stages of 128x128 K/V tiles overflow
    shared memory at head dim 128. Persistent only with SPCOMPILE_PERSISTENT=1 (measured
    slower on the H100 in session 3).
    """
    block_m, block_n = plan.q_layout.tile_size, plan.kv_layout.tile_size
    persistent = persistent_default()
    if block_m >= 128 and (block_n >= 128 or (block_n >= 64 and plan.q_layout.ndim > 1)):
        return LaunchConfig(num_warps=8, num_stages=3, persistent=persistent)
    return LaunchConfig(num_warps=4, num_stages=2, persistent=persistent)


def check_tiles(plan: TilePlan) -> None:
    """Tiles the kernels can run: power-of-two volumes of at least 16 (tl.dot's minimum)."""
    for name, size in (("q_tile", plan.q_layout.tile_size), ("kv_tile", plan.kv_layout.tile_size)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"the Triton kernels need tiles of a power-of-two volume >= 16, got "
                             f"{name}={getattr(plan, name)} ({size} tokens)")


def padded_dim(n: int) -> int:
    """A head dimension as a tile holds it: the next power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def aux_tensor(plan: TilePlan, device: str) -> tuple[Tensor, int]:
    """(tensor, row stride) for the kernels' AUX argument, built once per plan and device.

    A BlockLayout's partial tiles read its block matrix (int8 [n_blocks, n_blocks]); other
    patterns get a placeholder with stride 0 that the kernel never reads.
    """
    pattern = needs_aux(plan.pattern)
    if pattern is None:
        return plan.device_tensors(device)["full_cnt"], 0
    n_blocks = -(-plan.kv_len // pattern.block)
    aux = pattern.block_mask(n_blocks).to(torch.int8).to(device).contiguous()
    return aux, aux.stride(0)


@functools.lru_cache(maxsize=16)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# SMs the persistent grid assumes under the interpreter: small, so that tests with a handful of
# work items still give each program several.
INTERPRET_SMS = 4


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); ``INTERPRET_SMS`` off CUDA."""
    return _cuda_sms(device.index) if device.type == "cuda" else INTERPRET_SMS


def fwd_grid(plan: TilePlan, bh: int, config: LaunchConfig, device: torch.device) -> int:
    """Programs to launch: one per work item, or for the persistent kernel at most
    ``programs_per_sm`` per SM (never more than there are items)."""
    items = plan.num_q_tiles * bh
    if not config.persistent:
        return items
    return max(1, min(items, num_sms(device) * config.programs_per_sm))


def _tma_device(q: Tensor) -> bool:
    """Whether descriptors may be used on q's device: Hopper or later, unless SPCOMPILE_TMA=0.
    Never on CPU: the interpreter can run them, but the default CPU path stays the plain loads
    (tests switch this on to run the descriptor code under the interpreter)."""
    return (os.environ.get("SPCOMPILE_TMA", "1") != "0" and q.is_cuda
            and _capability(q.device.index)[0] >= 9)


def _descriptors(plan: TilePlan, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> list:
    """Host-side TMA descriptors over the 4-D tensors, when the plan, device and strides allow."""
    if not tma_eligible(plan) or not _tma_device(q):
        return []
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return []
    views = tma_views(plan, q, k, v, out)
    if views is None:
        return []
    bd, bdv = padded_dim(q.shape[-1]), padded_dim(v.shape[-1])
    qt, kt = plan.q_layout.tile, plan.kv_layout.tile
    blocks = (descriptor_box(plan, qt, bd), descriptor_box(plan, kt, bd),
              descriptor_box(plan, kt, bdv), descriptor_box(plan, qt, bdv))
    return [TensorDescriptor(x, list(x.shape), list(x.stride()), blk)
            for x, blk in zip(views, blocks, strict=True)]


def descriptor_box(plan: TilePlan, tile: tuple[int, ...], block_d: int) -> list[int]:
    """A tile's TMA box over its tensor's ``_grid_view``: [1, 1, *tile, block_d], or
    [1, *tile, block_d] on 3-D grids (batch and head merged)."""
    lead = [1] if plan.q_layout.ndim == 3 else [1, 1]
    return [*lead, *tile, block_d]


def tma_views(plan: TilePlan, *xs: Tensor) -> list[Tensor] | None:
    """Each [B, H, S, D] tensor as its descriptor's view (``_grid_view``), or None when one
    cannot be viewed so or TMA cannot address it (base or a stride not 16-byte aligned, or the
    last dimension not contiguous)."""
    views = [_grid_view(x, plan.q_layout.grid) for x in xs]
    out: list[Tensor] = []
    for x in views:
        if (x is None or x.data_ptr() % 16 or x.stride(-1) != 1
                or any((st * x.element_size()) % 16 for st in x.stride()[:-1])):
            return None
        out.append(x)
    return out


def _grid_view(x: Tensor, grid: tuple[int, ...]) -> Tensor | None:
    """[B, H, S, D] as [B, H, *grid, D] (1-D, 2-D) or [B*H, *grid, D] (3-D: five dims is the
    descriptor limit), or None when the strides cannot merge B and H."""
    b, h, _, d = x.shape
    if len(grid) == 1:
        return x
    try:  # views only: a descriptor over a copy of ``out`` would lose the output
        return x.view(b, h, *grid, d) if len(grid) == 2 else x.view(b * h, *grid, d)
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=256)
def _fwd_module(plan: TilePlan, tma: bool, persistent: bool = False, bias: bool = False,
                box: bool = False, head_major: bool = False) -> Any:
    """The compiled module of a plan, generated once (regenerating and hashing the source on
    every call cost ~0.3 ms of host time per call on the H100 machine). The name says which
    variant; the file's hash covers its source as well."""
    name = variant_name(plan, "fwd", tma=tma, persistent=persistent, keybias=bias, box=box,
                        headmajor=head_major)
    return load_source(name, fwd_source(plan, tma=tma, persistent=persistent, bias=bias, box=box,
                                        head_major=head_major))


def list_args(plan: TilePlan, t: dict[str, Tensor], lists: BlockLists | None, transposed: bool
              ) -> tuple[list[Tensor], list[int], int]:
    """(index and count tensors, their strides (tile, list) and LIST_GROUP) for a kernel launch:
    the plan's own lists, or run-time ``lists`` for data-dependent patterns."""
    if plan.pattern.static != (lists is None):
        raise ValueError(f"{plan.pattern.kind}: run-time lists are needed exactly for "
                         "data-dependent patterns")
    if lists is None:
        p = "t_" if transposed else ""
        tensors = [t[p + "full_idx"], t[p + "full_cnt"], t[p + "part_idx"], t[p + "part_cnt"]]
        return tensors, [tensors[0].stride(0), tensors[2].stride(0), 0, 0, 0], 1
    tensors = [lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt]
    strides = [lists.full_idx.stride(1), lists.part_idx.stride(1), lists.full_idx.stride(0),
               lists.part_idx.stride(0), lists.full_cnt.stride(0)]
    return tensors, strides, lists.heads_per_list


def attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float | None = None,
    config: LaunchConfig | None = None, lists: BlockLists | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel. q [B, H, Sq, D]; k [B, H_kv, Skv, D]; v [B, H_kv, Skv, Dv].

    ``lists``: the run-time visiting lists of a data-dependent plan (TopK), else None.
    ``key_bias``: [B or 1, Skv] added to every score of a key (0 kept, -inf blocked: padding).
    Returns (out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32, natural log).
    """
    b, h, sq, d = q.shape
    h_kv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    if (sq, skv) != (plan.q_len, plan.kv_len):
        raise ValueError(f"attn_fwd: plan is for q_len={plan.q_len}, kv_len={plan.kv_len}, "
                         f"got {sq}, {skv}")
    check_tiles(plan)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(b, h, sq, dv, dtype=q.dtype, device=q.device)
    config = config or default_config(plan)
    descriptors = _descriptors(plan, q, k, v, out)
    t = plan.device_tensors(q.device)
    box = config.box_loops and "full_box" in t  # only static plans have boxes
    module = _fwd_module(plan, bool(descriptors), config.persistent, key_bias is not None, box,
                         config.head_major)
    aux, aux_stride = aux_tensor(plan, str(q.device))
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    block_m, block_n = plan.q_layout.tile_size, plan.kv_layout.tile_size
    grid = (fwd_grid(plan, b * h, config, q.device),)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tensors, strides, list_group = list_args(plan, t, lists, transposed=False)
    kbias, s_kbb = key_bias_arg(key_bias, b, skv, scale, q.device)
    module.attn_fwd_kernel[grid](
        q, k, v, out, lse, *tensors, t["schedule"], aux, t.get("gather", t["full_cnt"]), kbias,
        t["full_box"] if box else t["full_cnt"], *descriptors, scale, aux_stride, s_kbb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *strides, b * h,
        H=h, H_KV=h_kv, GROUP=h // h_kv, LIST_GROUP=list_group, HEAD_DIM=d, HEAD_DIM_V=dv,
        BLOCK_D=padded_dim(d), BLOCK_DV=padded_dim(dv),
        BLOCK_M=block_m, BLOCK_N=block_n,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse
