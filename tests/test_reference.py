"""reference_attention: the masked softmax every kernel is checked against.

Compared with torch's scaled_dot_product_attention (math path on CPU) where a pattern has an SDPA
equivalent, and with a float64 softmax written out here otherwise. Tolerances are tight enough
to fail: float64 paths agree to 1e-12, float32 paths to a few ulps of the output size.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import spcompile as sp

F64 = dict(atol=1e-12, rtol=1e-12)
F32 = dict(atol=2e-6, rtol=2e-5)


def inputs(b=2, h=4, h_kv=4, sq=13, skv=13, d=16, dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h_kv, skv, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv, skv, dv or d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def close(got, want, tol, what):
    """assert_close prints the number of mismatches, the worst one and its index."""
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def naive(q, k, v, mask, scale=None):
    """softmax(q k^T * scale) v in float64 with a loop over rows; empty rows give 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, sq, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], 1)
    v = v.repeat_interleave(h // v.shape[1], 1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    mask = mask.expand(b, h, sq, k.shape[2])
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                keys = mask[bi, hi, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = (k[bi, hi, keys] @ q[bi, hi, i]) * scale
                top = s.max()
                w = torch.exp(s - top)
                lse[bi, hi, i] = top + torch.log(w.sum())
                out[bi, hi, i] = (w / w.sum()) @ v[bi, hi, keys]
    return out, lse


# ---------------------------------------------------------------------------------------------
# Against torch SDPA


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_dense_equals_sdpa(dtype, tol):
    q, k, v = inputs(sq=17, skv=23, dv=8, dtype=dtype)
    got = sp.reference_attention(q, k, v, sp.Dense())
    assert got.dtype == dtype and got.shape == (2, 4, 17, 8)
    close(got, F.scaled_dot_product_attention(q, k, v), tol, "dense")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_causal_equals_sdpa(dtype, tol):
    q, k, v = inputs(sq=19, skv=19, dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for pattern in (sp.Sliding(window=19, causal=True), sp.Sliding(left=100, causal=True),
                    sp.Blocked(block=19, causal=True), sp.AnyOf(sp.Dense(), causal=True),
                    sp.Neighborhood(shape=19, window=19, causal=True)):
        close(sp.reference_attention(q, k, v, pattern), want, tol, repr(pattern))


def test_causal_decode_is_bottom_right():
    # SDPA's is_causal aligns top-left; FlashAttention (and we) align bottom-right
    q, k, v = inputs(sq=5, skv=12)
    bottom_right = torch.ones(5, 12, dtype=torch.bool).tril(12 - 5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)
    got = sp.reference_attention(q, k, v, sp.AnyOf(sp.Dense(), causal=True))
    close(got, want, F64, "causal decode")
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (got - top_left).abs().max() > 0.1, "bottom-right must differ from top-left here"


@pytest.mark.parametrize("pattern,sq,skv", [
    (sp.Sliding(left=3, right=2), 11, 20),
    (sp.Neighborhood(shape=(3, 6), window=(3, 3), stride=(1, 2), dilation=(1, 2)), 18, 18),
    (sp.Strided(local=3, stride=4), 16, 16),
    (sp.BlockLayout(kind="longformer", block=4, local=3, global_indices=(1,)), 18, 18),
    (sp.Sliding(window=4, causal=True) | sp.Global(first=2), 9, 14),
], ids=lambda x: repr(x)[:40] if isinstance(x, sp.Pattern) else str(x))
def test_pattern_equals_sdpa_with_its_mask(pattern, sq, skv):
    q, k, v = inputs(sq=sq, skv=skv)
    mask = sp.dense_mask(pattern, sq, skv)
    assert mask.any(1).all(), "this test needs every row non-empty (SDPA gives NaN otherwise)"
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    close(sp.reference_attention(q, k, v, pattern), want, F64, repr(pattern))


@pytest.mark.parametrize("h,h_kv", [(8, 2), (6, 1), (4, 4)])
def test_gqa_equals_repeated_kv(h, h_kv):
    q, k, v = inputs(h=h, h_kv=h_kv, sq=10, skv=14, dv=12)
    pattern = sp.Sliding(left=4, right=1)
    got = sp.reference_attention(q, k, v, pattern)
    kr, vr = (x.repeat_interleave(h // h_kv, dim=1) for x in (k, v))
    close(got, sp.reference_attention(q, kr, vr, pattern), F64, "GQA vs repeated k/v")
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=sp.dense_mask(pattern, 10, 14))
    close(got, want, F64, "GQA vs SDPA on repeated k/v")


def test_scale_argument():
    q, k, v = inputs()
    for scale in (0.05, 1.0, 3.0):
        close(sp.reference_attention(q, k, v, sp.Dense(), scale=scale),
              F.scaled_dot_product_attention(q, k, v, scale=scale), F64, f"scale={scale}")


# ---------------------------------------------------------------------------------------------
# LSE, empty rows, dtypes


def test_matches_naive_softmax_and_lse():
    pattern = sp.AnyOf(sp.Neighborhood(shape=(4, 5), window=(3, 2), causal=(True, False)),
                       sp.Global(every=7))
    q, k, v = inputs(b=1, h=4, h_kv=2, sq=20, skv=20, dv=5)
    out, lse = sp.reference_attention(q, k, v, pattern, return_lse=True)
    want_out, want_lse = naive(q, k, v, sp.dense_mask(pattern, 20, 20))
    close(out, want_out, F64, "output")
    close(lse, want_lse, F64, "lse")


def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    pattern = sp.Global(indices=[5], causal=True)  # rows 0-4 have no key
    q, k, v = inputs(h=4, h_kv=2, sq=12, skv=12)
    mask = sp.dense_mask(pattern, 12, 12)
    assert mask.any(1).tolist() == [False] * 5 + [True] * 7
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        out, lse = sp.reference_attention(*(x.to(dtype) for x in (q, k, v)), pattern,
                                          return_lse=True)
        assert not out.isnan().any() and not lse.isnan().any(), dtype
        assert (out[:, :, :5] == 0).all(), f"{dtype}: empty rows must be exactly 0"
        assert torch.isneginf(lse[:, :, :5]).all(), f"{dtype}: empty rows have LSE -inf"
        assert torch.isfinite(lse[:, :, 5:]).all()
    # rows 5.. see only key 5: output is v[5] (of the head's KV group), LSE is its score
    out, lse = sp.reference_attention(q, k, v, pattern, return_lse=True)
    close(out[:, :, 5:], v[:, :, 5:6].repeat_interleave(2, 1).expand(-1, -1, 7, -1), F64,
          "one visible key")
    score = (q[:, :, 5:] * k[:, :, 5:6].repeat_interleave(2, 1)).sum(-1) / 4.0
    close(lse[:, :, 5:], score, F64, "lse of one key")


def test_gradients_are_finite_with_empty_rows():
    q, k, v = (x.requires_grad_() for x in inputs(sq=12, skv=12))
    out = sp.reference_attention(q, k, v, sp.Global(indices=[5], causal=True))
    out.sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(x.grad).all(), f"d{name} has NaN/inf"
    assert (q.grad[:, :, :5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_float32(dtype):
    q, k, v = inputs(sq=9, skv=15, dtype=dtype)
    pattern = sp.Sliding(window=5, causal=True)
    out, lse = sp.reference_attention(q, k, v, pattern, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want_out, want_lse = naive(q, k, v, sp.dense_mask(pattern, 9, 15))
    # the inputs are exact in float64; only the float32 math and the final rounding differ
    ulp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6}[dtype]
    close(out.double(), want_out, dict(atol=ulp, rtol=ulp), f"out {dtype}")
    close(lse.double(), want_lse, dict(atol=1e-5, rtol=1e-6), f"lse {dtype}")


def test_float64_is_float64():
    q, k, v = inputs(sq=7, skv=7)
    out, lse = sp.reference_attention(q, k, v, sp.Dense(), return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    # a float32 computation would be ~1e-7 off; float64 agrees to 1e-12
    want = naive(q, k, v, torch.ones(7, 7, dtype=torch.bool))[0]
    assert (out - want).abs().max() < 1e-13
    assert (sp.reference_attention(q.float(), k.float(), v.float(), sp.Dense()).double()
            - want).abs().max() > 1e-10


def test_per_head_patterns():
    a, b = sp.Dense(), sp.Sliding(window=3, causal=True)
    pattern = sp.PerHead({"0-1": a, "2-": b})
    q, k, v = inputs(h=4, h_kv=2, sq=10, skv=10)
    got = sp.reference_attention(q, k, v, pattern)
    close(got[:, :2], sp.reference_attention(q[:, :2], k[:, :1], v[:, :1], a), F64, "heads 0-1")
    close(got[:, 2:], sp.reference_attention(q[:, 2:], k[:, 1:], v[:, 1:], b), F64, "heads 2-3")


def test_topk_uses_the_selected_blocks():
    q, k, v = inputs(h=4, h_kv=2, sq=24, skv=24)
    pattern = sp.TopK(block=4, k=1, sink=1, local=1, causal=True)
    mask = sp.dense_mask(pattern, 24, 24, q=q, k=k)
    want, _ = naive(q, k, v, mask)
    close(sp.reference_attention(q, k, v, pattern), want, F64, "topk")


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("shapes,message", [
    (((2, 4, 8), (2, 4, 8, 16), (2, 4, 8, 16)),
     "expected q, k, v of shape [B, H, S, D], got (2, 4, 8), (2, 4, 8, 16), (2, 4, 8, 16)"),
    (((2, 4, 8, 16), (2, 4, 8, 8), (2, 4, 8, 16)),
     "got q (2, 4, 8, 16), k (2, 4, 8, 8), v (2, 4, 8, 16)"),
    (((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 9, 16)), "v (2, 4, 9, 16)"),
    (((2, 4, 8, 16), (1, 4, 8, 16), (1, 4, 8, 16)), "k (1, 4, 8, 16)"),
    (((2, 6, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)),
     "expected the query heads (6) to be a multiple of the key/value heads (4)"),
])
def test_rejects_bad_shapes(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        sp.reference_attention(q, k, v, sp.Dense())
    assert str(info.value).startswith("reference_attention: expected ")


def test_rejects_huge_sizes_before_allocating():
    # stride-0 views: 20000 x 20000 scores would need 1.6 GB; the check must come first
    q = torch.zeros(1, 1, 1, 8).expand(1, 2, 20000, 8)
    with pytest.raises(ValueError, match=re.escape(
            "1x2x20000x20000 scores exceed the 268435456-element limit; it is for tests only")):
        sp.reference_attention(q, q, q, sp.Dense())


def test_rejects_mask_that_does_not_fit():
    q, k, v = inputs(sq=15, skv=15)
    with pytest.raises(ValueError, match=re.escape("the grid 4x4 holds 16 tokens")):
        sp.reference_attention(q, k, v, sp.Neighborhood(shape=(4, 4), window=3))
    with pytest.raises(ValueError, match=re.escape("heads [3] have no pattern (of 4 heads)")):
        sp.reference_attention(q, k, v, sp.PerHead({"0-2": sp.Dense()}))
