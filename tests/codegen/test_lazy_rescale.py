"""Lazy rescaling (``LaunchConfig.lazy_rescale``) against float64 and the exact-rescaling kernel.

FULL tiles keep a stale running max until some row's max grows by more than ``RESCALE_SLACK``
(log2 units), so both branches must be exercised: keys whose scores climb slowly along the
sequence (the max moves by less than the slack from tile to tile, never rescaled) and keys that
jump (rescaled), with masked PARTIAL tiles and fully masked rows after the lazy ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_attention import CASES

import spcompile as sp
from spcompile.codegen.fwd import RESCALE_SLACK, LaunchConfig, attn_fwd, fwd_source
from spcompile.plan.tiles import build_plan
from spcompile.reference import reference_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAZY = LaunchConfig(4, 2, lazy_rescale=True)
# Triton's interpreter has no bfloat16 arithmetic: bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _qkv(sq: int, skv: int, seed: int, climb: float, h: int = 4, h_kv: int = 2, d: int = 16):
    """Random q, k, v plus a score term that grows by ``climb`` (natural-log units at scale 1)
    per 16 keys: every query sees it, so rows' maxima move tile after tile."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, sq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, h_kv, skv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, h_kv, skv, d, generator=gen, dtype=torch.float64)
    q[..., 0] = math.sqrt(d)  # score of key j gains k[..., j, 0] (the scale is 1/sqrt(d))
    k[..., 0] = climb * torch.arange(skv, dtype=torch.float64) / 16
    return q, k, v


def _check(pattern, sq: int, skv: int, qt, kt, climb: float, dtype: torch.dtype) -> None:
    plan = build_plan(pattern, sq, skv, qt, kt)
    q, k, v = _qkv(sq, skv, seed=sq + skv, climb=climb)
    ref, ref_lse = reference_attention(q, k, v, pattern, return_lse=True)
    q, k, v = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    lazy, lazy_lse = attn_fwd(q, k, v, plan, config=LAZY)
    exact, _ = attn_fwd(q, k, v, plan, config=LaunchConfig(4, 2))
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    # Against float64 on the same rounded inputs' scale: the lazy kernel is no less exact.
    err_lazy = (lazy.double().cpu() - ref).abs().max().item()
    err_exact = (exact.double().cpu() - ref).abs().max().item()
    assert err_lazy <= max(tol, 1.5 * err_exact), (err_lazy, err_exact)
    assert not lazy.isnan().any()
    seen = ref_lse.isfinite()
    assert torch.equal(lazy_lse.isfinite().cpu(), seen)
    lse_err = (lazy_lse.double().cpu()[seen] - ref_lse[seen]).abs().max().item()
    assert lse_err < 10 * tol


@pytest.mark.parametrize("climb", [0.5, 40.0])  # per 16 keys: under and over the slack
@pytest.mark.parametrize("case", ["sliding-decode", "blocked-causal", "na3d-causal-dil",
                                  "stripes-gathered", "empty-rows", "dense"])
def test_lazy_rescale_matches_float64(case: str, climb: float) -> None:
    pattern, sq, skv, qt, kt = CASES[case]
    _check(pattern, sq, skv, qt, kt, climb, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_rescale_long_rows_and_grid(dtype: torch.dtype) -> None:
    """Rows of many FULL tiles (a 17x23 grid's neighborhood, a wide window), both dtypes."""
    _check(sp.Neighborhood(shape=(17, 23), window=(9, 11)), 391, 391, (4, 8), (4, 8), 2.0,
           dtype)
    _check(sp.Sliding(left=70, right=50), 150, 150, (16,), (16,), 1.0, dtype)


def test_lazy_branch_is_generated_for_full_tiles_only() -> None:
    plan = build_plan(sp.Sliding(left=40, right=40), 100, 100, (16,), (16,))
    lazy, exact = fwd_source(plan, lazy=True), fwd_source(plan)
    assert lazy.count(f"> {RESCALE_SLACK}:") == 1  # the FULL loop; PARTIAL tiles stay exact
    assert f"> {RESCALE_SLACK}:" not in exact
