"""The warp-specialized Hopper forward (``codegen.sm90``): which calls it takes, that it lowers
for sm_90 on any machine, and on a Hopper GPU that it matches the float64 reference.

The GPU cases use 128-token Q tiles (the kernel's only Q tile) on sizes that are no multiple of
the tiles: 1-D sliding (causal, decode-shaped with Sq < Skv), blocked, 2-D and 3-D
neighborhoods on odd grids (strided, causal), GQA, head dims 32 to 128, fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch
from sm90_cases import CASES, HOPPER, gluon_builds, random_inputs, strided_inputs

import spcompile as sp
from spcompile.codegen import launch
from spcompile.codegen.fwd import descriptor_box, padded_dim, tma_views
from spcompile.codegen.sm90 import (
    attn_fwd_sm90,
    descriptors,
    forward_plan,
    half_box,
    half_coords,
    own_output_buffer,
    persistent_for,
    sm90_eligible,
    sm90_source,
    stages_for,
    swizzle_bytes,
)
from spcompile.plan.tiles import build_plan


def test_half_boxes_split_the_first_long_axis() -> None:
    """Each consumer stores the first or second 64 rows of the Q tile: half of its first axis
    longer than 1 (a box's tokens are its rows in row-major order)."""
    one = build_plan(sp.Sliding(left=9, right=9), 4096, 4096).q_layout
    assert half_box(one) == (64,)
    assert half_coords(one, "HALF") == "[b, h, tile * 128 + HALF * 64, 0]"
    nd = build_plan(sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24), stride=(16, 8, 8)),
                    115200, 115200).q_layout
    assert nd.tile == (2, 8, 8) and half_box(nd) == (1, 8, 8)
    assert "% 15) * 2 + half * 1," in half_coords(nd, "half")


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 40)])
def test_descriptors(dtype: torch.dtype, head_dim: int) -> None:
    """One TMA descriptor per view: the view's shape and strides, one tile's box, and the
    NVMMA swizzle of the kernels' shared buffers (the same layout on every call)."""
    from triton.experimental.gluon import language as gl

    plan = build_plan(sp.Neighborhood(shape=(17, 23), window=7), 391, 391, specialized=True)
    q = torch.empty(2, 3, 391, head_dim, dtype=dtype)
    views = tma_views(plan, q, q, q, q)
    assert views is not None
    tiles = [half_box(plan.q_layout), plan.kv_layout.tile, plan.kv_layout.tile,
             half_box(plan.q_layout)]
    bd = padded_dim(head_dim)
    for _ in range(2):
        for desc, x, tile in zip(descriptors(plan, views, tiles), views, tiles, strict=True):
            box = descriptor_box(plan, tile, bd)
            assert list(desc.shape) == list(x.shape) and list(desc.strides) == list(x.stride())
            assert list(desc.block_shape) == box
            assert desc.layout == gl.NVMMASharedLayout(
                swizzle_byte_width=swizzle_bytes(bd, 2), element_bitwidth=16, rank=len(box))


def test_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel takes: static plans without gathered keys or block matrices, 16-bit
    inputs, head dims up to 128, no key bias; everything else stays on the Triton kernel."""
    q = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    plan = build_plan(sp.Sliding(left=100, right=100), 4096, 4096)
    assert sm90_eligible(plan, q, q, None)
    assert not sm90_eligible(plan, q.float(), q.float(), None)
    assert not sm90_eligible(plan, q, q, torch.zeros(1, 4096))
    wide = torch.empty(1, 2, 4096, 192, dtype=torch.bfloat16)
    assert not sm90_eligible(plan, wide, wide, None)
    gathered = build_plan(sp.Sliding(left=64, right=64) | sp.Global(every=64), 4096, 4096)
    assert gathered.gather is not None and not sm90_eligible(gathered, q, q, None)
    assert not sm90_eligible(build_plan(sp.Sliding(left=9, right=9), 4096, 4096, 64, 64), q, q,
                             None)
    strided = build_plan(sp.Strided(stride=512, variant="fixed", summary=64), 4096, 4096)
    assert strided.full_box is None and not sm90_eligible(strided, q, q, None)
    # Off CUDA (and with SPCOMPILE_SM90=0 anywhere) the Triton kernel runs.
    assert launch.forward_kernel(plan, q, q) == "triton"
    monkeypatch.setenv("SPCOMPILE_SM90", "0")
    assert launch.forward_kernel(plan, q, q) == "triton"


def test_forward_plan_is_the_kernel_s() -> None:
    """Where the Gluon forward takes a call, its plan has that kernel's default tiles (1-D:
    128-token KV tiles); a plan it would not take (gathered keys, fp32) is built on the Triton
    kernel's tiles (1-D: 64); explicit tiles are kept. Off CUDA every call is the Triton
    kernel's."""
    def builder(pattern: sp.Pattern, tiles: tuple[int, ...] | None = None):
        return lambda specialized: build_plan(pattern, 4096, 4096, tiles, tiles,
                                              specialized=specialized)

    sliding = sp.Sliding(left=100, right=100)
    assert forward_plan(builder(sliding), torch.bfloat16, 128, 128).kv_tile == (128,)
    assert forward_plan(builder(sliding), torch.float32, 128, 128).kv_tile == (64,)
    assert forward_plan(builder(sliding), torch.bfloat16, 128, 128, True).kv_tile == (64,)
    assert forward_plan(builder(sliding, (128,)), torch.float16, 64, 64).kv_tile == (128,)
    gathered = sp.Sliding(left=64, right=64) | sp.Global(every=64)
    plan = forward_plan(builder(gathered), torch.bfloat16, 128, 128)
    assert plan.gather is not None and plan.kv_tile == (64,)
    q = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    assert launch.forward_plan(builder(sliding), q, q).kv_tile == (64,)


def test_persistent_where_one_heads_kv_fits_in_l2() -> None:
    """The suite's video rows at 115200 tokens (59 MB of K and V per head) launch a program
    per item on the H100 (50 MiB of L2); every other row, persistent."""
    l2 = 50 * 2**20
    assert persistent_for(16384, 128, 2, l2) and persistent_for(65536, 128, 2, l2)
    assert not persistent_for(115200, 128, 2, l2)
    assert persistent_for(115200, 64, 2, l2) and not persistent_for(65536, 128, 4, l2)
    assert not persistent_for(115200, 120, 2, l2)  # head dims pad to the kernel's 128


def test_output_buffer_follows_the_plan() -> None:
    """A plan whose K buffer cannot hold a Q tile's output stages it in a buffer of its own,
    and its ring depth counts that buffer."""
    one_d = build_plan(sp.Sliding(left=100, right=100), 4096, 4096, specialized=True)
    small_kv = build_plan(sp.Sliding(left=100, right=100), 4096, 4096, (128,), (64,))
    assert own_output_buffer(small_kv) and not own_output_buffer(one_d)
    assert "o_smem = gl.allocate_shared_memory" in sm90_source(small_kv)
    assert "o_smem = k_smem" in sm90_source(one_d)
    assert stages_for(small_kv, 128, 2) == 4 and stages_for(one_d, 128, 2) == 3


def test_lowers_for_sm90() -> None:
    """The generated Gluon kernel of a 1-D, a 2-D and a 3-D plan compiles for Hopper on any
    machine (Triton's bundled ptxas): one producer and two consumers with their register
    budgets, TMA copies, warpgroup MMAs, and at most 227 KiB of shared memory."""
    for built in gluon_builds("--gluon"):
        assert built["tma_ops"] > 0 and built["wgmma"] > 0 and built["setmaxnreg"] > 0, built
        assert built["shared"] <= 227 * 1024, built
        assert built["stages"] >= 3, built


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype) -> None:
    """On the plan ``sparse_attention`` builds for the kernel (1-D: 128-token KV tiles) and,
    where it differs, the Triton kernel's default plan (1-D: 64-token KV tiles); launched as
    by default (at these sizes one program per SM: ``persistent_for``), with 7 programs and
    with one per item, each running the items ``plan.assign.assign_items`` gives it (7: the
    ring and Q's buffer carried across many items)."""
    pattern, q, k, v = random_inputs(CASES[case], dtype)
    ref, ref_lse = sp.reference_attention(q.double(), k.double(), v.double(), pattern,
                                          return_lse=True)
    empty = torch.isinf(ref_lse)
    plans = {(p.q_tile, p.kv_tile): p for p in
             (build_plan(pattern, q.shape[2], k.shape[2], head_dim=q.shape[3], specialized=s)
              for s in (True, False))}
    for plan in plans.values():
        assert launch.forward_kernel(plan, q, v) == "sm90", "the case must run the Gluon kernel"
        for programs in (None, 7, plan.num_q_tiles * q.shape[0] * q.shape[1]):
            result = attn_fwd_sm90(q, k, v, plan, q.shape[-1] ** -0.5, programs=programs)
            assert result is not None
            out, lse = result
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < (8e-3 if dtype == torch.bfloat16 else 1e-3), \
                f"{plan.kv_tile}, {programs} programs: {err:.2e}"
            assert torch.equal(torch.isinf(lse), empty) and (out[empty] == 0).all()
            torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-3,
                                       rtol=1e-3)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_gradients_through_the_gluon_forward() -> None:
    """sparse_attention's backward reads the Gluon forward's output and LSE."""
    pattern, q, k, v = random_inputs(CASES["na3d-odd"], torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    plan = build_plan(pattern, q.shape[2], k.shape[2])
    assert launch.forward_kernel(plan, q, v) == "sm90"
    do = torch.randn_like(q)
    sp.sparse_attention(q, k, v, pattern).backward(do)
    grads = [x.grad.double() for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    sp.reference_attention(*ref, pattern).backward(do.double())
    for got, want in zip(grads, (x.grad for x in ref), strict=True):
        assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_non_contiguous_inputs() -> None:
    """q, k, v as [B, S, H, D] tensors seen as [B, H, S, D] (what a model's projections give):
    TMA reads them through their strides, no copy."""
    pattern, sq, skv, _, _, d = CASES["sliding-odd-gqa"]
    q, k, v = strided_inputs(CASES["sliding-odd-gqa"], 3)
    assert not q.is_contiguous()
    plan = build_plan(pattern, sq, skv, head_dim=d, specialized=True)
    result = attn_fwd_sm90(q, k, v, plan, d ** -0.5)
    assert result is not None, "a 1-D plan addresses the strided view directly"
    ref = sp.reference_attention(q.double(), k.double(), v.double(), pattern)
    assert float((result[0].double() - ref).norm() / ref.norm()) < 8e-3
