"""The Hopper backward: warp-specialized dQ and dK/dV kernels (Gluon), each over a plan of its
own tiles, laid out as ``sm90``'s forward is (a producer warp loading by TMA into a ring of
buffers released by mbarriers, two consumer warpgroups of 64 rows each, never held in step, so
one's exponentials overlap the other's products).

dQ (``dq_source``): one program per 128-token Q tile and head, the forward's loop over its KV
tiles (``sm90.kv_loop_source``: FULL boxes, then the PARTIAL list), with Q's and dO's halves
loaded once. Each consumer first computes delta = rowsum(dO * O) for its rows, stores it for
dK/dV, then per KV tile:

    S = Q K^T,  dP = dO V^T                  async, both
    P = exp2(S * scale - lse)  (mask on PARTIAL tiles);  release V
    dS = P * (dP - delta);  dQ += dS K       then release K

dK/dV (``dkdv_source``): an item is one 128-token KV tile of one KV head; a program runs the
items ``plan.assign.assign_kv_items`` lists for it (one program per SM where one head's Q and
dO fit in L2, else one per item: ``dkdv_programs``). For each item the producer loads K and V
once (as two 64-row halves, into one of two K/V buffers, so that the next item's load overlaps
this one), then each visiting 64-token Q tile and its dO tile, head by head of the GQA group,
into the ring, with the Q tile's LSE and delta (loaded by the producer and stored beside them:
the consumers read them from shared memory where they use them, and hold no registers for them
across the products); each consumer owns 64 KV rows and their dK and dV accumulators, in the
transposed orientation so that P^T and dS^T are the register operand of the products that
accumulate:

    S^T  = K Q^T,  dP^T = V dO^T                      async, both
    P^T  = exp2(S^T * scale - lse)   (mask on PARTIAL tiles)
    dV  += P^T dO                                     async: runs while dS^T is computed
    dS^T = P^T * (dP^T - delta)
    dK  += dS^T Q                                     async; both waited for, then release

dV's product goes out before dS^T is computed rather than beside dK's (same registers, same
spills in the sm_90 SASS, gradients bit-identical). dK/dV against issuing both after dS^T,
same rounds on the H100 (``tune.py --sm90 --bwd --against``, benchmarks/data/
2026-12-07-s14-h100-ab-dkdv-{1,2}.json): blk16k +1.0% and +0.5%, na2d31 +1.9%, sw16k -3.1%
and +1.2% (this kernel's sw16k rounds spread 14% in the first).

Each consumer waits for a tile's last products before it starts the next tile. The loops can
instead issue the next tile's first two products behind this tile's last two
(``pipelined=True``, kept for ``benchmarks/tune.py``): on the H100 that ran slower for both
kernels (dQ 0.97x against the Triton kernel, plain 1.27x; dK/dV 0.95x against 1.09x, flux_gna,
``benchmarks/data/2026-12-06-s9-h100-tune-sm90-bwd.json``): the other consumer already fills
the tensor cores while one computes its exponentials.

Outputs leave through shared buffers their consumer alone read (dQ through its Q half, dK and
dV through its K and V halves) by TMA stores, so N-d tiles store as boxes of the grid: the token
permutation is fused, as in every other kernel. Every output row is owned by one program and
accumulated in a fixed order: deterministic, no atomics.

Tiles (``dq_tiles``, ``dkdv_tiles``): 128-token Q tiles over 64-token KV tiles for dQ (S, dP
and the dQ accumulator stay within a consumer's registers), 64-token Q tiles over 128-token KV
tiles for dK/dV; boxes visiting the fewest tiles on a grid. Scope (``dq_in_scope``,
``dkdv_in_scope``): the forward's (``sm90.gluon_plan``, ``sm90.gluon_call``). Other calls run
``bwd.attn_bwd_dq`` / ``bwd.attn_bwd_dkdv``: ``codegen.launch.backward_kernels`` decides per
kernel, by scope and by how much more work the larger tiles cost (``GLUON_BWD_MAX_WORK``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ..plan.assign import assign_kv_items
from ..plan.choose import best_boxes
from ..plan.tiles import TilePlan, grid_of
from ..spec.patterns import Pattern
from .cache import load_source
from .emit import layout_code
from .fwd import num_sms, padded_dim, tma_coords, tma_views, variant_name
from .sm90 import (
    _HEADER,
    CONSUMER_LAYOUTS,
    _gl,
    _shape,
    consumer_halves,
    descriptors,
    gluon_call,
    gluon_mask,
    gluon_plan,
    half_box,
    half_coords,
    has_partial,
    kv_loop_source,
    persistent_call,
    q_tile_program,
    ring_depth,
    swizzle_bytes,
)

_DQ_PARAMS = ("DQD, O, LSE, DELTA, q_smem, do_smem, k_smem, v_smem, q_bar, k_full, v_full, "
              "k_empty, v_empty, b, h, H, tile, n_full, n, FULL_BOX, PART_IDX, part_stride, "
              "sm_scale, s_lb, s_lh, s_ob, s_oh, s_os, head_dim")

_DQ = '''

@gluon.jit
def consumer(DQD, O, LSE, DELTA, q_smem, do_smem, k_smem, v_smem, q_bar, k_full, v_full,
             k_empty, v_empty, b, h, H, tile, n_full, n, FULL_BOX, PART_IDX, part_stride,
             sm_scale, s_lb, s_lh, s_ob, s_oh, s_os, head_dim, HALF: gl.constexpr):
    """One warpgroup: delta, then dQ, for rows [64 HALF, 64 HALF + 64) of the Q tile."""
    ROWS: gl.constexpr = 64
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    BLOCK_D: gl.constexpr = k_smem.type.shape[2]
    dtype: gl.constexpr = DQD.dtype
{layouts}

    offs_m = HALF * ROWS + gl.arange(0, ROWS, layout=rows)
    offs_n = gl.arange(0, BLOCK_N, layout=cols)
    offs_o = HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, d_layout))
    offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, d_layout))
{q_layout}
{o_layout}
    l_base = b.to(gl.int64) * s_lb + h.to(gl.int64) * s_lh
    lse = gl.load(LSE + l_base + q_tok, mask=q_ok, other=float("inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    o = gl.load(O + b.to(gl.int64) * s_ob + h.to(gl.int64) * s_oh + o_tok[:, None] * s_os
                + offs_d[None, :], mask=o_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    mbarrier.wait(q_bar, 0)
    q = q_smem.index(HALF)
    do = do_smem.index(HALF)
    delta = gl.sum(o.to(gl.float32) * do.load(d_layout).to(gl.float32), 1)
    delta = gl.convert_layout(delta, rows)
    gl.store(DELTA + l_base + q_tok, delta, mask=q_ok)
{q_2d}
    qpos = q_tok + {offset}

    qk_scale = sm_scale * 1.4426950408889634
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    dq = gl.zeros([ROWS, BLOCK_D], gl.float32, d_layout)
{loop}
    q.store((dq * sm_scale).to(dtype))  # this half of Q's buffer is free: its scores are done
    fence_async_shared()
    dq_box = q_smem._reinterpret(dtype, {q_halves}, DQD.layout).index(HALF)
    tma.async_copy_shared_to_global(DQD, {dq_coords}, dq_box)
    tma.store_wait(0)


{halves}


# Scalars that reach the partitions stay run-time values (see ``sm90``'s kernel).
@gluon.jit(do_not_specialize=["sm_scale", "s_lb", "s_lh", "s_ob", "s_oh", "s_os", "part_stride",
                              "H", "H_KV", "head_dim"])
def attn_bwd_dq_sm90(
    QD, KD, VD, DOD, DQD, O, LSE, DELTA, FULL_CNT, FULL_BOX, PART_IDX, PART_CNT, SCHEDULE,
    sm_scale, s_lb, s_lh, s_ob, s_oh, s_os, part_stride, H, H_KV, head_dim,
    BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, SWIZZLE: gl.constexpr, STAGES: gl.constexpr,
):
{program}
    ring = (k_smem, v_smem, q_bar, k_full, v_full, k_empty, v_empty)
    work = (tile, n_full, n, FULL_BOX, PART_IDX, part_stride)
    rest = (sm_scale, s_lb, s_lh, s_ob, s_oh, s_os, head_dim)
    gl.warp_specialize(
        [(consumer_0, (DQD, O, LSE, DELTA, q_smem, do_smem) + ring + (b, h, H) + work + rest),
         (consumer_1, (DQD, O, LSE, DELTA, q_smem, do_smem) + ring + (b, h, H) + work + rest),
         (producer, (QD, DOD, KD, VD, q_smem, do_smem) + ring + (b, h, hk, H, H_KV) + work)],
        [4, 1], [240, 24])
'''

# The dQ loop, plain: each tile's S and dP, then its dS K, waited for before the next tile.
_DQ_LOOP = """\
for it in range(n):
    stage = it % STAGES
    phase = (it // STAGES) & 1
    mbarrier.wait(k_full.index(stage), phase)
    s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    mbarrier.wait(v_full.index(stage), phase)
    dp = warpgroup_mma(do, v_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                       is_async=True)
{step}
    dq = warpgroup_mma_wait(0, deps=(dq,))
    mbarrier.arrive(k_empty.index(stage))"""

# The dQ loop, pipelined as the forward's: the next tile's S and dP are issued behind this
# tile's dS K (slower on the H100 than the plain loop: see the module docstring).
_DQ_LOOP_PIPELINED = """\
if n > 0:
    mbarrier.wait(k_full.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    mbarrier.wait(v_full.index(0), 0)
    dp = warpgroup_mma(do, v_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                       is_async=True)
    for it in range(n - 1):
        stage = it % STAGES
{step_loop}
        nxt = (it + 1) % STAGES
        phase = ((it + 1) // STAGES) & 1
        mbarrier.wait(k_full.index(nxt), phase)
        s = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.wait(v_full.index(nxt), phase)
        dp = warpgroup_mma(do, v_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        dq = warpgroup_mma_wait(2, deps=(dq,))  # groups retire in order: this tile's dS K
        mbarrier.arrive(k_empty.index(stage))
    it = n - 1
    stage = it % STAGES
{step_last}
    dq = warpgroup_mma_wait(0, deps=(dq,))
    mbarrier.arrive(k_empty.index(stage))"""

# One KV tile's dS K, issued (not waited for) once its S and dP are.
_DQ_STEP = """\
s = warpgroup_mma_wait(1, deps=(s,))
p = gl.exp2(s * qk_scale - lse[:, None])
{mask}
dp = warpgroup_mma_wait(0, deps=(dp,))
mbarrier.arrive(v_empty.index(stage))
ds = p * (dp - delta[:, None])
dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k_smem.index(stage), dq,
                   is_async=True)"""

# The pattern's mask on PARTIAL KV tiles of the dQ loop.
_DQ_MASK = """\
if it >= n_full:
    kv_tile = kv_tile_at(it, n_full, FULL_BOX, PART_IDX, tile, part_stride)
{k_layout}
    p = gl.where(k_ok & ({mask}), p, 0.0)"""

_DKDV_PARAMS = ("DKD, DVD, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, "
                "kv_empty, full, empty, H_KV, GROUP, STARTS, ITEMS, T_FULL_IDX, T_PART_IDX, "
                "full_stride, part_stride, sm_scale")

_DKDV = '''

@gluon.jit
def q_tile_at(it, n_full, full_row, part_row):
    """The it-th Q tile visiting an item's KV tile: its FULL list (``full_row``), then its
    PARTIAL one (``part_row``)."""
    if it < n_full:
        q_tile = gl.load(full_row + it)
    else:
        q_tile = gl.load(part_row + it - n_full)
    return q_tile


@gluon.jit
def kv_item_at(ITEMS, i, H_KV, T_FULL_IDX, T_PART_IDX, full_stride, part_stride):
    """The i-th item of the program lists (``kv_item_table``): its batch and KV head, its KV
    tile, the tile's FULL and total counts of visiting Q tiles, and its two lists."""
    row = ITEMS + 4 * i
    bhk = gl.load(row)
    kv_tile = gl.load(row + 1)
    full_row = T_FULL_IDX + kv_tile * full_stride
    part_row = T_PART_IDX + kv_tile * part_stride
    return bhk // H_KV, bhk % H_KV, kv_tile, gl.load(row + 2), gl.load(row + 3), full_row, part_row


@gluon.jit
def producer(QD, KD, VD, DOD, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
             kv_bar, kv_empty, full, empty, H_KV, GROUP, STARTS, ITEMS, T_FULL_IDX, T_PART_IDX,
             full_stride, part_stride, s_lb, s_lh):
    """One warp: for each item of this program, its K and V tiles (two 64-row halves each)
    into the K/V buffers the item before last used, once that item's dK and dV have left them;
    then each visiting Q tile with its dO tile, head by head of the GQA group, into the ring,
    which runs on across items, with the Q tile's LSE (log2 units) and delta beside them. The
    next item's K and V thus load while this one runs."""
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    r_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs_r = gl.arange(0, BLOCK_M, layout=r_layout)
    BLOCK_D: gl.constexpr = q_smem.type.shape[2]
    KV_BUFS: gl.constexpr = k_smem.type.shape[0] // 2
    k_halves = k_smem._reinterpret(KD.dtype, {kv_halves}, KD.layout)
    v_halves = v_smem._reinterpret(VD.dtype, {kv_halves}, VD.layout)
    q_boxes = q_smem._reinterpret(QD.dtype, {q_ring}, QD.layout)
    do_boxes = do_smem._reinterpret(DOD.dtype, {q_ring}, DOD.layout)
    H = H_KV * GROUP
    c = 0  # Q/dO tiles loaded by this program
    j = 0  # items started by this program
{item_loop}
        buf = j % KV_BUFS
        # passes at once on each buffer's first use
        mbarrier.wait(kv_empty.index(buf), ((j // KV_BUFS) & 1) ^ 1)
        mbarrier.expect(kv_bar.index(buf),
                        2 * KD.block_type.nbytes + 2 * VD.block_type.nbytes)
        for half in gl.static_range(2):
            tma.async_copy_global_to_shared(KD, {kv_coords}, kv_bar.index(buf),
                                            k_halves.index(2 * buf + half))
            tma.async_copy_global_to_shared(VD, {kv_coords}, kv_bar.index(buf),
                                            v_halves.index(2 * buf + half))
        for g in range(GROUP):
            h = hk * GROUP + g
            l_base = b.to(gl.int64) * s_lb + h.to(gl.int64) * s_lh
            for it in range(n):
                stage = c % STAGES
                free = ((c // STAGES) & 1) ^ 1  # passes at once on each buffer's first use
                q_tile = q_tile_at(it, n_full, full_row, part_row)
{r_layout}
                lse = gl.load(LSE + l_base + r_tok, mask=r_ok, other=float("inf"))
                lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
                delta = gl.load(DELTA + l_base + r_tok, mask=r_ok, other=0.0)
                mbarrier.wait(empty.index(stage), free)
                mbarrier.expect(full.index(stage),
                                QD.block_type.nbytes + DOD.block_type.nbytes)
                tma.async_copy_global_to_shared(QD, {q_coords}, full.index(stage),
                                                q_boxes.index(stage))
                tma.async_copy_global_to_shared(DOD, {q_coords}, full.index(stage),
                                                do_boxes.index(stage))
                lse_smem.index(stage).store(lse)
                delta_smem.index(stage).store(delta)
                mbarrier.arrive(full.index(stage))  # the second arrival: LSE and delta are in
                c += 1
        j += 1


@gluon.jit
def consumer(DKD, DVD, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, kv_empty,
             full, empty, H_KV, GROUP, STARTS, ITEMS, T_FULL_IDX, T_PART_IDX, full_stride,
             part_stride, sm_scale, HALF: gl.constexpr):
    """One warpgroup: for each item of this program, rows [64 HALF, 64 HALF + 64) of its KV
    tile, dK and dV over every visiting Q tile of every head of the group. dK and dV leave by
    TMA from this half's K and V buffers, whose store is waited for once the next item's
    first products are issued; the buffers then return to the producer."""
    ROWS: gl.constexpr = 64
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    BLOCK_D: gl.constexpr = q_smem.type.shape[2]
    KV_BUFS: gl.constexpr = k_smem.type.shape[0] // 2
    dtype: gl.constexpr = DKD.dtype
{layouts}

    offs_n = HALF * ROWS + gl.arange(0, ROWS, layout=rows)
    offs_m = gl.arange(0, BLOCK_M, layout=cols)
    dk_boxes = k_smem._reinterpret(dtype, {kv_halves}, DKD.layout)
    dv_boxes = v_smem._reinterpret(dtype, {kv_halves}, DVD.layout)
    qk_scale = sm_scale * 1.4426950408889634
    s_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
    H = H_KV * GROUP
    base = 0  # Q/dO tiles consumed by this program (the ring's position)
    j = 0  # items started by this program
{item_loop}
        buf = j % KV_BUFS
{k_layout}
{k_2d}
        k = k_smem.index(2 * buf + HALF)
        v = v_smem.index(2 * buf + HALF)
        dk = gl.zeros([ROWS, BLOCK_D], gl.float32, d_layout)
        dv = gl.zeros([ROWS, BLOCK_D], gl.float32, d_layout)
        total = GROUP * n  # visits of this KV tile: every head of the group, every Q tile
        mbarrier.wait(kv_bar.index(buf), (j // KV_BUFS) & 1)
{loop}
        if total == 0:
{release}

        # This consumer's K and V halves are read by nobody else: they stage dK and dV.
        k.store((dk * sm_scale).to(dtype))
        v.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(DKD, {out_coords}, dk_boxes.index(2 * buf + HALF))
        tma.async_copy_shared_to_global(DVD, {out_coords}, dv_boxes.index(2 * buf + HALF))
        if KV_BUFS == 1:  # the next item's K and V load only once these stores are done
            tma.store_wait(0)
            mbarrier.arrive(kv_empty.index(0))
        base += total
        j += 1
    tma.store_wait(0)


{halves}


# Scalars that reach the partitions stay run-time values (see ``sm90``'s kernel).
@gluon.jit(do_not_specialize=["sm_scale", "s_lb", "s_lh", "full_stride", "part_stride",
                              "H_KV", "GROUP"])
def attn_bwd_dkdv_sm90(
    QD, KD, VD, DOD, DKD, DVD, LSE, DELTA, T_FULL_IDX, T_PART_IDX, STARTS, ITEMS,
    sm_scale, s_lb, s_lh, full_stride, part_stride, H_KV, GROUP,
    BLOCK_D: gl.constexpr, SWIZZLE: gl.constexpr, STAGES: gl.constexpr, KV_BUFS: gl.constexpr,
):
    dtype: gl.constexpr = QD.dtype
    tile2d: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=SWIZZLE, element_bitwidth=dtype.primitive_bitwidth, rank=2)
    # KV_BUFS items' K and V halves: item j uses buffers 2 (j % KV_BUFS) and 2 (j % KV_BUFS) + 1.
    k_smem = gl.allocate_shared_memory(dtype, [2 * KV_BUFS, 64, BLOCK_D], tile2d)
    v_smem = gl.allocate_shared_memory(dtype, [2 * KV_BUFS, 64, BLOCK_D], tile2d)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, {block_m}, BLOCK_D], tile2d)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, {block_m}, BLOCK_D], tile2d)
    rows1d: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, {block_m}], rows1d)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, {block_m}], rows1d)
    kv_bar = gl.allocate_shared_memory(gl.int64, [KV_BUFS, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [KV_BUFS, 1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(KV_BUFS):
        mbarrier.init(kv_bar.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # released by both consumers
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=2)  # the producer's TMA, then its LSE and delta
        mbarrier.init(empty.index(i), count=2)  # released by both consumers
    shared = (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, kv_empty, full,
              empty)
    work = (H_KV, GROUP, STARTS, ITEMS, T_FULL_IDX, T_PART_IDX, full_stride, part_stride)
    gl.warp_specialize(
        [(consumer_0, (DKD, DVD) + shared + work + (sm_scale,)),
         (consumer_1, (DKD, DVD) + shared + work + (sm_scale,)),
         (producer, (QD, KD, VD, DOD, LSE, DELTA) + shared + work + (s_lb, s_lh))],
        [4, 1], [240, 24])
'''

# The dK/dV kernel's loop over its program's items (``plan.assign.assign_kv_items``), in both
# partitions.
_KV_ITEM_LOOP = """\
    mine = STARTS + gl.program_id(0)  # this program runs ITEMS[mine[0]:mine[1]]
    for i in range(gl.load(mine), gl.load(mine + 1)):
        b, hk, kv_tile, n_full, n, full_row, part_row = kv_item_at(
            ITEMS, i, H_KV, T_FULL_IDX, T_PART_IDX, full_stride, part_stride)"""

# The previous item's dK and dV have left its K and V buffers: they return to the producer.
_DKDV_RELEASE = """\
if KV_BUFS > 1:
    if j > 0:
        tma.store_wait(0)
        mbarrier.arrive(kv_empty.index((j - 1) % KV_BUFS))"""

# Visit c of the dK/dV loop: its ring position and its Q tile's place in the lists.
_DKDV_VISIT = """\
r = base + c
g = c // n
it = c - g * n"""

# S^T and dP^T of visit c, issued once its Q and dO tiles are in.
_DKDV_ISSUE = """\
mbarrier.wait(full.index(r % STAGES), (r // STAGES) & 1)
sT = warpgroup_mma(k, q_smem.index(r % STAGES).permute((1, 0)), s_zero, use_acc=False,
                   is_async=True)
dpT = warpgroup_mma(v, do_smem.index(r % STAGES).permute((1, 0)), s_zero, use_acc=False,
                    is_async=True)"""

# Visit c's dV += P^T dO, issued once S^T is in, so that it runs while dS^T is computed; then
# dK += dS^T Q once dP^T is in. Neither is waited for here.
_DKDV_STEP = """\
sT = warpgroup_mma_wait(1, deps=(sT,))
lse = lse_smem.index(r % STAGES).load(cols)
pT = gl.exp2(sT * qk_scale - lse[None, :])
{mask}
dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), a_layout), do_smem.index(r % STAGES), dv,
                   is_async=True)
dpT = warpgroup_mma_wait(1, deps=(dpT,))  # groups retire in order: dV may still run
delta = delta_smem.index(r % STAGES).load(cols)
dsT = pT * (dpT - delta[None, :])
dk = warpgroup_mma(gl.convert_layout(dsT.to(dtype), a_layout), q_smem.index(r % STAGES), dk,
                   is_async=True)"""

# The dK/dV loop, plain: each visit's four products waited for before the next visit; the
# previous item's buffers released behind the first visit's first products.
_DKDV_LOOP = """\
for c in range(total):
{visit}
{issue}
    if c == 0:
{release}
{step}
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
    mbarrier.arrive(empty.index(r % STAGES))"""

# The dK/dV loop, pipelined as the dQ loop: the next visit's LSE and delta are loaded and its
# S^T and dP^T issued behind this visit's dV and dK products (slower on the H100 than the plain
# loop: see the module docstring).
_DKDV_LOOP_PIPELINED = """\
if total > 0:
    c = 0
{visit}
{issue}
{release}
    for i in range(total - 1):
        c = i
        r = base + c
{step_loop}
        c = i + 1
{visit_loop}
{issue_loop}
        dv, dk = warpgroup_mma_wait(2, deps=(dv, dk))  # groups retire in order: visit i's
        mbarrier.arrive(empty.index((base + i) % STAGES))
    c = total - 1
    r = base + c
{step}
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
    mbarrier.arrive(empty.index(r % STAGES))"""


# The pattern's mask on PARTIAL Q tiles, in the transposed [KV rows, Q columns] orientation.
_DKDV_MASK = """\
if it >= n_full:
    q_tile = gl.load(part_row + it - n_full)
{q_layout}
{q_2d}
    qpos = q_tok + {offset}
    pT = gl.where(k_ok & q_ok & ({mask}), pT, 0.0)"""


def _indented(text: str, indent: int) -> str:
    return "\n".join(" " * indent + line for line in text.splitlines())


def _tiles(pattern: Pattern, q_len: int, kv_len: int, q_tokens: int, kv_tokens: int
           ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if grid_of(pattern) is None:
        return (q_tokens,), (kv_tokens,)
    return best_boxes(pattern, q_len, kv_len, q_tokens, kv_tokens)


def dq_tiles(pattern: Pattern, q_len: int, kv_len: int, kv_tokens: int = 64
             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(q_tile, kv_tile) of the dQ kernel's plan: 128 Q tokens (two consumer halves of 64) per
    program over ``kv_tokens``-token KV tiles (64, or 128); on a grid, the boxes visiting the
    fewest tiles."""
    return _tiles(pattern, q_len, kv_len, 128, kv_tokens)


def dkdv_tiles(pattern: Pattern, q_len: int, kv_len: int
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(q_tile, kv_tile) of the dK/dV kernel's plan: 64 Q tokens per visit, 128 KV tokens (two
    consumer halves of 64) per program; on a grid, the boxes visiting the fewest tiles."""
    return _tiles(pattern, q_len, kv_len, 64, 128)


def dq_source(plan: TilePlan, pipelined: bool = False) -> str:
    """The Gluon dQ kernel's source for this plan (``pipelined``: see ``_DQ_LOOP_PIPELINED``)."""
    q = plan.q_layout
    q_2d = [f"{n} = {n}[:, None]" for n in ["q_tok", "q_ok"] + [f"qx{a}" for a in range(q.ndim)]]
    mask = ""
    if has_partial(plan):
        k_2d = layout_code(plan.kv_layout, "k", "kv_tile", "offs_n", "[None, :]")
        mask = _DQ_MASK.format(k_layout=_gl(k_2d, 4), mask=gluon_mask(plan))
    step = _DQ_STEP.format(mask=mask)
    if pipelined:
        loop = _DQ_LOOP_PIPELINED.format(step_loop=_indented(step, 8),
                                         step_last=_indented(step, 4))
    else:
        loop = _DQ_LOOP.format(step=_indented(step, 4))
    return _HEADER + kv_loop_source(plan, [("QD", "q_smem"), ("DOD", "do_smem")]) + _DQ.format(
        q_layout=_gl(layout_code(q, "q", "tile", "offs_m", ""), 4),
        o_layout=_gl(layout_code(q, "o", "tile", "offs_o", ""), 4),
        q_2d=_gl(q_2d, 4),
        offset=plan.kv_len - plan.q_len,
        loop=_indented(loop, 4),
        q_halves=_shape("2", plan, half_box(q)),
        dq_coords=half_coords(q, "HALF"),
        halves=consumer_halves(_DQ_PARAMS),
        layouts=CONSUMER_LAYOUTS.format(cols="BLOCK_N"),
        program=q_tile_program(plan, ["q_smem", "do_smem"]),
    )


def dkdv_source(plan: TilePlan, pipelined: bool = False) -> str:
    """The Gluon dK/dV kernel's source for this plan (``pipelined``: see
    ``_DKDV_LOOP_PIPELINED``)."""
    kv, q = plan.kv_layout, plan.q_layout
    k_1d = layout_code(kv, "k", "kv_tile", "offs_n", "")
    k_2d = [f"{n} = {n}[:, None]" for n in ["k_tok", "k_ok"] + [f"kx{a}" for a in range(kv.ndim)]]
    # The Q tile's columns as 1-D vectors (r_*) for LSE and delta, and as [1, M] rows (q_*,
    # what the mask expression reads) on PARTIAL tiles.
    q_2d = [f"q{n} = r{n}[None, :]" for n in ["_tok", "_ok"] + [f"x{a}" for a in range(q.ndim)]]
    mask = ""
    if has_partial(plan):
        mask = _DKDV_MASK.format(q_layout=_gl(layout_code(q, "r", "q_tile", "offs_m", ""), 4),
                                 q_2d=_gl(q_2d, 4), offset=plan.kv_len - plan.q_len,
                                 mask=gluon_mask(plan))
    visit = _DKDV_VISIT
    step = _DKDV_STEP.format(mask=mask)
    if pipelined:
        loop = _DKDV_LOOP_PIPELINED.format(
            visit=_indented(visit, 4), issue=_indented(_DKDV_ISSUE, 4),
            release=_indented(_DKDV_RELEASE, 4),
            step_loop=_indented(step, 8), visit_loop=_indented(visit, 8),
            issue_loop=_indented(_DKDV_ISSUE, 8), step=_indented(step, 4))
    else:
        loop = _DKDV_LOOP.format(visit=_indented(visit, 4), issue=_indented(_DKDV_ISSUE, 4),
                                 release=_indented(_DKDV_RELEASE, 8),
                                 step=_indented(step, 4))
    return _HEADER + _DKDV.format(
        item_loop=_KV_ITEM_LOOP,
        release=_indented(_DKDV_RELEASE, 12),
        kv_halves=_shape("2 * KV_BUFS", plan, half_box(kv)),
        q_ring=_shape("STAGES", plan, q.tile),
        kv_coords=half_coords(kv, "half", "kv_tile", "hk", "H_KV"),
        r_layout=_gl(layout_code(q, "r", "q_tile", "offs_r", ""), 16),
        out_coords=half_coords(kv, "HALF", "kv_tile", "hk", "H_KV"),
        q_coords=tma_coords(q, "q_tile", "h", "H"),
        k_layout=_gl(k_1d, 8),
        k_2d=_gl(k_2d, 8),
        loop=_indented(loop, 8),
        halves=consumer_halves(_DKDV_PARAMS),
        layouts=CONSUMER_LAYOUTS.format(cols="BLOCK_M"),
        block_m=q.tile_size,
    )


def dq_stages(plan: TilePlan, head_dim: int) -> int:
    """K/V ring buffers of the dQ kernel, beside Q's and dO's halves."""
    return ring_depth(2 * plan.q_layout.tile_size, 2 * plan.kv_layout.tile_size,
                      padded_dim(head_dim) * 2)


#: Items whose K and V the dK/dV kernel holds at once: 2 lets the next item's load overlap
#: this one's products; 1 loads it once this item's dK and dV are stored.
DKDV_KV_BUFFERS = 2


def dkdv_stages(plan: TilePlan, head_dim: int, kv_buffers: int = DKDV_KV_BUFFERS) -> int:
    """The most Q/dO ring buffers of the dK/dV kernel that fit beside ``kv_buffers`` items' K
    and V."""
    return ring_depth(2 * kv_buffers * plan.kv_layout.tile_size, 2 * plan.q_layout.tile_size,
                      padded_dim(head_dim) * 2)


#: Q/dO ring buffers the dK/dV kernel launches with. On the H100 two ran as fast as deeper
#: rings or faster: blk16k 0.813 ms against 0.827 ms at 3 and 4, flux_gna 17.19 ms at 2 and at 4
#: (benchmarks/data/2026-12-06-s9-h100-tune-sm90-bwd.json); session 8's sweep put 2 ahead by
#: 2-4% on 1-D rows. Each Q tile's products take longer than its loads: a deeper ring only
#: holds tiles that wait.
DKDV_RING = 2


def dkdv_launch_stages(plan: TilePlan, head_dim: int, kv_buffers: int = DKDV_KV_BUFFERS
                       ) -> int:
    """The ring depth ``attn_bwd_dkdv_sm90`` launches with: ``DKDV_RING``, or what fits."""
    return min(DKDV_RING, dkdv_stages(plan, head_dim, kv_buffers))


@functools.lru_cache(maxsize=64)
def _dq_plan_ok(plan: TilePlan) -> bool:
    """``gluon_plan``, the kernel's tile sizes, FULL tiles that form boxes (``kv_tile_at``)."""
    return (gluon_plan(plan) and plan.q_layout.tile_size == 128
            and plan.kv_layout.tile_size in (64, 128) and plan.full_box is not None)


@functools.lru_cache(maxsize=64)
def _dkdv_plan_ok(plan: TilePlan) -> bool:
    return (gluon_plan(plan) and plan.q_layout.tile_size == 64
            and plan.kv_layout.tile_size == 128)


def dq_in_scope(plan: TilePlan, dtype: torch.dtype, head_dim: int, head_dim_v: int,
                key_bias: bool = False) -> bool:
    """Whether ``attn_bwd_dq_sm90`` runs a call of this plan (``dq_tiles``'), dtype and head
    dims."""
    return (gluon_call(dtype, head_dim, head_dim_v, key_bias)
            and dq_stages(plan, head_dim) >= 2 and _dq_plan_ok(plan))


def dkdv_in_scope(plan: TilePlan, dtype: torch.dtype, head_dim: int, head_dim_v: int,
                  key_bias: bool = False) -> bool:
    """Whether ``attn_bwd_dkdv_sm90`` runs a call of this plan (``dkdv_tiles``'), dtype and
    head dims."""
    return (gluon_call(dtype, head_dim, head_dim_v, key_bias)
            and dkdv_stages(plan, head_dim) >= 2 and _dkdv_plan_ok(plan))


@functools.lru_cache(maxsize=128)
def _dq_module(plan: TilePlan, pipelined: bool = False) -> Any:
    return load_source(variant_name(plan, "sm90-dq", pipelined=pipelined),
                       dq_source(plan, pipelined))


@functools.lru_cache(maxsize=128)
def _dkdv_module(plan: TilePlan, pipelined: bool = False) -> Any:
    return load_source(variant_name(plan, "sm90-dkdv", pipelined=pipelined),
                       dkdv_source(plan, pipelined))


def attn_bwd_dq_sm90(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     plan: TilePlan, scale: float, stages: int | None = None,
                     pipelined: bool = False) -> tuple[Tensor, Tensor] | None:
    """(dq, delta) by the Gluon kernel (``bwd.attn_bwd_dq``'s contract); None when the tensors
    cannot be described for TMA (the caller runs the Triton kernel). ``lse`` contiguous."""
    dq = torch.empty_like(q)
    views = tma_views(plan, q, k, v, do, dq)
    if views is None:
        return None
    b, h, _, d = q.shape
    half, kv = half_box(plan.q_layout), plan.kv_layout.tile
    descs = descriptors(plan, views, [half, kv, kv, half, half])
    delta = torch.empty_like(lse)
    t = plan.device_tensors(q.device)
    bd = padded_dim(d)
    _dq_module(plan, pipelined).attn_bwd_dq_sm90[(plan.num_q_tiles * b * h,)](
        *descs, out, lse, delta, t["full_cnt"], t["full_box"], t["part_idx"], t["part_cnt"],
        t["schedule"], scale, lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        out.stride(2), t["part_idx"].stride(0), h, k.shape[1], d,
        BLOCK_N=plan.kv_layout.tile_size, BLOCK_D=bd, SWIZZLE=swizzle_bytes(bd, q.element_size()),
        STAGES=stages or dq_stages(plan, d), num_warps=4,
    )
    return dq, delta


def attn_bwd_dkdv_sm90(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
                       plan: TilePlan, scale: float, stages: int | None = None,
                       pipelined: bool = False, programs: int | None = None,
                       kv_buffers: int = DKDV_KV_BUFFERS) -> tuple[Tensor, Tensor] | None:
    """(dk, dv) by the Gluon kernel, given the dQ kernel's delta; None when the tensors cannot
    be described for TMA (the caller runs ``bwd.attn_bwd_dkdv``). ``lse`` and ``delta``
    contiguous. ``programs``: the grid (default: ``dkdv_programs``); each program runs the
    items ``plan.assign.assign_kv_items`` gives it."""
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    views = tma_views(plan, q, k, v, do, dk, dv)
    if views is None:
        return None
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    qt, half = plan.q_layout.tile, half_box(plan.kv_layout)
    descs = descriptors(plan, views, [qt, half, half, qt, half, half])
    t = plan.device_tensors(q.device)
    bd = padded_dim(d)
    items = plan.num_kv_tiles * b * h_kv
    programs = min(programs or dkdv_programs(q, items), items)
    starts, table = _kv_item_table(plan, b * h_kv, h // h_kv, programs, str(q.device))
    _dkdv_module(plan, pipelined).attn_bwd_dkdv_sm90[(programs,)](
        *descs, lse, delta, t["t_full_idx"], t["t_part_idx"], starts, table, scale,
        lse.stride(0), lse.stride(1),
        t["t_full_idx"].stride(0), t["t_part_idx"].stride(0), h_kv, h // h_kv,
        BLOCK_D=bd, SWIZZLE=swizzle_bytes(bd, q.element_size()),
        STAGES=stages or dkdv_launch_stages(plan, d, kv_buffers), KV_BUFS=kv_buffers,
        num_warps=4,
    )
    return dk, dv


def dkdv_programs(q: Tensor, items: int) -> int:
    """The dK/dV kernel's grid: one program per SM where one head's Q and dO fit in L2 (the
    forward's rule, ``sm90.persistent_for``, for the tensors this kernel re-reads), else one
    per item."""
    return num_sms(q.device) if persistent_call(q) else items


def kv_item_table(plan: TilePlan, heads: int, group: int, programs: int
                  ) -> tuple[Tensor, Tensor]:
    """(starts, table): ``assign_kv_items``' lists with each item written out as the kernel
    reads it, one int32 row of (batch x KV heads + KV head, KV tile, FULL count, total count)
    per list entry. The consumers then keep one pointer across items, not the schedule and
    both counts' (the dK/dV consumers are at their register limit)."""
    starts, items = assign_kv_items(plan, heads, group, programs)
    _, full_cnt, _, part_cnt = plan.transposed()
    w = items.long()
    tile = plan.t_schedule.long()[w % plan.num_kv_tiles]
    table = torch.stack([w // plan.num_kv_tiles, tile, full_cnt[tile].long(),
                         (full_cnt + part_cnt)[tile].long()], 1)
    return starts, table.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _kv_item_table(plan: TilePlan, heads: int, group: int, programs: int, device: str
                   ) -> tuple[Tensor, Tensor]:
    """``kv_item_table`` on ``device``, once per launch shape."""
    starts, table = kv_item_table(plan, heads, group, programs)
    return starts.to(device), table.to(device)
