"""The backward kernels: dQ per Q tile, then dK/dV per KV tile, each over a tile plan.

    dQ:     program (Q tile, batch, head): delta = rowsum(dO * O) for its rows (stored for the
            dK/dV kernel), then a loop over the plan's lists
    dK, dV: program (KV tile, batch, kv head), loops over the GQA group's heads and over the
            Q tiles that visit this KV tile (the plan's transposed lists), FULL then PARTIAL

delta used to be a torch expression before both kernels: (dO.float() * O.float()).sum(-1)
writes and reads three fp32 copies of a [B, H, S, D] tensor, 0.62 ms at S = 16k on the H100
(52-92% as long as the dQ kernel itself), where the dQ kernel gets it from one more tile load.
The kernels share nothing else: ``attn_bwd_dq`` and ``attn_bwd_dkdv`` run apart, on plans of
their own tiles if asked (``benchmarks/tune.py --bwd`` times them so; 64/64 stayed best).

Every output tile is owned by one program and accumulated in a fixed order: deterministic, no
atomics. P is recomputed from the saved LSE; rows with LSE -inf (no key) give P = 0.

Loop bodies are generated once per (kernel, masked) pair by ``_dkdv_body`` / ``_dq_body``: the
masked variant differs only by the pattern's mask and the padding guards.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..plan.tiles import TilePlan
from .cache import load_source
from .emit import layout_code
from .fwd import (
    KEY_BIAS_LOAD,
    OFFSETS,
    LaunchConfig,
    _indent,
    _to_2d,
    aux_tensor,
    check_tiles,
    fwd_loops,
    item_split,
    key_bias_arg,
    key_bias_lines,
    kv_source_lines,
    list_args,
    list_pointers,
    num_sms,
    padded_dim,
    step_mask,
    variant_name,
)

if TYPE_CHECKING:
    from ..plan.topk import BlockLists

_HEADER = '''
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
'''

_DKDV = '''

@triton.jit
def {name}(
    Q, K, V, DO, LSE, DELTA, DK, DV, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, AUX, GATHER, KBIAS,
    sm_scale, AUX_STRIDE, s_kbb,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos, s_lb, s_lh,
    s_dkb, s_dkh, s_dks, s_dvb, s_dvh, s_dvs,
    full_stride, part_stride, lst_full, lst_part, lst_cnt, BHK,
    H_KV: tl.constexpr, GROUP: tl.constexpr, LIST_GROUP: tl.constexpr, N_Q_TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
{order}
    it = kv_tile
    b = bhk // H_KV
    hk = bhk % H_KV
{offsets}
{k_layout}
    k_col = k_tok
    k_col_ok = k_ok
{k_2d}
    k = tl.load(K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh + k_col[:, None] * s_ks
                + offs_d[None, :], mask=k_col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh + k_col[:, None] * s_vs
                + offs_dv[None, :], mask=k_col_ok[:, None] & dv_ok[None, :], other=0.0)
{k_bias}
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = sm_scale * LOG2E
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b.to(tl.int64) * s_dob + h.to(tl.int64) * s_doh
        l_base = b.to(tl.int64) * s_lb + h.to(tl.int64) * s_lh
{loops}
    tl.store(DK + b.to(tl.int64) * s_dkb + hk.to(tl.int64) * s_dkh + {store_row}[:, None] * s_dks
             + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=k_col_ok[:, None] & d_ok[None, :])
    tl.store(DV + b.to(tl.int64) * s_dvb + hk.to(tl.int64) * s_dvh + {store_row}[:, None] * s_dvs
             + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=k_col_ok[:, None] & dv_ok[None, :])
'''

_DQ = '''

@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, AUX, GATHER, KBIAS,
    sm_scale, AUX_STRIDE, s_kbb,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos, s_lb, s_lh,
    s_ob, s_oh, s_os, s_dqb, s_dqh, s_dqs,
    full_stride, part_stride, lst_full, lst_part, lst_cnt, BH,
    H: tl.constexpr, GROUP: tl.constexpr, LIST_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
{order}
    b = bh // H
    h = bh % H
    hk = h // GROUP
{lists}
{offsets}
{q_layout}
    q_row = q_tok
    q_row_ok = q_ok
{q_2d}
    qpos = q_tok + {offset}
    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_tok * s_qs + offs_d[None, :],
                mask=q_ok & d_ok[None, :], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_dob + h.to(tl.int64) * s_doh + q_tok * s_dos
                 + offs_dv[None, :], mask=q_ok & dv_ok[None, :], other=0.0)
    o = tl.load(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + q_tok * s_os
                + offs_dv[None, :], mask=q_ok & dv_ok[None, :], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_base = b.to(tl.int64) * s_lb + h.to(tl.int64) * s_lh
    tl.store(DELTA + l_base + q_row, delta, mask=q_row_ok)
    lse = tl.load(LSE + l_base + q_row, mask=q_row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
{loops}
    tl.store(DQ + b.to(tl.int64) * s_dqb + h.to(tl.int64) * s_dqh + q_tok * s_dqs
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok & d_ok[None, :])
'''


def _dkdv_step(plan: TilePlan, source: str, masked: bool, bias: bool = False) -> list[str]:
    """One visiting Q tile (id ``tile``) of the dK/dV loop, in the transposed [N, M] orientation.

    ``source`` says where this program's KV tile came from, which decides its mask.
    """
    mask = step_mask(plan, source, masked)
    lines = layout_code(plan.q_layout, "q", "tile", "offs_m", "")
    lines += [
        "q_row = q_tok",
        "q_row_ok = q_ok",
        "q = tl.load(q_base + q_row[:, None] * s_qs + offs_d[None, :],"
        " mask=q_row_ok[:, None] & d_ok[None, :], other=0.0)",
        "do = tl.load(do_base + q_row[:, None] * s_dos + offs_dv[None, :],"
        " mask=q_row_ok[:, None] & dv_ok[None, :], other=0.0)",
        "lse = tl.load(LSE + l_base + q_row, mask=q_row_ok, other=float('inf'))",
        "lse = tl.where(lse == float('-inf'), float('inf'), lse) * LOG2E",
        "delta = tl.load(DELTA + l_base + q_row, mask=q_row_ok, other=0.0)",
        "qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)",
        *(["qkT = qkT + kb[:, None]"] if bias else []),
        "pT = tl.math.exp2(qkT * qk_scale - lse[None, :])",
    ]
    if mask is not None:
        lines += _to_2d("q", plan.q_layout.ndim, "[None, :]")
        lines += [f"qpos = q_tok + {plan.kv_len - plan.q_len}",
                  f"pT = tl.where(k_ok & q_ok & {mask}, pT, 0.0)"]
    lines += [
        "dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)",
        "dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)",
        "dsT = pT * (dpT - delta[None, :])",
        "dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)",
    ]
    return lines


def _dkdv_loops(plan: TilePlan, source: str, bias: bool) -> str:
    if source == "gather":  # gathered keys: every Q tile of this program's chunk, masked
        step = _dkdv_step(plan, source, True, bias)
        body = ["chunk = tl.program_id(1)",
                "n_chunks = tl.num_programs(1)",
                "for tile in range(chunk * N_Q_TILES // n_chunks,"
                " (chunk + 1) * N_Q_TILES // n_chunks):",
                *("    " + x for x in step)]
    else:
        body = [
            *list_pointers(plan, "H_KV * GROUP"),
            "for it2 in range(tl.load(l_fc + kv_tile)):",
            "    tile = tl.load(l_fi + kv_tile * full_stride + it2)",
            *("    " + x for x in _dkdv_step(plan, source, False, bias)),
            "for it2 in range(tl.load(l_pc + kv_tile)):",
            "    tile = tl.load(l_pi + kv_tile * part_stride + it2)",
            *("    " + x for x in _dkdv_step(plan, source, True, bias)),
        ]
    return _indent(body, 8)


def _dq_step(plan: TilePlan, source: str, masked: bool, bias: bool = False) -> list[str]:
    """One visited KV tile of the dQ loop."""
    mask = step_mask(plan, source, masked)
    guard = "k_ok[:, None] & " if mask is not None else ""
    lines = kv_source_lines(plan, source)
    lines += [
        f"k = tl.load(k_base + k_tok[:, None] * s_ks + offs_d[None, :],"
        f" mask={guard}d_ok[None, :], other=0.0)",
        f"v = tl.load(v_base + k_tok[:, None] * s_vs + offs_dv[None, :],"
        f" mask={guard}dv_ok[None, :], other=0.0)",
        "qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)",
        *(["k_col = k_tok", "k_col_ok = k_ok", *key_bias_lines("[None, :]")] if bias else []),
        "p = tl.math.exp2(qk * qk_scale - lse[:, None])",
    ]
    if mask is not None:
        lines += _to_2d("k", plan.kv_layout.ndim, "[None, :]")
        lines += [f"p = tl.where(k_ok & {mask}, p, 0.0)"]
    lines += [
        "dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)",
        "ds = p * (dp - delta[:, None])",
        "dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)",
    ]
    return lines


def _dkdv_source(plan: TilePlan, source: str, name: str, bias: bool, head_major: bool) -> str:
    # Gathered programs write their own buffer, row = (Q chunk, slot in the gather segment).
    store_row = "k_col"
    if source == "gather":
        assert plan.gather is not None
        rows = plan.gather.tokens.numel()
        store_row = f"(tl.program_id(1) * {rows} + kv_tile * BLOCK_N + offs_n)"
    num_tiles = plan.gather.num_tiles if source == "gather" else plan.num_kv_tiles
    return _DKDV.format(
        order=_indent(item_split("pid", "kv_tile", "bhk", "BHK", num_tiles, head_major), 4),
        offsets=OFFSETS,
        name=name,
        store_row=store_row,
        k_layout=_indent(kv_source_lines(plan, source), 4),
        k_2d=_indent(_to_2d("k", plan.kv_layout.ndim, "[:, None]"), 4),
        k_bias=_indent([KEY_BIAS_LOAD] if bias else [], 4),
        loops=_dkdv_loops(plan, source, bias),
    )


def dq_source(plan: TilePlan, bias: bool = False, head_major: bool = False) -> str:
    """The dQ kernel's source; ``bias`` adds the per-key bias (key padding) to every recomputed
    score, ``head_major`` numbers the programs head by head."""
    q_layout = layout_code(plan.q_layout, "q", "tile", "offs_m", "")
    return _HEADER + _DQ.format(
        order=_indent(item_split("pid", "tile", "bh", "BH", plan.num_q_tiles, head_major), 4),
        offsets=OFFSETS,
        lists=_indent(list_pointers(plan, "H"), 4),
        q_layout=_indent(q_layout, 4),
        q_2d=_indent(_to_2d("q", plan.q_layout.ndim, "[:, None]"), 4),
        offset=plan.kv_len - plan.q_len,
        loops=fwd_loops(plan, functools.partial(_dq_step, bias=bias)),
    )


def dkdv_source(plan: TilePlan, bias: bool = False, head_major: bool = False) -> str:
    """The dK/dV kernel's source, with the gathered keys' kernel where the plan has them."""
    out = _HEADER + _dkdv_source(plan, "tile", "attn_bwd_dkdv_kernel", bias, head_major)
    if plan.gather is not None:
        out += _dkdv_source(plan, "gather", "attn_bwd_dkdv_gather_kernel", bias, head_major)
    return out


def bwd_config(block_m: int, block_n: int) -> LaunchConfig:
    """From the H100 sweep (benchmarks/data/2026-11-23-h100-tune-bwd.json): five dots per
    step want 8 warps; 128x64 tiles pipeline 2 deep (blk16k bwd 2.93 ms vs 3.34 at 1 stage),
    128x128 boxes only 1 deep (na2d31 4.71 ms vs 5.96 at 2; 3 stages overflow shared memory).
    The default 64/64 tiles run at 4 warps, 2 stages; with each kernel timed apart
    (2026-11-23-s6-h100-tune-bwd.json) no other tile pair or config beat them by more than 2%.
    """
    if block_m >= 128 and block_n >= 128:
        return LaunchConfig(num_warps=8, num_stages=1)
    return LaunchConfig(num_warps=8 if max(block_m, block_n) >= 128 else 4, num_stages=2)


def gather_chunks(plan: TilePlan, bhk: int, sms: int) -> int:
    """Chunks of Q tiles the gathered keys' dK/dV programs split the sequence into.

    Every Q tile visits every gathered tile, so one program per gathered tile would loop over
    all of them: vert16k's 96 programs ran 256 steps each after the main kernel, on fewer
    programs than the H100 has SMs. Split into chunks until there are about four waves of two
    programs per SM, keeping at least two Q tiles per chunk; the fp32 buffer grows by the
    number of chunks (vert16k: 11 chunks, 69 MB for dK and dV).
    """
    assert plan.gather is not None
    programs = plan.gather.num_tiles * bhk
    return max(1, min(plan.num_q_tiles // 2, -(-8 * sms // programs)))


@functools.lru_cache(maxsize=256)
def _dq_module(plan: TilePlan, bias: bool = False, head_major: bool = False) -> Any:
    """Generated once per plan and variant (see fwd._fwd_module)."""
    return load_source(variant_name(plan, "bwd-dq", keybias=bias, headmajor=head_major),
                       dq_source(plan, bias, head_major))


@functools.lru_cache(maxsize=256)
def _dkdv_module(plan: TilePlan, bias: bool = False, head_major: bool = False) -> Any:
    return load_source(variant_name(plan, "bwd-dkdv", keybias=bias, headmajor=head_major),
                       dkdv_source(plan, bias, head_major))


def _common(q: Tensor, v: Tensor, plan: TilePlan) -> dict[str, Any]:
    """The constexpr arguments both backward kernels take."""
    d, dv = q.shape[3], v.shape[3]
    return dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=padded_dim(d), BLOCK_DV=padded_dim(dv),
                BLOCK_M=plan.q_layout.tile_size, BLOCK_N=plan.kv_layout.tile_size,
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _strides(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor) -> tuple[int, ...]:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1))


def attn_bwd_dq(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: TilePlan,
    scale: float, config: LaunchConfig | None = None, lists: BlockLists | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dq, delta): the dQ kernel, which also writes delta = rowsum(dO * O) (fp32, shaped as
    ``lse``) for the dK/dV kernel. Inputs contiguous in the last dim, ``lse`` contiguous."""
    check_tiles(plan)
    b, h = q.shape[:2]
    cfg = config or bwd_config(plan.q_layout.tile_size, plan.kv_layout.tile_size)
    module = _dq_module(plan, key_bias is not None, cfg.head_major)
    t = plan.device_tensors(q.device)
    aux, aux_stride = aux_tensor(plan, str(q.device))
    kbias, s_kbb = key_bias_arg(key_bias, b, k.shape[2], scale, q.device)
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    tensors, strides, group = list_args(plan, t, lists, transposed=False)
    module.attn_bwd_dq_kernel[(plan.num_q_tiles * b * h,)](
        q, k, v, out, do, lse, delta, dq, *tensors, aux, t.get("gather", t["full_cnt"]), kbias,
        scale, aux_stride, s_kbb, *_strides(q, k, v, do, lse),
        out.stride(0), out.stride(1), out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        *strides, b * h,
        H=h, GROUP=h // k.shape[1], LIST_GROUP=group,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_common(q, v, plan),
    )
    return dq, delta


def attn_bwd_dkdv(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, plan: TilePlan,
    scale: float, config: LaunchConfig | None = None, lists_t: BlockLists | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dk, dv): the dK/dV kernel (and the gathered keys' one), given ``attn_bwd_dq``'s delta."""
    check_tiles(plan)
    b, h, _, d = q.shape
    h_kv, dv_dim = k.shape[1], v.shape[3]
    cfg = config or bwd_config(plan.q_layout.tile_size, plan.kv_layout.tile_size)
    module = _dkdv_module(plan, key_bias is not None, cfg.head_major)
    t = plan.device_tensors(q.device)
    aux, aux_stride = aux_tensor(plan, str(q.device))
    kbias, s_kbb = key_bias_arg(key_bias, b, k.shape[2], scale, q.device)
    gather = t.get("gather", t["full_cnt"])
    tensors, strides, group = list_args(plan, t, lists_t, transposed=True)
    launch = dict(H_KV=h_kv, GROUP=h // h_kv, N_Q_TILES=plan.num_q_tiles,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_common(q, v, plan))
    front = (scale, aux_stride, s_kbb, *_strides(q, k, v, do, lse))
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    module.attn_bwd_dkdv_kernel[(plan.num_kv_tiles * b * h_kv,)](
        q, k, v, do, lse, delta, dk, dv, *tensors, aux, gather, kbias, *front,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *strides, b * h_kv, LIST_GROUP=group, **launch,
    )
    if plan.gather is not None:
        # Gathered keys also appear in the regular tiles. Their programs, one per (gathered tile,
        # chunk of Q tiles), write an fp32 buffer by (chunk, gather slot); the chunks are summed
        # in a fixed order and added into dK/dV at the key positions (unique: deterministic).
        n_slots = plan.gather.tokens.numel()
        chunks = gather_chunks(plan, b * h_kv, num_sms(q.device))
        dk_g = torch.zeros(b, h_kv, chunks * n_slots, d, dtype=torch.float32, device=k.device)
        dv_g = torch.zeros(b, h_kv, chunks * n_slots, dv_dim, dtype=torch.float32,
                           device=v.device)
        module.attn_bwd_dkdv_gather_kernel[(plan.gather.num_tiles * b * h_kv, chunks)](
            q, k, v, do, lse, delta, dk_g, dv_g, *tensors, aux, gather, kbias, *front,
            dk_g.stride(0), dk_g.stride(1), dk_g.stride(2),
            dv_g.stride(0), dv_g.stride(1), dv_g.stride(2),
            0, 0, 0, 0, 0, b * h_kv, LIST_GROUP=1, **launch,
        )
        dk_g = dk_g.view(b, h_kv, chunks, n_slots, d).sum(2)
        dv_g = dv_g.view(b, h_kv, chunks, n_slots, dv_dim).sum(2)
        slots = (plan.gather.tokens >= 0).nonzero().squeeze(1).to(k.device)
        keys = gather.long()[slots]
        dk.index_copy_(2, keys, (dk.index_select(2, keys).float()
                                 + dk_g.index_select(2, slots)).to(dk.dtype))
        dv.index_copy_(2, keys, (dv.index_select(2, keys).float()
                                 + dv_g.index_select(2, slots)).to(dv.dtype))
    return dk, dv


def prepare(q: Tensor, k: Tensor, v: Tensor, do: Tensor, out: Tensor, lse: Tensor,
            scale: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """The backward kernels' inputs: last dims contiguous, ``lse`` contiguous, the scale."""
    q, k, v, do, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do, out))
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return q, k, v, do, out, lse.contiguous(), scale


def attn_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: TilePlan,
    scale: float | None = None, config: LaunchConfig | None = None,
    lists: BlockLists | None = None, lists_t: BlockLists | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attn_fwd's output; shapes and dtypes as q, k, v.

    ``lists`` / ``lists_t``: a data-dependent plan's run-time lists, per query tile and per key
    tile (``plan.topk.block_lists(..., transposed=True)``). ``key_bias``: the forward's.
    """
    q, k, v, do, out, lse, scale = prepare(q, k, v, do, out, lse, scale)
    dq, delta = attn_bwd_dq(do, q, k, v, out, lse, plan, scale, config, lists, key_bias)
    dk, dv = attn_bwd_dkdv(do, q, k, v, lse, delta, plan, scale, config, lists_t, key_bias)
    return dq, dk, dv
