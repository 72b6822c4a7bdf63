"""The warp-specialized Hopper backward (``codegen.sm90_bwd``): its tiles and scope, that both
kernels lower for sm_90 on any machine, and on a Hopper GPU that dQ (with delta) and dK/dV match
the float64 reference's gradients, deterministically, also through ``sparse_attention``.

The GPU cases run the kernels' own tiles on sizes that are no multiple of them: 1-D
sliding (causal, decode-shaped with Sq < Skv), blocked, 2-D and 3-D neighborhoods on odd grids
(strided, causal), GQA down to one KV head, head dims 32 to 128, fp16 and bf16.
"""

from __future__ import annotations

import pytest
import sm90_cases
import torch
from sm90_cases import HOPPER, gluon_builds, random_inputs, strided_inputs

import spcompile as sp
from spcompile.codegen import launch
from spcompile.codegen.bwd import attn_bwd_dkdv, attn_bwd_dq
from spcompile.codegen.fwd import attn_fwd
from spcompile.codegen.sm90_bwd import (
    attn_bwd_dkdv_sm90,
    attn_bwd_dq_sm90,
    dkdv_in_scope,
    dkdv_tiles,
    dq_in_scope,
    dq_tiles,
    kv_item_table,
)
from spcompile.plan.assign import assign_kv_items
from spcompile.plan.choose import backward_tiles
from spcompile.plan.tiles import build_plan

# The shared cases, with more query heads per KV head on two (dK/dV loops over the group).
CASES = {**sm90_cases.CASES,
         "sliding-causal": (sp.Sliding(window=700, causal=True), 2100, 2100, 4, 1, 64),
         "na3d-causal": (sp.Neighborhood(shape=(6, 16, 16), window=(3, 5, 5),
                                         causal=(True, False, False)), 1536, 1536, 4, 2, 96)}


# Cases whose Gluon plans do at most launch.GLUON_BWD_MAX_WORK times the Triton plan's work,
# so that sparse_attention's backward takes both Gluon kernels.
CHOSEN = {
    "blocked": CASES["blocked"],
    "sliding-long-causal": (sp.Sliding(window=2048, causal=True), 6000, 6000, 2, 1, 128),
}


def test_tiles_and_scope() -> None:
    """dQ: 128-token Q tiles over 64-token KV tiles; dK/dV: 64 over 128 (boxes on a grid).
    Both: fp16/bf16 with equal head dims up to 128, static patterns without gathered keys or a
    block matrix, no key bias; dQ also needs FULL tiles that form boxes."""
    sliding = sp.Sliding(left=300, right=200)
    assert dq_tiles(sliding, 1000, 1000) == ((128,), (64,))
    assert dkdv_tiles(sliding, 1000, 1000) == ((64,), (128,))
    na = sp.Neighborhood(shape=(17, 23), window=7)
    for (qt, kt), tokens in ((dq_tiles(na, 391, 391), (128, 64)),
                             (dkdv_tiles(na, 391, 391), (64, 128))):
        assert (len(qt), len(kt)) == (2, 2)
        assert (qt[0] * qt[1], kt[0] * kt[1]) == tokens
    for tiles, in_scope in ((dq_tiles, dq_in_scope), (dkdv_tiles, dkdv_in_scope)):
        plan = build_plan(sliding, 1000, 1000, *tiles(sliding, 1000, 1000))
        assert in_scope(plan, torch.bfloat16, 128, 128) and in_scope(plan, torch.float16, 64, 64)
        assert not in_scope(plan, torch.float32, 128, 128)
        assert not in_scope(plan, torch.bfloat16, 256, 256)
        assert not in_scope(plan, torch.bfloat16, 128, 64)
        assert not in_scope(plan, torch.bfloat16, 128, 128, key_bias=True)
        vertical = sp.Sliding(left=512, right=512) | sp.Global(every=64)
        gathered = build_plan(vertical, 4096, 4096, *tiles(vertical, 4096, 4096))
        assert gathered.gather is not None
        assert not in_scope(gathered, torch.bfloat16, 128, 128)
    default = build_plan(sliding, 1000, 1000)  # 128/64: the dQ kernel's, not dK/dV's
    assert dq_in_scope(default, torch.bfloat16, 128, 128)
    assert not dkdv_in_scope(default, torch.bfloat16, 128, 128)


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gluon kernel runs where it is in scope and its plan does at most GLUON_BWD_MAX_WORK
    times the Triton plan's work: blocked (1.02x) takes both, a small 2-D neighborhood (1.22x)
    neither; without Hopper, or with SPCOMPILE_SM90=0, neither."""
    monkeypatch.setattr(launch, "gluon_enabled", lambda q: True)
    monkeypatch.setattr(launch, "GLUON_DQ", True)
    q = torch.empty(1, 2, 3000, 128, dtype=torch.bfloat16)
    for case, want in (("blocked", "sm90"), ("na2d-17x23", "triton")):
        pattern, sq, skv = CASES[case][:3]
        plans = [build_plan(pattern, sq, skv, *tiles(pattern, sq, skv))
                 for tiles in (backward_tiles, dq_tiles, dkdv_tiles)]
        assert launch.backward_kernels(q, q, None, *plans) == (want, want), case
        assert launch.backward_kernels(q.float(), q.float(), None, *plans) == ("triton",) * 2
    monkeypatch.undo()
    pattern, sq, skv = CASES["blocked"][:3]
    plans = [build_plan(pattern, sq, skv, *tiles(pattern, sq, skv))
             for tiles in (backward_tiles, dq_tiles, dkdv_tiles)]
    assert launch.backward_kernels(q, q, None, *plans) == ("triton", "triton")  # a CPU tensor


def test_kv_item_table() -> None:
    """Each entry of the dK/dV kernel's program lists, written out as the kernel reads it:
    (batch x KV heads + KV head, KV tile, FULL count, total count) of the item that
    ``assign_kv_items`` put there; KV tiles no query visits included (a decode shape)."""
    pattern, sq, skv = CASES["sliding-decode"][:3]
    plan = build_plan(pattern, sq, skv, *dkdv_tiles(pattern, sq, skv))
    heads, group, programs = 4, 2, 3
    starts, table = kv_item_table(plan, heads, group, programs)
    want_starts, items = assign_kv_items(plan, heads, group, programs)
    assert torch.equal(starts, want_starts) and table.dtype == torch.int32
    _, full_cnt, _, part_cnt = plan.transposed()
    assert int((full_cnt + part_cnt == 0).sum()) > 0
    nt = plan.num_kv_tiles
    for (bhk, tile, n_full, n), w in zip(table.tolist(), items.tolist(), strict=True):
        assert (bhk, tile) == (w // nt, int(plan.t_schedule[w % nt]))
        assert (n_full, n) == (int(full_cnt[tile]), int(full_cnt[tile] + part_cnt[tile]))


def test_lowers_for_sm90() -> None:
    """Both generated kernels of a 1-D, a 2-D and a 3-D plan compile for Hopper on any
    machine: a producer and two consumers with their register budgets, TMA copies and stores,
    warpgroup MMAs, at most 227 KiB of shared memory and a ring at least two deep. So do their
    pipelined loops (``benchmarks/tune.py``'s variants), on the 1-D plans."""
    builds = gluon_builds("--gluon-bwd")
    assert sorted((b["kernel"], b["pipelined"]) for b in builds) == [
        ("dkdv", False)] * 3 + [("dkdv", True)] + [("dq", False)] * 3 + [("dq", True)]
    for built in builds:
        assert built["tma_ops"] > 0 and built["wgmma"] > 0 and built["setmaxnreg"] > 0, built
        assert built["shared"] <= 227 * 1024, built
        assert built["stages"] >= 2, built


def _reference_grads(pattern, q, k, v, do):
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    sp.reference_attention(*ref, pattern).backward(do.double())
    return [x.grad for x in ref]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype) -> None:
    """dQ, delta, dK and dV against float64 and the Triton kernels, and equal bit for bit on a
    second run (no atomics). dK/dV also bit for bit on 3 and 7 programs, each running several
    items (KV tiles) through both K/V buffers or one, some that no Q tile visits
    (sliding-decode)."""
    pattern, q, k, v, do = random_inputs(CASES[case], dtype, with_do=True)
    sq, skv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    out, lse = attn_fwd(q, k, v, build_plan(pattern, sq, skv), scale)
    dq_plan = build_plan(pattern, sq, skv, *dq_tiles(pattern, sq, skv))
    dkdv_plan = build_plan(pattern, sq, skv, *dkdv_tiles(pattern, sq, skv))
    assert launch.gluon_enabled(q), "the cases run the Gluon kernels"
    dq, delta = attn_bwd_dq_sm90(do, q, k, v, out, lse, dq_plan, scale) or (None, None)
    dk, dv = attn_bwd_dkdv_sm90(do, q, k, v, lse, delta, dkdv_plan, scale) or (None, None)
    assert dq is not None and dk is not None
    ref_dq, ref_dk, ref_dv = _reference_grads(pattern, q, k, v, do)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, got, want in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert _rel(got, want) < tol, f"{name}: rel err {_rel(got, want):.2e}"
    torch.testing.assert_close(delta, (do.float() * out.float()).sum(-1), atol=1e-3, rtol=1e-3)
    dq2, delta2 = attn_bwd_dq_sm90(do, q, k, v, out, lse, dq_plan, scale) or (None, None)
    dk2, dv2 = attn_bwd_dkdv_sm90(do, q, k, v, lse, delta, dkdv_plan, scale) or (None, None)
    for a, b in ((dq, dq2), (delta, delta2), (dk, dk2), (dv, dv2)):
        assert b is not None and torch.equal(a, b)
    for programs, kv_buffers in ((3, 2), (7, 2), (3, 1)):
        got = attn_bwd_dkdv_sm90(do, q, k, v, lse, delta, dkdv_plan, scale, programs=programs,
                                 kv_buffers=kv_buffers)
        assert got is not None
        assert torch.equal(got[0], dk) and torch.equal(got[1], dv), (programs, kv_buffers)
    triton_dq, _ = attn_bwd_dq(do, q, k, v, out, lse, dq_plan, scale)
    triton_dk, triton_dv = attn_bwd_dkdv(do, q, k, v, lse, delta, dkdv_plan, scale)
    for got, want in ((dq, triton_dq), (dk, triton_dk), (dv, triton_dv)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", list(CHOSEN))
def test_gradients_through_sparse_attention(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sparse_attention's backward takes the Gluon kernels (dQ where ``GLUON_DQ`` is on), and
    its gradients hold."""
    from spcompile.codegen import sm90_bwd

    calls: list[str] = []
    for name in ("attn_bwd_dq_sm90", "attn_bwd_dkdv_sm90"):
        kernel = getattr(sm90_bwd, name)
        monkeypatch.setattr(sm90_bwd, name, lambda *a, _k=kernel, _n=name, **kw:
                            calls.append(_n) or _k(*a, **kw))
    pattern, q, k, v, do = random_inputs(CHOSEN[case], torch.bfloat16, with_do=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    sp.sparse_attention(q, k, v, pattern).backward(do)
    want = ["attn_bwd_dkdv_sm90", "attn_bwd_dq_sm90"] if launch.GLUON_DQ else ["attn_bwd_dkdv_sm90"]
    assert sorted(calls) == want, calls
    for got, want in zip((q.grad, k.grad, v.grad), _reference_grads(pattern, q, k, v, do),
                         strict=True):
        assert _rel(got, want) < 2e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_non_contiguous_inputs() -> None:
    """q, k, v, dO as [B, S, H, D] tensors seen as [B, H, S, D]: both kernels read them through
    their strides (1-D plans), and the gradients hold."""
    pattern, sq, skv, _, _, d = CASES["sliding-odd-gqa"]
    q, k, v, do = strided_inputs(CASES["sliding-odd-gqa"], 4)
    assert not q.is_contiguous()
    scale = d ** -0.5
    out, lse = attn_fwd(q, k, v, build_plan(pattern, sq, skv), scale)
    dq, delta = attn_bwd_dq_sm90(do, q, k, v, out, lse,
                                 build_plan(pattern, sq, skv, *dq_tiles(pattern, sq, skv)),
                                 scale) or (None, None)
    assert dq is not None
    dkdv = attn_bwd_dkdv_sm90(do, q, k, v, lse, delta,
                              build_plan(pattern, sq, skv, *dkdv_tiles(pattern, sq, skv)), scale)
    assert dkdv is not None
    for got, want in zip((dq, *dkdv), _reference_grads(pattern, q, k, v, do), strict=True):
        assert _rel(got, want) < 2e-2
