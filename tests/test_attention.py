"""sparse_attention: forward and gradients against the float64 reference, both implementations.

The CPU path ("torch") runs in float64 and must agree to ~1e-12; the Triton kernels run under
TRITON_INTERPRET=1 on a CPU machine (float32, "ieee" dots) and natively on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import spcompile as sp
from spcompile.attention import sparse_attention

GPU = torch.cuda.is_available()

CASES = {
    "na2d-stride": (sp.Neighborhood(shape=(9, 10), window=(3, 5), stride=(1, 2)), 90, 90,
                    (4, 4), (4, 4)),
    "na3d-causal-dil": (sp.Neighborhood(shape=(3, 6, 4), window=(2, 3, 2), dilation=(1, 2, 1),
                                        causal=(True, False, False)), 72, 72,
                        (2, 2, 4), (2, 4, 2)),
    "sliding-causal": (sp.Sliding(window=7, causal=True), 40, 40, (16,), (16,)),
    "sliding-decode": (sp.Sliding(left=3, right=2), 24, 40, (16,), (16,)),
    "blocked-causal": (sp.Blocked(block=12, causal=True), 50, 50, (16,), (16,)),
    "strided-fixed": (sp.Strided(stride=8, variant="fixed", summary=2), 45, 45, (16,), (16,)),
    "stripes": (sp.Sliding(left=3, right=3) | sp.Global(every=9, rows=False), 37, 37,
                (16,), (16,)),
    "longformer": (sp.BlockLayout(kind="longformer", block=8, local=3,
                                  global_indices=(2,)), 48, 48, (16,), (16,)),
    "empty-rows": (sp.Global(indices=[20], causal=True), 40, 40, (16,), (16,)),
    # every 13th key: 8 gathered keys fill one tile; the stripes touch all 7 KV tiles
    "stripes-gathered": (sp.Sliding(left=5, right=5) | sp.Global(every=13), 100, 100,
                         (16,), (16,)),
    "stripes-gathered-causal": (sp.AnyOf(sp.Sliding(window=9, causal=True),
                                         sp.Global(every=11, first=2), causal=True), 90, 90,
                                (16,), (16,)),
    "dense": (sp.Dense(), 33, 33, (16,), (16,)),
    # no PARTIAL tile: forward and dQ kernels are generated without their PARTIAL loop
    "blocked-aligned": (sp.Blocked(block=32), 64, 64, (16,), (16,)),
}


def _inputs(sq, skv, dtype, device, seed, d=16, dv=16, h=4, h_kv=2):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()
    return make(2, h, sq, d), make(2, h_kv, skv, d), make(2, h_kv, skv, dv), \
        torch.randn(2, h, sq, dv, generator=gen).to(device, dtype)


def _check(pattern, q, k, v, do, impl, tol, **tiles):
    out, lse = sparse_attention(q, k, v, pattern, impl=impl, return_lse=True, **tiles)
    grads = torch.autograd.grad(out, (q, k, v), do)
    out = out.detach()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = sp.reference_attention(qd, kd, vd, pattern, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for name, got, want, scale in (("out", out, ref, v), ("dq", grads[0], ref_grads[0], q),
                                   ("dk", grads[1], ref_grads[1], k),
                                   ("dv", grads[2], ref_grads[2], v)):
        assert not got.isnan().any(), f"{name} has NaN"
        # Relative to the inputs' size: a gradient may be exactly 0 (one visible key).
        err = float((got.detach().double() - want).norm() / scale.detach().double().norm())
        assert err < tol, f"{name}: error {err:.2e} (tolerance {tol:.0e})"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty.cpu())
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_matches_reference(case):
    pattern, sq, skv, qt, kt = CASES[case]
    q, k, v, do = _inputs(sq, skv, torch.float64, "cpu", seed=len(case))
    _check(pattern, q, k, v, do, "torch", 1e-10, q_tile=qt, kv_tile=kt)


TRITON_CASES = ["na3d-causal-dil", "sliding-decode", "stripes-gathered",
                "stripes-gathered-causal", "empty-rows", "blocked-aligned"]


@pytest.mark.parametrize("case", TRITON_CASES if not GPU else list(CASES))
def test_triton_matches_reference(case):
    pattern, sq, skv, qt, kt = CASES[case]
    device = "cuda" if GPU else "cpu"
    q, k, v, do = _inputs(sq, skv, torch.float32, device, seed=len(case))
    _check(pattern, q, k, v, do, "triton", 1e-4, q_tile=qt, kv_tile=kt)


def test_backward_takes_its_own_tiles():
    """Without tiles from the caller, N-d backward kernels run on 64-token boxes, not the
    forward's 128: gradients on a 17x23 grid still equal the float64 reference."""
    from spcompile.plan.choose import backward_tiles, default_tiles

    pattern = sp.Neighborhood(shape=(17, 23), window=(5, 7), stride=(1, 2))
    s = 17 * 23
    assert backward_tiles(pattern, s, s) != default_tiles(pattern, s, s)
    device = "cuda" if GPU else "cpu"
    q, k, v, do = _inputs(s, s, torch.float32, device, seed=5, h=2, h_kv=1)
    _check(pattern, q, k, v, do, "triton", 1e-4)


@pytest.mark.skipif(not GPU, reason="bf16 kernels need a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_bf16_head_dims(case):
    pattern, sq, skv, qt, kt = CASES[case]
    for d in (32, 72, 128):
        q, k, v, do = _inputs(sq, skv, torch.bfloat16, "cuda", seed=d, d=d, dv=d)
        _check(pattern, q, k, v, do, "triton", 3e-2, q_tile=qt, kv_tile=kt)


def test_stripes_are_gathered():
    """The stripes cases must take the gather path, or they test nothing new."""
    from spcompile.plan.tiles import build_plan

    for case in ("stripes-gathered", "stripes-gathered-causal"):
        pattern, sq, skv, qt, kt = CASES[case]
        plan = build_plan(pattern, sq, skv, qt, kt)
        assert plan.gather is not None and plan.gather.num_tiles == 1, case


def test_per_head_mix_matches_reference():
    pattern = sp.PerHead({range(0, 2): sp.Dense(), "2-": sp.Sliding(window=5, causal=True)})
    q, k, v, do = _inputs(30, 30, torch.float64, "cpu", seed=3)
    _check(pattern, q, k, v, do, "torch", 1e-10, q_tile=16, kv_tile=16)


def test_per_head_split_gqa_group():
    pattern = sp.PerHead({"0": sp.Dense(), "1-": sp.Sliding(window=5)})
    q, k, v, do = _inputs(20, 20, torch.float64, "cpu", seed=4)
    _check(pattern, q, k, v, do, "torch", 1e-10, q_tile=16, kv_tile=16)


def test_compiles_without_graph_break():
    pattern = sp.Sliding(window=7, causal=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    fn = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern, q_tile=16, kv_tile=16),
                       fullgraph=True, backend="eager")
    q = torch.randn(1, 2, 40, 16)
    out = fn(q, q, q)
    assert float((out - sp.reference_attention(q, q, q, pattern)).abs().max()) < 1e-5
    assert not counts["graph_break"]


def test_bad_inputs_say_what_came():
    q = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        sparse_attention(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16),
                         sp.Sliding(window=3))
    with pytest.raises(ValueError, match="impl"):
        sparse_attention(q, q, q, sp.Sliding(window=3), impl="cuda")
    with pytest.raises(ValueError, match="holds 64 tokens"):
        sparse_attention(q, q, q, sp.Neighborhood(shape=(8, 8), window=3))


def test_eager_calls_skip_the_op_dispatch_and_agree(monkeypatch):
    """Eager calls run the op's bodies without its dispatch: directly without autograd, through
    ``EagerAttention`` with it. Both give the op's output and gradients."""
    import spcompile.attention as attention
    import spcompile.ops as ops

    pattern = sp.Sliding(window=5, causal=True)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    via_op, _ = ops.attention_op(q, k, v, pattern.key, 0.25, "torch", [], [])
    op_grads = torch.autograd.grad(via_op.square().sum(), (q, k, v))
    calls = []
    monkeypatch.setattr(attention, "attention_op", lambda *a: calls.append(a))
    monkeypatch.setattr(ops, "attention_backward_op", lambda *a: calls.append(a))
    out = sparse_attention(q, k, v, pattern, scale=0.25, impl="torch")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    with torch.no_grad():
        direct = sparse_attention(q, k, v, pattern, scale=0.25, impl="torch")
    assert not calls
    assert torch.equal(out, via_op) and torch.equal(direct, via_op)
    assert all(torch.equal(a, b) for a, b in zip(grads, op_grads, strict=True))


def test_torch_func_grad_runs_the_eager_function():
    """``torch.func.grad`` differentiates an eager call (``EagerAttention`` has its own
    ``setup_context``) and agrees with autograd."""
    pattern = sp.Sliding(window=5, causal=True)
    q = torch.randn(1, 2, 40, 16, dtype=torch.float64)

    def loss(q):
        return sparse_attention(q, q, q, pattern, impl="torch").square().sum()

    got = torch.func.grad(loss)(q)
    q_ = q.clone().requires_grad_()
    loss(q_).backward()
    torch.testing.assert_close(got, q_.grad)


def test_excluded_key_far_above_the_row_gives_no_nan():
    """A key outside the window scoring ~1000 above the row's LSE: exp overflows there, and the
    backward must still give finite gradients (0 * inf would be NaN)."""
    q = torch.zeros(1, 1, 32, 16, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros_like(q)
    k[0, 0, 20, 0] = 4000.0
    q, k, v = q.requires_grad_(), k.requires_grad_(), torch.randn_like(q).requires_grad_()
    out = sparse_attention(q, k, v, sp.Sliding(window=3), impl="torch", scale=0.25)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def _masked_reference(pattern, q, k, v, allowed_keys, blocks=None):
    """float64 softmax under the pattern's mask AND the per-key mask [B, S_kv]; rows with no key
    give 0."""
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = sp.dense_mask(pattern, s_q, s_kv)[None, None] if blocks is None else blocks
    mask = mask.to(q.device)
    mask = mask & allowed_keys[:, None, None, :]
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    scores = qd @ kd.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    probs = torch.nan_to_num(scores.masked_fill(~mask, float("-inf")).softmax(-1))
    return probs @ vd.repeat_interleave(group, 1), (qd, kd, vd)


KEY_MASK_CASES = ["sliding-causal", "sliding-decode", "na2d-stride", "stripes-gathered-causal",
                  "longformer"]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", KEY_MASK_CASES)
def test_key_mask_is_anded_with_the_pattern(case, impl):
    """Key padding (holes, a fully padded batch row, rows left without a key) on the same sparse
    kernels: forward and gradients equal the float64 masked softmax."""
    if impl == "triton" and not GPU and case not in ("sliding-decode", "stripes-gathered-causal"):
        pytest.skip("the interpreter is slow: two cases on CPU")
    pattern, sq, skv, qt, kt = CASES[case]
    device = "cuda" if impl == "triton" and GPU else "cpu"
    dtype = torch.float64 if impl == "torch" else torch.float32
    q, k, v, do = _inputs(sq, skv, dtype, device, seed=len(case) + 7)
    gen = torch.Generator().manual_seed(1)
    allowed = torch.rand(2, skv, generator=gen) > 0.35
    allowed[1, skv // 2 :] = False  # right padding of the second sequence
    for key_mask in (allowed.to(device), torch.zeros(2, skv).masked_fill(~allowed, float("-inf"))
                     .to(device, dtype)):
        out = sparse_attention(q, k, v, pattern, impl=impl, q_tile=qt, kv_tile=kt,
                               key_mask=key_mask)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref, leaves = _masked_reference(pattern, q, k, v, allowed.to(device))
        ref_grads = torch.autograd.grad(ref, leaves, do.double())
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
            assert torch.isfinite(got).all()
            err = float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))
            assert err < tol, err


def test_key_mask_shape_is_checked():
    q = torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"key_mask of shape \[2 or 1, 8\]"):
        sparse_attention(q, q, q, sp.Sliding(window=3), key_mask=torch.ones(2, 7, dtype=bool))
    with pytest.raises(TypeError, match="bool or floating"):
        sparse_attention(q, q, q, sp.Sliding(window=3), key_mask=torch.ones(2, 8, dtype=int))
