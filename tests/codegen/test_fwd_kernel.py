"""The generated forward kernel against the float64 reference, on awkward sizes.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set in conftest.py), so the sizes
stay small; on a GPU the same cases run natively with bf16 too.
"""

from __future__ import annotations

import pytest
import torch

import spcompile as sp
from spcompile.codegen.fwd import attn_fwd
from spcompile.plan.tiles import build_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

CASES = {
    "sliding-causal": (sp.Sliding(window=9, causal=True), 50, 50, (16,), (16,)),
    "sliding-decode": (sp.Sliding(left=5, right=3), 40, 70, (16,), (16,)),
    "na2d-17x23": (sp.Neighborhood(shape=(17, 23), window=(5, 7)), 391, 391, (4, 8), (8, 4)),
    "gna3d-causal": (sp.Neighborhood(shape=(3, 7, 5), window=(2, 3, 5), stride=(1, 2, 1),
                                     causal=(True, False, False)), 105, 105, (2, 2, 4), (2, 4, 2)),
    "na2d-dilated": (sp.Neighborhood(shape=(9, 10), window=3, dilation=(2, 3)), 90, 90,
                     (4, 4), (2, 8)),
    "blocked": (sp.Blocked(block=10), 45, 45, (16,), (16,)),
    "sliding+stripes": (sp.Sliding(left=4, right=4) | sp.Global(every=8), 50, 50, (16,), (16,)),
    "strided": (sp.Strided(local=4, stride=5), 33, 33, (16,), (16,)),
    "bigbird": (sp.BlockLayout(kind="bigbird", block=8, random=1), 48, 48, (16,), (16,)),
    "empty-rows": (sp.Global(indices=[20], causal=True), 40, 40, (16,), (16,)),
    # No PARTIAL tile at all: the kernels are generated without the PARTIAL loop.
    "blocked-aligned": (sp.Blocked(block=32), 96, 96, (16,), (16,)),
    "gna2d-aligned": (sp.Neighborhood(shape=(8, 12), window=4, stride=4), 96, 96, (4, 4),
                      (4, 4)),
}


def test_partial_loop_only_where_the_plan_has_partial_tiles() -> None:
    from spcompile.codegen.fwd import fwd_source

    for case, has_partial in (("blocked-aligned", False), ("gna2d-aligned", False),
                              ("blocked", True), ("na2d-17x23", True)):
        pattern, sq, skv, q_tile, kv_tile = CASES[case]
        plan = build_plan(pattern, sq, skv, q_tile, kv_tile)
        assert (plan.num_partial > 0) == has_partial, case
        assert ("n_part" in fwd_source(plan)) == has_partial, case
    topk = build_plan(sp.TopK(block=16, k=1), 64, 64)  # run-time lists: always both loops
    assert "n_part" in fwd_source(topk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_fwd_matches_reference(case: str, dtype: torch.dtype) -> None:
    pattern, sq, skv, q_tile, kv_tile = CASES[case]
    plan = build_plan(pattern, sq, skv, q_tile, kv_tile)
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(2, 4, sq, 32, generator=gen).to(DEVICE, dtype)
    k = torch.randn(2, 2, skv, 32, generator=gen).to(DEVICE, dtype)
    v = torch.randn(2, 2, skv, 24, generator=gen).to(DEVICE, dtype)
    out, lse = attn_fwd(q, k, v, plan)
    ref, ref_lse = sp.reference_attention(q.double(), k.double(), v.double(), pattern,
                                          return_lse=True)
    assert not out.isnan().any(), "NaN in output"
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
    worst = (out.double() - ref).abs().flatten().argmax()
    assert err < TOL[dtype], f"rel err {err:.2e}; worst element at flat index {int(worst)}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must give LSE -inf"
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=1e-3, rtol=1e-3)
    assert (out[empty] == 0).all(), "rows without keys must give 0"
