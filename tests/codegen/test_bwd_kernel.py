"""The two backward kernels apart: delta comes from the dQ kernel, and each kernel may run on
tiles of its own (``benchmarks/tune.py --bwd`` times them so)."""

from __future__ import annotations

import pytest
import torch
from test_attention import CASES

import spcompile as sp
from spcompile.codegen.bwd import attn_bwd_dkdv, attn_bwd_dq
from spcompile.codegen.fwd import attn_fwd
from spcompile.plan.tiles import build_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (case, dK/dV tiles, dQ tiles): each kernel's own tile long, its loop's tile short.
SPLITS = [
    ("sliding-decode", ((16,), (32,)), ((32,), (16,))),
    ("stripes-gathered", ((16,), (32,)), ((32,), (16,))),
    ("na3d-causal-dil", ((2, 2, 4), (2, 4, 4)), ((2, 4, 4), (2, 2, 4))),
]


def _inputs(sq: int, skv: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return make(2, 4, sq, 16), make(2, 2, skv, 16), make(2, 2, skv, 16), make(2, 4, sq, 16)


@pytest.mark.parametrize(("case", "dkdv_tiles", "dq_tiles"), SPLITS)
def test_dq_on_its_own_tiles_matches_reference(case, dkdv_tiles, dq_tiles) -> None:
    pattern, sq, skv, _, _ = CASES[case]
    q, k, v, do = _inputs(sq, skv, seed=len(case))
    plan = build_plan(pattern, sq, skv, *dkdv_tiles)
    dq_plan = build_plan(pattern, sq, skv, *dq_tiles)
    assert (plan.num_q_tiles, plan.num_kv_tiles) != (dq_plan.num_q_tiles, dq_plan.num_kv_tiles)
    x32 = [x.float().to(DEVICE) for x in (q, k, v, do)]
    out, lse = attn_fwd(*x32[:3], plan)
    dq, delta = attn_bwd_dq(x32[3], *x32[:3], out, lse, dq_plan, scale=0.25)
    grads = (dq, *attn_bwd_dkdv(x32[3], *x32[:3], lse, delta, plan, scale=0.25))
    qd, kd, vd = (x.requires_grad_() for x in (q, k, v))
    ref = sp.reference_attention(qd, kd, vd, pattern)
    want = torch.autograd.grad(ref, (qd, kd, vd), do)
    for name, got, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        err = float((got.cpu().double() - w).norm() / w.norm())
        assert err < 1e-4, f"{name}: error {err:.2e}"


def test_dq_kernel_writes_delta() -> None:
    """delta = rowsum(dO * O) for every query row, padding rows of the last tile included."""
    pattern, sq, skv, qt, kt = CASES["sliding-decode"]
    q, k, v, do = (x.float().to(DEVICE) for x in _inputs(sq, skv, seed=3))
    plan = build_plan(pattern, sq, skv, qt, kt)
    out, lse = attn_fwd(q, k, v, plan)
    _, delta = attn_bwd_dq(do, q, k, v, out, lse, plan, scale=0.25)
    torch.testing.assert_close(delta, (do * out).sum(-1), rtol=1e-5, atol=1e-5)


def test_gathered_keys_split_into_chunks() -> None:
    """stripes-gathered's gathered dK/dV programs split its 7 Q tiles into 3 chunks (their
    gradients are checked against the reference by test_dq_on_its_own_tiles_matches_reference
    and tests/test_attention.py)."""
    from spcompile.codegen.bwd import gather_chunks

    pattern, sq, skv, qt, kt = CASES["stripes-gathered"]
    plan = build_plan(pattern, sq, skv, qt, kt)
    assert plan.num_q_tiles == 7 and gather_chunks(plan, bhk=4, sms=4) == 3
    assert gather_chunks(plan, bhk=4, sms=1) == 2  # 8 programs wanted
    assert gather_chunks(plan, bhk=64, sms=4) == 1  # 64 programs already
