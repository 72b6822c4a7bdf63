"""The Hopper forward: warp-specialized, the plan's KV tiles in one pipelined loop (Gluon).

Triton's pipeliner runs each KV tile as QK^T -> wait -> softmax -> PV -> wait in every warp: the
tensor cores idle through each softmax, which held the plain Triton loop to ~80% of SDPA's
per-tile rate on an H100. This kernel is laid out as FlashAttention-3's is. One program
(384 threads) runs work items (a Q tile of one head) and has three partitions:

- a producer warp issues every TMA load: each item's Q tile, then its K and V tiles into a
  ring of ``STAGES`` buffers, as soon as both consumers have released the buffer (mbarriers
  "full" and "empty" per buffer, no CTA-wide barrier anywhere in the loop);
- two consumer warpgroups, each owning 64 of the Q tile's 128 rows, run the online softmax
  with the next tile's scores issued before the previous tile's P V:

      s_j   = Q K_j^T            async     # tensor cores: this, then
      acc  += P_{j-1} V_{j-1}    async     #               this
      wait for s_j; release K_j; softmax(s_j) -> P_j    # while P_{j-1} V_{j-1} runs
      wait for acc; release V_{j-1}; acc *= alpha_j

  The two warpgroups are not kept in step, so one's softmax also overlaps the other's MMAs.
  Each item's output is staged in shared memory and stored by TMA.

A program runs one item (grid = items), or, persistent (``persistent_for``: where one head's
K and V fit in L2), one program per SM runs the items ``plan.assign.assign_items`` gives it.
Its ring then runs on from one item into the next. Each consumer copies its half of an item's
Q tile into registers at the item's start and releases Q's buffer, so the next item's Q tile
loads while this one runs; the output's store is waited for at the next item's start, once
its first scores are issued, so neither Q's load nor the store stands between two items' MMAs.
Against session 11's kernel (Q read from shared memory, its buffer released after the item's
last scores, the store waited for at the item's end), in the same rounds, each round in another
order (``benchmarks/tune.py --sm90 --against``, H100, session 12): sw16k +2.1%, blk16k +4.2%,
na2d63 -0.7%. Q in registers with the store waited for at the item's end ran as that kernel
did (sw16k -0.2%, blk16k +0.4%, na2d63 -4.5%): the gain needs both.

Measured on the H100 (benchmarks/RESULTS.md, session 7), against the Triton kernel in the same
rounds: the suite's N-d rows +7-20%, its 1-D rows (64-token KV tiles) +1-5%. A hand-written
probe of this design ran dense attention with 128x128 tiles at 627 TFLOP/s, SDPA's rate in that
run; the same loop without the producer warp, both warpgroups held in step by a CTA-wide
barrier per tile, ran at 500 (overlap) and 483 (none) against SDPA's 631, Triton's rate or
below.

The visiting order is the plan's: the FULL box tiles first (no mask arithmetic, tile id from
the loop counter), then the PARTIAL list (the pattern's mask, ``emit.mask_expr``), as one loop
so the pipeline never drains between them. Token permutation is fused as in the Triton kernel:
N-d tiles are boxes of the grid and load through N-d descriptors, whose shared-memory box is
the [tile, D] operand the MMAs read.

Scope (``in_scope``): static plans without a gather segment or block matrix whose FULL tiles
form boxes of the KV tile grid (``plan.full_box``; strided layouts do not), no key bias,
fp16/bf16, equal Q/K and V head dims up to 128, 128-token Q tiles and 64- or 128-token KV
tiles, every Q tile visiting at least one KV tile. Every other call runs the Triton kernel
(``fwd.attn_fwd``), which stays the reference for this one; ``codegen.launch`` decides.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..plan.assign import assign_items
from ..plan.layout import TokenLayout
from ..plan.tiles import TilePlan
from .cache import load_source
from .emit import layout_code, mask_expr, needs_aux
from .fwd import (
    box_tile_lines,
    descriptor_box,
    num_sms,
    padded_dim,
    tma_coords,
    tma_eligible,
    tma_views,
    variant_name,
)

_HEADER = '''
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
'''

# The it-th KV tile of a Q tile, and the load of one K and V tile into the ring at position
# {c} (tiles loaded so far): shared by the forward's producer and the dQ kernel's (``sm90_bwd``).
_KV_TILE_AT = '''

@gluon.jit
def kv_tile_at(it, n_full, FULL_BOX, PART_IDX, tile, part_stride):
    """The it-th KV tile of Q tile ``tile``: FULL box tiles first, then the PARTIAL list."""
    if it < n_full:
{box}
        kv_tile = {box_tile}
    else:
        kv_tile = gl.load(PART_IDX + tile * part_stride + it - n_full)
    return kv_tile
'''

_RING_LOAD = """\
stage = {c} % STAGES
free = (({c} // STAGES) & 1) ^ 1  # passes at once on each buffer's first use
kv_tile = kv_tile_at(it, n_full, FULL_BOX, PART_IDX, tile, part_stride)
mbarrier.wait(k_empty.index(stage), free)
mbarrier.expect(k_full.index(stage), KD.block_type.nbytes)
tma.async_copy_global_to_shared(KD, {kv_coords}, k_full.index(stage),
                                k_boxes.index(stage))
mbarrier.wait(v_empty.index(stage), free)
mbarrier.expect(v_full.index(stage), VD.block_type.nbytes)
tma.async_copy_global_to_shared(VD, {kv_coords}, v_full.index(stage),
                                v_boxes.index(stage))"""

# A producer's view of the ring: its buffers as the descriptors' N-d boxes (same bytes: a box's
# tokens are its rows in row-major order, and the swizzle repeats every 8 rows).
_RING_VIEWS = """\
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_D: gl.constexpr = k_smem.type.shape[2]
    k_boxes = k_smem._reinterpret(KD.dtype, {kv_ring}, KD.layout)
    v_boxes = v_smem._reinterpret(VD.dtype, {kv_ring}, VD.layout)"""

# The dQ kernel's producer: its program owns one Q tile, whose per-row tiles ({row_descs}: Q's
# and dO's halves) it loads once.
_KV_LOOP = '''

@gluon.jit
def producer({row_descs}, KD, VD, {row_smem}, k_smem, v_smem, q_bar, k_full, v_full, k_empty,
             v_empty, b, h, hk, H, H_KV, tile, n_full, n, FULL_BOX, PART_IDX, part_stride):
    """One warp: the Q tile's rows once, then every K and V tile by TMA into the ring, each as
    soon as both consumers have released the buffer it goes to."""
{ring_views}
    mbarrier.expect(q_bar, {row_bytes})
{row_loads}
    for it in range(n):
{ring_load}
'''

# The work items of the kernels whose programs own Q tiles (the forward, dQ), numbered
# head-major: a program of a one-item launch (grid = items) runs item program_id, as the
# hardware orders programs; a persistent forward's program runs the items listed for it
# (``plan.assign``). Consecutive items are Q tiles of one head, so the items in flight at once
# share their K and V tiles in L2.
_ITEM_AT = '''

@gluon.jit
def item_at(w, H, H_KV, FULL_CNT, PART_CNT, SCHEDULE):
    """Item ``w``: its batch, head and KV head, its Q tile (SCHEDULE: most KV tiles first) and
    the tile's FULL and total KV tile counts."""
    bh = w // {num_q_tiles}
    b = bh // H
    h = bh % H
    hk = h // (H // H_KV)
    tile = gl.load(SCHEDULE + w % {num_q_tiles})
    n_full = gl.load(FULL_CNT + tile)
    n = n_full + {n_part}
    return b, h, hk, tile, n_full, n
'''

# The forward's loop over its program's items (``plan.assign``), in both partitions.
_ITEM_LOOP = """\
    mine = STARTS + gl.program_id(0)  # this program runs ITEMS[mine[0]:mine[1]]
    for i in range(gl.load(mine), gl.load(mine + 1)):
        w = gl.load(ITEMS + i)
        b, h, hk, tile, n_full, n = item_at(w, H, H_KV, FULL_CNT, PART_CNT, SCHEDULE)"""

_FWD_PRODUCER = '''

@gluon.jit
def producer(QD, KD, VD, q_smem, k_smem, v_smem, q_bar, q_empty, k_full, v_full, k_empty,
             v_empty, H, H_KV, STARTS, ITEMS, FULL_CNT, FULL_BOX, PART_IDX, PART_CNT,
             SCHEDULE, part_stride):
    """One warp: for each item of this program, the Q tile's halves (once both consumers have
    copied the previous Q tile into registers), then its K and V tiles by TMA into the ring,
    each as soon as both consumers have released the buffer it goes to. The ring runs on
    across items: the next item's first tiles load while this one's last are computed."""
{ring_views}
    q_halves = q_smem._reinterpret(QD.dtype, {q_halves}, QD.layout)
    c = 0  # K/V tiles loaded by this program
    j = 0  # items started by this program
{item_loop}
        mbarrier.wait(q_empty, (j & 1) ^ 1)
        mbarrier.expect(q_bar, 2 * QD.block_type.nbytes)
        for half in gl.static_range(2):
            tma.async_copy_global_to_shared(QD, {q_coords}, q_bar,
                                            q_halves.index(half))
        for it in range(n):
{ring_load}
            c += 1
        j += 1
'''

_TEMPLATE = '''

@gluon.jit
def consumer(OD, LSE, q_smem, k_smem, v_smem, o_smem, q_bar, q_empty, k_full, v_full, k_empty,
             v_empty, k_last, H, H_KV, STARTS, ITEMS, FULL_CNT, FULL_BOX, PART_IDX, PART_CNT,
             SCHEDULE, part_stride, sm_scale, s_lb, s_lh, HALF: gl.constexpr):
    """One warpgroup: for each item of this program, rows [64 HALF, 64 HALF + 64) of its Q
    tile, the online softmax with the next tile's scores issued before the previous tile's
    P V. Its Q rows are the A operand of the scores' MMAs from registers, copied at the item's
    start; Q's buffer is released then, so the next Q tile loads while this item runs. The
    output goes out by TMA from ``o_smem``: {o_where}. The item's last K buffer is held until
    both halves' last scores are done (``k_last``) and returns to the ring once that store has
    read it, which the next item checks after its first scores are issued."""
    ROWS: gl.constexpr = 64
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    BLOCK_D: gl.constexpr = k_smem.type.shape[2]
    dtype: gl.constexpr = OD.dtype
{layouts}
    o_rows: gl.constexpr = gl.SliceLayout(1, d_layout)
    q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)

    offs_m = HALF * ROWS + gl.arange(0, ROWS, layout=rows)
    offs_n = gl.arange(0, BLOCK_N, layout=cols)
    q_half = q_smem.index(HALF)
    o_halves = o_smem._reinterpret(dtype, [{o_count}, ROWS, BLOCK_D], q_smem.layout)
    o_boxes = o_smem._reinterpret(dtype, {o_boxes}, OD.layout)
    qk_scale = sm_scale * 1.4426950408889634
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    c = 0  # K/V tiles consumed by this program (the ring's position)
    j = 0  # items finished by this program (the phase of Q's buffer)
    staged = 0  # the K buffer of the previous item's last tile (its output's store reads it)
{item_loop}
{q_layout}
        q_row = q_tok
        q_row_ok = q_ok
{q_2d}
        qpos = q_tok + {offset}
        acc = gl.zeros([ROWS, BLOCK_D], gl.float32, d_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([ROWS], gl.float32, rows)
        it = 0
{tile_first}
        mbarrier.wait(q_bar, j & 1)
        q = q_half.load(q_operand)  # this half's rows, in registers for the whole item,
        mbarrier.arrive(q_empty)  # so the next item's Q tile may load now
        stage = c % STAGES
        mbarrier.wait(k_full.index(stage), (c // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        if j > 0:  # the previous item's output has left its K buffer: back to the ring
            tma.store_wait(0)
            mbarrier.arrive(k_empty.index(staged))
        s = warpgroup_mma_wait(0, deps=(s,))
        if n == 1:
            mbarrier.arrive(k_last)  # this half has read K[last] for the last time
        else:
            mbarrier.arrive(k_empty.index(stage))
{softmax_first}
        for it in range(1, n):
            stage = (c + it) % STAGES
            prev = (c + it - 1) % STAGES
{tile_loop}
            mbarrier.wait(k_full.index(stage), ((c + it) // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            mbarrier.wait(v_full.index(prev), ((c + it - 1) // STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p, a_layout), v_smem.index(prev), acc,
                                is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))
            if it == n - 1:
                mbarrier.arrive(k_last)
            else:
                mbarrier.arrive(k_empty.index(stage))
{softmax_loop}
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        last = (c + n - 1) % STAGES
        mbarrier.wait(v_full.index(last), ((c + n - 1) // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p, a_layout), v_smem.index(last), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last))

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        out = acc / gl.convert_layout(l_safe, o_rows)[:, None]
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        gl.store(LSE + b.to(gl.int64) * s_lb + h.to(gl.int64) * s_lh + q_row, lse,
                 mask=q_row_ok)
        mbarrier.wait(k_last, j & 1)  # both halves' last scores are done: K[last] is free
        o_halves.index({o_slot}).store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(OD, {o_coords},
                                        o_boxes.index({o_slot}))
        staged = last
        c += n
        j += 1
    tma.store_wait(0)


{halves}


# Scalars that reach the partitions stay run-time values: Triton would turn one equal to 1 (a
# single KV head, a list one tile wide) into a constant, which warp_specialize cannot pass.
@gluon.jit(do_not_specialize=["sm_scale", "s_lb", "s_lh", "part_stride", "H", "H_KV"])
def attn_fwd_sm90(
    QD, KD, VD, OD, LSE, FULL_CNT, FULL_BOX, PART_IDX, PART_CNT, SCHEDULE,
    STARTS, ITEMS, sm_scale, s_lb, s_lh, part_stride, H, H_KV,
    BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, SWIZZLE: gl.constexpr, STAGES: gl.constexpr,
):
    dtype: gl.constexpr = QD.dtype
    tile2d: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=SWIZZLE, element_bitwidth=dtype.primitive_bitwidth, rank=2)
    # The Q tile's rows as two 64-row halves, one per consumer: each half is a whole NVMMA
    # tile (a [128, D] tile wider than the swizzle is stored column block by column block, so
    # its row halves would not be contiguous).
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_D], tile2d)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=2)  # released by both consumers
    k_last = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(k_last, count=2)  # an item's last K tile, read by both consumers
{kv_ring}
{o_smem}
    ring = (q_bar, q_empty, k_full, v_full, k_empty, v_empty)
    work = (H, H_KV, STARTS, ITEMS, FULL_CNT, FULL_BOX, PART_IDX, PART_CNT, SCHEDULE,
            part_stride)
    rest = (sm_scale, s_lb, s_lh)
    gl.warp_specialize(
        [(consumer_0, (OD, LSE, q_smem, k_smem, v_smem, o_smem) + ring + (k_last,) + work
          + rest),
         (consumer_1, (OD, LSE, q_smem, k_smem, v_smem, o_smem) + ring + (k_last,) + work
          + rest),
         (producer, (QD, KD, VD, q_smem, k_smem, v_smem) + ring + work)],
        [4, 1], [240, 24])
'''

# Scores of tile ``it`` -> P (in the inputs' dtype), with the running max and sum: the pattern's
# mask on PARTIAL tiles only ({masking}: the tile's keys from ``kv_tile``, which each iteration
# takes (``_TILE_AHEAD``) before it waits for the scores); rows that have seen no key yet keep
# exp2(-inf - 0) = 0.
_SOFTMAX = """\
{masking}m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
p32 = gl.exp2(s * qk_scale - m_use[:, None])
alpha = gl.exp2(m_i - m_use)
l_i = l_i * alpha + gl.sum(p32, 1)
m_i = m_new
p = p32.to(dtype)"""

_MASKING = """\
if it >= n_full:
{k_layout}
    s = gl.where(k_ok & ({mask}), s, float("-inf"))
"""

# The consumer's KV tile ``it``, loaded ahead of the waits for its K buffer and its scores, so
# that the load's latency overlaps them. Only the masking of a PARTIAL tile reads it, so this is
# one load from the PARTIAL list, clamped to its first entry on FULL tiles (whose value goes
# unused); ``kv_tile_at`` would also compute every FULL tile's index (two loads and a division
# on N-d grids; na2d31's sm_90 SASS has 6 more global loads and 4 more high multiplies with it).
# Against computing it, same rounds on the H100: na2d31 +0.2%, na3d and sw16k within their
# rounds' spread (benchmarks/data/2026-12-07-s13-h100-ab-fwd-1.json). Plans without PARTIAL
# tiles need no index in the consumer.
_TILE_AHEAD = "kv_tile = gl.load(PART_IDX + tile * part_stride + gl.maximum(it - n_full, 0))"

# Shared memory one program may take on an H100 (227 KiB), and what the kernel adds to its
# Q, K and V buffers (mbarriers, alignment).
_SMEM_LIMIT = 232448
_SMEM_SLACK = 1024


# One consumer warpgroup's layouts: its [64, {cols}] scores (``s_layout``, sliced into ``rows``
# and ``cols``), its [64, BLOCK_D] accumulators (``d_layout``), and the register operand of a
# product that accumulates into one (``a_layout``: P or dS as the MMA's A).
CONSUMER_LAYOUTS = """\
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, {cols}, 16])
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)"""

# The start of a kernel whose program owns one Q tile of one head (the dQ kernel): its item
# (``item_at``), the 64-row halves of each per-row buffer ({rows}), and the K/V ring with its
# mbarriers.
_Q_TILE_PROGRAM = """\
    dtype: gl.constexpr = QD.dtype
    tile2d: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=SWIZZLE, element_bitwidth=dtype.primitive_bitwidth, rank=2)
    b, h, hk, tile, n_full, n = item_at(gl.program_id(0), H, H_KV, FULL_CNT, PART_CNT, SCHEDULE)

    # The Q tile's rows as two 64-row halves, one per consumer: each half is a whole NVMMA
    # tile (a [128, D] tile wider than the swizzle is stored column block by column block, so
    # its row halves would not be contiguous).
{rows}
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
{kv_ring}"""

# The K/V ring of a kernel whose program loops over KV tiles (the forward, dQ): ``STAGES``
# buffers of each, with their "full" (loaded) and "empty" (released) mbarriers.
_KV_RING = """\
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], tile2d)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], tile2d)
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # released by both consumers
        mbarrier.init(v_empty.index(i), count=2)"""


def q_tile_program(plan: TilePlan, rows: list[str]) -> str:
    """``_Q_TILE_PROGRAM`` for ``plan``, with a [2, 64, BLOCK_D] buffer for each name in
    ``rows``."""
    return _Q_TILE_PROGRAM.format(
        kv_ring=_KV_RING,
        rows="\n".join(f"    {r} = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_D], tile2d)"
                       for r in rows))


def _gl(lines: list[str], indent: int) -> str:
    """Generated Triton-language lines as Gluon: the same arithmetic, ``gl`` for ``tl``."""
    pad = " " * indent
    return "\n".join(pad + line.replace("tl.", "gl.") for line in lines)


def gluon_mask(plan: TilePlan) -> str:
    """The pattern's mask expression on a PARTIAL tile (``emit.mask_expr``), as Gluon."""
    return mask_expr(plan.list_pattern).replace("tl.", "gl.")


_CONSUMER_PARAMS = ("OD, LSE, q_smem, k_smem, v_smem, o_smem, q_bar, q_empty, k_full, v_full, "
                    "k_empty, v_empty, k_last, H, H_KV, STARTS, ITEMS, FULL_CNT, FULL_BOX, "
                    "PART_IDX, PART_CNT, SCHEDULE, part_stride, sm_scale, s_lb, s_lh")


def consumer_halves(params: str) -> str:
    """``consumer_0`` and ``consumer_1``: the kernel's ``consumer`` with HALF fixed, since
    ``warp_specialize`` passes no constexpr arguments."""
    out = []
    for half in (0, 1):
        head = textwrap.wrap(f"def consumer_{half}({params}):", 99, subsequent_indent=" " * 15,
                             break_long_words=False)
        call = textwrap.wrap(f"consumer({params}, {half})", 95, subsequent_indent=" " * 9,
                             break_long_words=False)
        out.append("@gluon.jit\n" + "\n".join(head) + "\n" + "\n".join("    " + c for c in call))
    return "\n\n\n".join(out)


def _item_at(plan: TilePlan) -> str:
    return _ITEM_AT.format(num_q_tiles=plan.num_q_tiles,
                           n_part="gl.load(PART_CNT + tile)" if has_partial(plan) else "0")


def _kv_tile_at(plan: TilePlan) -> str:
    box_before, box_tile = box_tile_lines(plan, "tile")
    return _KV_TILE_AT.format(box=_gl(box_before, 8), box_tile=box_tile.replace("tl.", "gl."))


def _ring(plan: TilePlan, counter: str, indent: int) -> dict[str, str]:
    """The ``ring_views`` and ``ring_load`` (at ring position ``counter``) of a producer."""
    kv = plan.kv_layout
    load = _RING_LOAD.format(c=counter, kv_coords=tma_coords(kv, "kv_tile", "hk", "H_KV"))
    return {"ring_views": _RING_VIEWS.format(kv_ring=_shape("STAGES", plan, kv.tile)),
            "ring_load": textwrap.indent(load, " " * indent)}


def kv_loop_source(plan: TilePlan, rows: list[tuple[str, str]]) -> str:
    """``item_at``, ``kv_tile_at`` and ``producer`` for a kernel whose program owns one Q tile
    of ``plan`` and loads, once, the two 64-row halves of each (descriptor, shared buffer) in
    ``rows`` (the dQ kernel)."""
    q = plan.q_layout
    loads = ["for half in gl.static_range(2):"]
    for desc, smem in rows:
        loads += [f"    {smem}_halves = {smem}._reinterpret({desc}.dtype, "
                  f"{_shape('2', plan, half_box(q))}, {desc}.layout)",
                  f"    tma.async_copy_global_to_shared({desc}, {half_coords(q, 'half')}, q_bar,",
                  f"                                    {smem}_halves.index(half))"]
    return _item_at(plan) + _kv_tile_at(plan) + _KV_LOOP.format(
        row_descs=", ".join(d for d, _ in rows),
        row_smem=", ".join(m for _, m in rows),
        row_bytes=" + ".join(f"2 * {d}.block_type.nbytes" for d, _ in rows),
        row_loads=_gl(loads, 4),
        **_ring(plan, "it", 8),
    )


def sm90_source(plan: TilePlan) -> str:
    """The Gluon forward kernel's source for this plan."""
    q = plan.q_layout
    q_1d = layout_code(q, "q", "tile", "offs_m", "")
    q_2d = [f"{n} = {n}[:, None]" for n in ["q_tok", "q_ok"] + [f"qx{a}" for a in range(q.ndim)]]
    producer = _FWD_PRODUCER.format(q_halves=_shape("2", plan, half_box(q)),
                                    q_coords=half_coords(q, "half"), item_loop=_ITEM_LOOP,
                                    **_ring(plan, "c", 12))
    if own_output_buffer(plan):
        o_where = "a buffer of its own (a K buffer holds half of it)"
        o_smem = "    o_smem = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_D], tile2d)"
        o_count, o_slot = "2", "HALF"
    else:
        o_where = "the item's last K buffer"
        o_smem = "    o_smem = k_smem  # the output is staged in each item's last K buffer"
        o_count, o_slot = "2 * STAGES", "2 * last + HALF"
    return _HEADER + _item_at(plan) + _kv_tile_at(plan) + producer + _TEMPLATE.format(
        halves=consumer_halves(_CONSUMER_PARAMS),
        layouts=CONSUMER_LAYOUTS.format(cols="BLOCK_N"),
        o_where=o_where, o_smem=o_smem, o_count=o_count, o_slot=o_slot, kv_ring=_KV_RING,
        item_loop=_ITEM_LOOP,
        o_boxes=_shape(o_count, plan, half_box(q)),
        o_coords=half_coords(q, "HALF"),
        q_layout=_gl(q_1d, 8),
        q_2d=_gl(q_2d, 8),
        offset=plan.kv_len - plan.q_len,
        softmax_first=_softmax(plan, 8),
        softmax_loop=_softmax(plan, 12),
        tile_first=_tile_ahead(plan, 8),
        tile_loop=_tile_ahead(plan, 12),
    )


def _shape(lead: str, plan: TilePlan, box: tuple[int, ...]) -> str:
    """A stack of ``lead`` descriptor boxes (``fwd.descriptor_box``) as a shape in the kernel's
    source: [lead, 1, 1, *box, BLOCK_D], or [lead, 1, *box, BLOCK_D] on 3-D grids."""
    return "[" + ", ".join([lead, *map(str, descriptor_box(plan, box, 0)[:-1]), "BLOCK_D"]) + "]"


def boxes(plan: TilePlan, block_d: int) -> tuple[list[int], list[int]]:
    """(Q and O box, K and V box) of the kernel's descriptors: each consumer's half of the Q
    tile (``half_box``), and one KV tile."""
    return (descriptor_box(plan, half_box(plan.q_layout), block_d),
            descriptor_box(plan, plan.kv_layout.tile, block_d))


def half_box(layout: TokenLayout) -> tuple[int, ...]:
    """The box of one consumer's 64 rows: the tile halved along its first axis longer than 1
    (rows are the box's tokens in row-major order, so the first 64 are its first half)."""
    tile = list(layout.tile)
    axis = next(a for a, t in enumerate(tile) if t > 1)
    assert tile[axis] % 2 == 0, f"tile {layout.tile}: no even axis to halve"
    tile[axis] //= 2
    return tuple(tile)


def half_coords(layout: TokenLayout, half: str, tile: str = "tile", head: str = "h",
                heads: str = "H") -> str:
    """The descriptor coordinates of half ``half`` (0 or 1) of tile ``tile`` of head ``head``
    (see ``half_box``; ``fwd.tma_coords`` names the arguments)."""
    axis = next(a for a, t in enumerate(layout.tile) if t > 1)
    coords = tma_coords(layout, tile, head, heads)[1:-1].split(", ")
    lead = 1 if layout.ndim == 3 else 2
    coords[lead + axis] = f"{coords[lead + axis]} + {half} * {layout.tile[axis] // 2}"
    return "[" + ", ".join(coords) + "]"


def _softmax(plan: TilePlan, indent: int) -> str:
    masking = ""
    if has_partial(plan):
        k_2d = layout_code(plan.kv_layout, "k", "kv_tile", "offs_n", "[None, :]")
        masking = _MASKING.format(k_layout=_gl(k_2d, 4), mask=gluon_mask(plan))
    return textwrap.indent(_SOFTMAX.format(masking=masking), " " * indent)


def _tile_ahead(plan: TilePlan, indent: int) -> str:
    return " " * indent + _TILE_AHEAD if has_partial(plan) else ""


def has_partial(plan: TilePlan) -> bool:
    """Whether some Q tile of ``plan`` visits a PARTIAL tile (the forward masks only those)."""
    return bool(plan.part_cnt.any())


def swizzle_bytes(block_d: int, element_bytes: int) -> int:
    """The NVMMA swizzle of a [rows, block_d] tile: the widest of 128/64/32 bytes that a row
    holds (TMA and the MMAs must agree on it)."""
    row = block_d * element_bytes
    return next(s for s in (128, 64, 32) if row % s == 0)


def ring_depth(once: int, per_stage: int, row_bytes: int) -> int:
    """The most ring buffers (up to 4) that fit in one program's shared memory beside the rows
    of ``once`` tokens loaded once, each buffer holding the rows of ``per_stage`` tokens."""
    return min(4, (_SMEM_LIMIT - _SMEM_SLACK - once * row_bytes) // (per_stage * row_bytes))


def own_output_buffer(plan: TilePlan) -> bool:
    """Whether the forward stages its output in a buffer of its own: where a K buffer cannot
    hold the 128 rows of a Q tile (else the item's last K buffer stages them)."""
    return plan.kv_layout.tile_size < plan.q_layout.tile_size


def stages_for(plan: TilePlan, block_d: int, element_bytes: int) -> int:
    """The most K/V ring buffers that fit next to Q (and the output's buffer, where it has
    one); ``in_scope`` asks for at least 3: a buffer is refilled a whole tile before it is
    read."""
    once = plan.q_layout.tile_size * (2 if own_output_buffer(plan) else 1)
    return ring_depth(once, 2 * plan.kv_layout.tile_size, block_d * element_bytes)


def gluon_plan(plan: TilePlan) -> bool:
    """What every Gluon kernel asks of a plan: static lists, no gather segment or block matrix
    (no run-time or auxiliary index tensors), and tiles that TMA loads as boxes."""
    return (plan.pattern.static and plan.gather is None and needs_aux(plan.pattern) is None
            and tma_eligible(plan))


def gluon_call(dtype: torch.dtype, head_dim: int, head_dim_v: int, key_bias: bool) -> bool:
    """What every Gluon kernel asks of a call: fp16 or bf16, equal head dims up to 128 (one
    [64, 128] accumulator per product and warpgroup), no key bias."""
    return (not key_bias and dtype in (torch.float16, torch.bfloat16)
            and head_dim == head_dim_v and padded_dim(head_dim) <= 128)


@functools.lru_cache(maxsize=64)
def _plan_ok(plan: TilePlan) -> bool:
    """Plan-side scope: ``gluon_plan``, FULL tiles that form boxes (the loop computes them from
    its counter: ``plan.full_box``), 128-row Q tiles, and every Q tile visits at least one KV
    tile (the loop's prologue assumes one)."""
    return (gluon_plan(plan) and plan.full_box is not None
            and plan.q_layout.tile_size == 128 and plan.kv_layout.tile_size in (64, 128)
            and bool(((plan.full_cnt + plan.part_cnt) > 0).all()))


def in_scope(plan: TilePlan, dtype: torch.dtype, head_dim: int, head_dim_v: int,
             key_bias: bool = False) -> bool:
    """Whether ``attn_fwd_sm90`` runs a call of this plan, dtype and head dims (see the module
    docstring for the scope); the simulator asks the same question."""
    return (gluon_call(dtype, head_dim, head_dim_v, key_bias)
            and launch_stages(plan, head_dim) >= 3 and _plan_ok(plan))


def forward_plan(build: Callable[[bool], TilePlan], dtype: torch.dtype, head_dim: int,
                 head_dim_v: int, key_bias: bool = False) -> TilePlan:
    """The forward plan of a call on a device where this kernel may run: ``build(True)`` (the
    default tiles chosen for this kernel, ``plan.choose.default_tiles``) where the kernel takes
    that plan, else ``build(False)``, the Triton kernel's (a gathered or run-time-list plan, an
    fp32 call: the Triton kernel runs those on its own tiles)."""
    if gluon_call(dtype, head_dim, head_dim_v, key_bias):
        plan = build(True)
        if in_scope(plan, dtype, head_dim, head_dim_v, key_bias):
            return plan
    return build(False)


def sm90_eligible(plan: TilePlan, q: Tensor, v: Tensor, key_bias: Tensor | None) -> bool:
    """``in_scope`` for these tensors."""
    return in_scope(plan, q.dtype, q.shape[-1], v.shape[-1], key_bias is not None)


def launch_stages(plan: TilePlan, head_dim: int) -> int:
    """The K/V ring buffers ``attn_fwd_sm90`` launches with (16-bit inputs)."""
    return stages_for(plan, padded_dim(head_dim), 2)


#: The warps of one program: two consumer warpgroups and a producer warp (padded to a
#: warpgroup: the launch takes 384 threads).
WARPS = 12


def descriptors(plan: TilePlan, views: list[Tensor], tiles: list[tuple[int, ...]]) -> list[Any]:
    """Gluon TMA descriptors over ``views`` (``fwd.tma_views``), one tile's box each, in the
    NVMMA swizzle the kernels' shared buffers use."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bd = padded_dim(views[0].shape[-1])
    swizzle = swizzle_bytes(bd, views[0].element_size())
    out = []
    for x, tile in zip(views, tiles, strict=True):
        box = descriptor_box(plan, tile, bd)
        layout = _nvmma_layout(swizzle, 8 * x.element_size(), len(box))
        out.append(TensorDescriptor(x, list(x.shape), list(x.stride()), box, layout))
    return out


@functools.lru_cache(maxsize=32)
def _nvmma_layout(swizzle: int, bits: int, rank: int) -> Any:
    """The shared layout of a descriptor, built once: a launch makes up to six descriptors and
    each layout took ~3 us of host time to build (a third of a descriptor's), which a short
    kernel's step waits on."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=bits, rank=rank)


@functools.lru_cache(maxsize=128)
def _module(plan: TilePlan) -> Any:
    return load_source(variant_name(plan, "sm90"), sm90_source(plan))


def persistent_for(kv_len: int, head_dim: int, element_bytes: int, l2_bytes: int) -> bool:
    """Whether the forward launches one program per SM, each running the items
    ``plan.assign.assign_items`` gives it (else one program per item): where one head's K and
    V fit in the L2 cache (``l2_bytes``).

    A program's start (its barriers, Q and first K/V loads, the ring's fill) and its end (the
    last P V, the output's store) are a large share of a short item (a Q tile visits 8 KV
    tiles on blk16k, 17 on sw16k). Against one program per item, in the same rounds on the
    H100 (``benchmarks/tune.py --sm90``): blk16k +12.7%, sw16k +4.1%
    (benchmarks/data/2026-12-07-s10-h100-tune-sm90-fwd.json); na2d31 +8.0%, na2d63 +4.5%,
    flux_gna +6.9% (benchmarks/data/2026-12-07-s11-h100-tune-sm90-fwd.json).

    Session 10's persistent launch gave program p every P-th item, which left programs
    unbalanced where items differ in length. Over ``assign_items``' lists, in the same
    rounds: na2d31 +3.1%, na2d63 +4.6%, flux_gna +2.0% against that stride; on 1-D plans the
    two measured alike (sw16k -0.3%; csw32k -2.7%, its rounds spread 12%; blk16k's items are
    all alike, so its lists are the stride's).

    Where one head's K and V outgrow L2 (hunyuan_na and hunyuan_gna: 59 MB against the H100's
    50 MiB), the lists lost to one program per item. Against the Triton kernel timed in the
    same rounds (benchmarks/data/2026-12-07-s11-h100-run-a.json): hunyuan_na 1.031x persistent,
    against 1.129x one program per item in session 7; hunyuan_gna 1.152x against 1.181x. A
    program's list is fixed ahead, so over ~175 items each the programs drift apart, the items
    in flight spread over more of the head's K/V than L2 holds; the hardware's dispatch keeps
    them neighbours (a reading of these numbers, not profiled). Session 12's kernel (Q in
    registers) weakens that reading: launched one program per item it ran hunyuan_na at
    1.031x the Triton kernel and hunyuan_gna at 1.160x (benchmarks/data/
    2026-12-07-s12-h100-run-c.json), what session 11's persistent launch ran; session 7's lead
    was another kernel's. The rule stands until the two launches are timed in the same
    rounds."""
    return kv_head_bytes(kv_len, head_dim, element_bytes) <= l2_bytes


def kv_head_bytes(kv_len: int, head_dim: int, element_bytes: int) -> int:
    """One head's K and V as the kernel reads them (head dims padded)."""
    return 2 * kv_len * padded_dim(head_dim) * element_bytes


def persistent_call(rows: Tensor) -> bool:
    """``persistent_for`` on ``rows``' GPU, for the [B, H, S, D] tensor whose heads every
    program re-reads across its items: K for the forward (the launch ``attn_fwd_sm90`` makes),
    Q for the dK/dV kernel (``sm90_bwd.dkdv_programs``)."""
    return persistent_for(rows.shape[2], rows.shape[3], rows.element_size(),
                          l2_bytes(rows.device.index))


@functools.lru_cache(maxsize=8)
def l2_bytes(index: int | None) -> int:
    """The L2 cache of CUDA device ``index``, in bytes."""
    return torch.cuda.get_device_properties(index).L2_cache_size


def attn_fwd_sm90(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float,
                  stages: int | None = None, programs: int | None = None,
                  assignment: tuple[Tensor, Tensor] | None = None
                  ) -> tuple[Tensor, Tensor] | None:
    """Run the Gluon forward; None when the tensors cannot be described for TMA (the caller
    runs the Triton kernel). Same contract as ``fwd.attn_fwd``. ``programs``: the grid
    (default: one per SM where ``persistent_for`` says so, else one per item); each program
    runs the items ``plan.assign.assign_items`` gives it, or those of ``assignment`` (its
    (starts, items) on q's device, for measurements against other rules)."""
    b, h, sq, d = q.shape
    h_kv = k.shape[1]
    out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)
    views = tma_views(plan, q, k, v, out)
    if views is None:
        return None
    bd = padded_dim(d)
    half, kv = half_box(plan.q_layout), plan.kv_layout.tile
    descs = descriptors(plan, views, [half, kv, kv, half])
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    t = plan.device_tensors(q.device)
    items = plan.num_q_tiles * b * h
    if programs is None:
        programs = num_sms(q.device) if persistent_call(k) else items
    programs = min(programs, items)
    starts, order = assignment or _assignment(plan, b * h, programs, str(q.device))
    _module(plan).attn_fwd_sm90[(programs,)](
        *descs, lse, t["full_cnt"], t["full_box"], t["part_idx"], t["part_cnt"],
        t["schedule"], starts, order, scale, lse.stride(0), lse.stride(1),
        t["part_idx"].stride(0), h, h_kv,
        BLOCK_N=plan.kv_layout.tile_size, BLOCK_D=bd, SWIZZLE=swizzle_bytes(bd, q.element_size()),
        STAGES=stages or launch_stages(plan, d), num_warps=4,
    )
    return out, lse


@functools.lru_cache(maxsize=64)
def _assignment(plan: TilePlan, heads: int, programs: int, device: str) -> tuple[Tensor, Tensor]:
    """``assign_items`` on ``device``, once per launch shape."""
    starts, items = assign_items(plan, heads, programs)
    return starts.to(device), items.to(device)
