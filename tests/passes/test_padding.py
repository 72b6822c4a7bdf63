"""Key-padding masks run with the pattern (AND) instead of leaving the site dense.

Detection: a mask that broadcasts over queries and heads, or a per-key mask AND-ed with a
constant causal mask as HuggingFace's ``masking_utils`` builds it, is split into its per-key part
(``AttentionSite.key_padding``) and the causality; anything else keeps the site dense.

Numerics: every compiled output (and gradient) is compared with a float64 masked softmax of the
pattern AND the padding, where a query row with no allowed key gives 0 (spcompile's rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.utils import counters

import spcompile as sp
from spcompile.backend import spcompile_backend
from spcompile.passes.detect import find_attention
from spcompile.passes.padding import padded_sparse_attention
from spcompile.passes.site import AttentionSite

B, H, D = 2, 4, 16
SCALE = D ** -0.5
MIN = torch.finfo(torch.float32).min


# --------------------------------------------------------------------------------------------
# Models: attention over (q, k, v) with a mask argument, spelled as real code does


class Attention(nn.Module):
    """``form`` says how the mask reaches the scores; ``mask`` is given as that form needs."""

    def __init__(self, form: str, gqa: bool = False) -> None:
        super().__init__()
        self.form, self.gqa = form, gqa  # a constant: a SymBool enable_gqa breaks the graph

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        if self.form.startswith("sdpa"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        if self.gqa:
            n = q.shape[1] // k.shape[1]
            k, v = (x[:, :, None].expand(-1, -1, n, -1, -1).flatten(1, 2) for x in (k, v))
        scores = torch.matmul(q, k.transpose(-2, -1)) * SCALE
        scores = scores.masked_fill(mask, float("-inf")) if self.form == "fill" else \
            scores + mask
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def as_mask(form: str, bias: torch.Tensor) -> torch.Tensor:
    """The [B, 1, 1, S_kv] mask of ``form`` for a per-key ``bias`` [B, S_kv] (-inf: blocked)."""
    keep = torch.isfinite(bias)[:, None, None, :]
    if form == "sdpa-allow":
        return keep
    if form == "fill":
        return ~keep
    if form in ("sdpa-additive", "add-bias"):
        return bias[:, None, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, MIN)  # "add-min", HF's finfo.min


class BuiltMask(nn.Module):
    """HuggingFace's ``masking_utils`` in miniature: the [B, 1, S, S] mask is built in forward
    from a [B, S] padding input, ``causal & padding[b, kv]``, expanded, and for the eager
    attention turned additive with ``torch.where(mask, 0, finfo.min)``."""

    def __init__(self, sdpa: bool, causal: bool = True) -> None:
        super().__init__()
        self.sdpa, self.causal = sdpa, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor
                ) -> torch.Tensor:
        b, s = padding.shape
        q_idx = torch.arange(s)[None, None, :, None]
        kv_idx = torch.arange(s)[None, None, None, :]
        batch_idx = torch.arange(b)[:, None, None, None]
        allowed = q_idx.new_ones((), dtype=torch.bool)
        if self.causal:
            allowed = allowed & (kv_idx <= q_idx)
        allowed = allowed & padding.to(torch.bool)[batch_idx, kv_idx]
        allowed = allowed.expand(b, -1, s, s)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        mask = torch.where(allowed, torch.zeros(()), MIN)
        scores = torch.matmul(q, k.transpose(-2, -1)) * SCALE + mask
        return torch.softmax(scores, dim=-1) @ v


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: sp.Pattern,
              bias: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q k^T * SCALE + bias) v over the pattern's pairs; no key -> 0."""
    q, k, v = (x.double() for x in (q, k, v))
    n = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(n, dim=1) for x in (k, v))
    s = q @ k.transpose(-1, -2) * SCALE + bias.double()[:, None, None, :]
    allowed = sp.dense_mask(pattern, q.shape[2], k.shape[2], num_heads=q.shape[1])
    allowed = allowed & torch.isfinite(s)  # [S_q, S_kv] or, PerHead, [H, S_q, S_kv]
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    p = torch.where(has_key, s, 0.0).softmax(-1) * allowed
    return p @ v


def padding_bias(kv_len: int, layout: str, values: str = "block") -> torch.Tensor:
    """[B, S_kv] float32: 0 for kept keys, -inf for padded ones (or random finite biases)."""
    bias = torch.zeros(B, kv_len)
    if layout == "right":
        bias[1, kv_len - 7:] = float("-inf")
    elif layout == "left":
        bias[0, :5] = float("-inf")
    elif layout == "holes":
        bias[0, 3::4] = float("-inf")
        bias[1, :2] = float("-inf")
    elif layout == "all-padded":
        bias[1] = float("-inf")
    if values == "random":
        gen = torch.Generator().manual_seed(kv_len)
        bias = bias + torch.randn(B, kv_len, generator=gen) * 3
    return bias


def qkv(q_len: int, kv_len: int, kv_heads: int = H, requires_grad: bool = False
        ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(q_len * 100 + kv_len)
    q = torch.randn(B, H, q_len, D, generator=gen)
    k, v = (torch.randn(B, kv_heads, kv_len, D, generator=gen) for _ in range(2))
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def compiled(model: nn.Module, pattern: sp.Pattern, **kw: Any) -> Callable[..., Any]:
    spec = {"version": 1, "rules": [{"match": "*", "pattern": pattern.to_dict()}]}
    torch._dynamo.reset()
    return torch.compile(model, backend="spcompile",
                         options={"spec": spec, "inner": "eager", "report": False}, **kw)


def sites_of(model: nn.Module, *args: Any) -> list[AttentionSite]:
    found: list[AttentionSite] = []

    def capture(gm: fx.GraphModule, _: list[Any]) -> Callable[..., Any]:
        found.extend(find_attention(gm)[0])
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*args)
    return found


# --------------------------------------------------------------------------------------------
# Detection

FORMS = {"sdpa-allow": "allow", "sdpa-additive": "additive", "add-min": "additive",
         "add-bias": "additive", "fill": "block"}


@pytest.mark.parametrize("form", list(FORMS))
def test_per_key_masks_are_key_padding(form: str) -> None:
    mask = as_mask(form, padding_bias(24, "right"))
    (site,) = sites_of(Attention(form), *qkv(24, 24), mask)
    assert site.key_padding is not None and site.key_padding.op == "placeholder"
    assert site.key_padding_kind == FORMS[form] and site.attn_mask is not None
    assert not site.is_causal and "key padding" in site.mask_note


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
def test_built_mask_splits_into_padding_and_causality(sdpa: bool, causal: bool) -> None:
    padding = (padding_bias(24, "left") == 0).long()
    (site,) = sites_of(BuiltMask(sdpa, causal), *qkv(24, 24), padding)
    assert site.key_padding is not None and site.key_padding_kind == "allow"
    assert tuple(site.key_padding.meta["example_value"].shape) == (B, 1, 1, 24)
    assert site.is_causal == causal and site.mask_window is None


@pytest.mark.parametrize("shape", [(B, 1, 24, 24), (B, H, 1, 24)], ids=["per-query", "per-head"])
def test_masks_that_vary_over_queries_or_heads_are_not_key_padding(shape: tuple) -> None:
    mask = torch.rand(shape) > 0.3
    (site,) = sites_of(Attention("sdpa-allow"), *qkv(24, 24), mask)
    assert site.key_padding is None and site.attn_mask is not None
    assert "not a key-padding mask" in site.mask_note


# --------------------------------------------------------------------------------------------
# Numerics through the backend


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", ["right", "left", "holes", "all-padded"])
def test_padding_and_pattern_forms(form: str, layout: str) -> None:
    pattern = sp.Sliding(window=5)
    bias = padding_bias(30, layout, "random" if form == "add-bias" else "block")
    q, k, v = qkv(30, 30)
    with torch.no_grad():
        out = compiled(Attention(form), pattern)(q, k, v, as_mask(form, bias))
    report = sp.last_report()
    assert len(report.rewritten) == 1 and report.rewritten[0].key_padding
    assert "AND key padding" in report.render()
    assert float((out - reference(q, k, v, pattern, bias)).abs().max()) < 1e-5


@pytest.mark.parametrize("pattern", [
    sp.Sliding(window=4, causal=True), sp.Blocked(block=8), sp.Strided(local=3, stride=5),
    sp.AnyOf(sp.Sliding(window=6, causal=True), sp.Global(first=2)),
    sp.PerHead({"0-1": sp.Sliding(window=3), "2-3": sp.Blocked(block=8)}),
], ids=["sliding-causal", "blocked", "strided", "sinks", "per-head"])
def test_patterns_with_gqa_and_kv_cache_shapes(pattern: sp.Pattern) -> None:
    """GQA runs on compact k/v; q_len < kv_len keeps the bottom-right alignment (no truncation
    of the keys is involved)."""
    bias = padding_bias(37, "holes")
    q, k, v = qkv(9, 37, kv_heads=2)
    with torch.no_grad():
        out = compiled(Attention("sdpa-allow", gqa=True), pattern)(q, k, v,
                                                                   as_mask("sdpa-allow", bias))
    assert sp.last_report().rewritten[0].key_padding
    assert float((out - reference(q, k, v, pattern, bias)).abs().max()) < 1e-5


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "eager"])
def test_built_causal_padding_mask_runs_sparse_and_trains(sdpa: bool) -> None:
    """HF's [B, 1, S, S] causal & padding mask: the compiled graph no longer builds it, the
    output and the gradients are those of the pattern AND causal AND padding."""
    pattern = sp.Sliding(window=6, causal=True)
    bias = padding_bias(28, "left")
    padding = torch.isfinite(bias).long()
    q, k, v = qkv(28, 28, requires_grad=True)
    graphs: list[fx.GraphModule] = []
    spec = {"version": 1, "rules": [{"match": "*", "pattern": pattern.to_dict()}]}

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        return spcompile_backend(gm, example_inputs, {"spec": spec, "inner": "eager",
                                                      "report": False})

    torch._dynamo.reset()
    out = torch.compile(BuiltMask(sdpa), backend=backend)(q, k, v, padding)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    ref = reference(q, k, v, pattern, bias)
    ref_grads = torch.autograd.grad((ref * ref).sum(), (q, k, v))
    assert float((out - ref).detach().abs().max()) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert not g.isnan().any() and float((g - r).abs().max()) < 1e-4
    (gm,) = graphs
    square = [n.name for n in gm.graph.nodes if isinstance(n.meta.get("example_value"),
                                                           torch.Tensor)
              and tuple(n.meta["example_value"].shape[-2:]) == (28, 28)]
    assert not square, f"the S x S mask is still built: {square}"


def test_padded_rows_train_without_nan() -> None:
    """Rows whose window holds only padded keys give 0 and zero gradients, never NaN."""
    pattern = sp.Sliding(window=3)
    bias = padding_bias(24, "right")
    q, k, v = qkv(24, 24, requires_grad=True)
    out = compiled(Attention("add-min"), pattern)(q, k, v, as_mask("add-min", bias))
    ref = reference(q, k, v, pattern, bias)
    assert float(out[1, :, -3:].detach().abs().max()) == 0.0  # rows 21..23 of sample 1 see no key
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).abs().max()) < 1e-4


def test_one_graph_for_every_length_with_padding() -> None:
    pattern = sp.Sliding(window=5)
    model = compiled(Attention("sdpa-allow"), pattern, dynamic=True)
    counters.clear()
    for n in (20, 27, 41):
        bias = padding_bias(n, "right")
        q, k, v = qkv(n, n)
        with torch.no_grad():
            out = model(q, k, v, as_mask("sdpa-allow", bias))
        assert float((out - reference(q, k, v, pattern, bias)).abs().max()) < 1e-5, n
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    """float16 caps the bias column (its range), bfloat16 does not need to: both exact up to
    the dtype's rounding, padded rows 0."""
    pattern = sp.Sliding(window=5)
    bias = padding_bias(30, "all-padded")
    q, k, v = (x.to(dtype) for x in qkv(30, 30))
    with torch.no_grad():
        out = compiled(Attention("add-min"), pattern)(q, k, v, as_mask("add-min", bias).to(dtype))
    assert sp.last_report().rewritten[0].key_padding
    assert float((out.double() - reference(q, k, v, pattern, bias)).abs().max()) < 2e-2
    assert float(out[1].abs().max()) == 0.0


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_run_the_padded_call(dtype: torch.dtype) -> None:
    """The Triton kernels (interpreted on a CPU) add the padding as a per-key bias, holes
    included."""
    pattern = sp.Sliding(window=5)
    bias = padding_bias(40, "holes")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, 40, 32, generator=gen).to(dtype) for _ in range(3))
    keep = torch.isfinite(bias)[:, None, None, :]
    out = padded_sparse_attention(q, k, v, keep, "allow", pattern.key, 32 ** -0.5, "triton")
    s = (q.double() @ k.double().transpose(-1, -2) * 32 ** -0.5)
    allowed = sp.dense_mask(pattern, 40, 40) & keep
    p = torch.where(allowed.any(-1, keepdim=True), s.masked_fill(~allowed, float("-inf")),
                    0.0).softmax(-1) * allowed
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert float((out.double() - p @ v.double()).abs().max()) < tol


# --------------------------------------------------------------------------------------------
# What stays dense, and why


def test_window_mask_and_padding_with_another_pattern_stays_dense() -> None:
    """A model's own causal window (AND padding) is only dropped when the rule's pattern is
    that window."""

    class WindowPadding(BuiltMask):
        def forward(self, q, k, v, padding):  # type: ignore[override]
            b, s = padding.shape
            i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
            window = ((j <= i) & (j > i - 4))[None, None]
            allowed = (window & padding.bool()[:, None, None, :]).expand(b, 1, s, s)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    padding = torch.isfinite(padding_bias(20, "left")).long()
    q, k, v = qkv(20, 20)
    with torch.no_grad():
        compiled(WindowPadding(True), sp.Sliding(window=6, causal=True))(q, k, v, padding)
    (site,) = sp.last_report().sites
    assert not site.rewritten and "causal window of 4 keys" in site.reason
    with torch.no_grad():
        out = compiled(WindowPadding(True), sp.Sliding(window=4, causal=True))(q, k, v, padding)
    assert sp.last_report().rewritten[0].key_padding
    ref = reference(q, k, v, sp.Sliding(window=4, causal=True), padding_bias(20, "left"))
    assert float((out - ref).abs().max()) < 1e-5
