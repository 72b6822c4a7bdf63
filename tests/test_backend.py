"""The backend end to end: detect, match rules, rewrite, run, report.

Each compiled result is compared with the same eager model given the pattern as a dense boolean
mask (or, for causal sites, the pattern AND causal), so the rewrite is checked numerically.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spcompile as sp
from spcompile.backend import parse_options
from spcompile.demos.vit import TinyViT, spec_for
from spcompile.passes.report import last_report
from spcompile.passes.rewrite import LeftDenseError


class CausalBlock(nn.Module):
    """An LLM-style attention with SDPA's is_causal flag and an optional explicit mask."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(b, n, c)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CausalBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _compile(model, spec, **extra):
    torch._dynamo.reset()
    return torch.compile(model, backend="spcompile",
                         options={"spec": spec, "inner": "eager", **extra})


def test_vit_neighborhood_end_to_end():
    torch.manual_seed(0)
    grid = (12, 10)
    model = TinyViT(grid=grid, dim=64, heads=2, depth=2).eval()
    images = torch.randn(2, 3, *model.image_size)
    with torch.no_grad():
        out = _compile(model, spec_for(grid, 5))(images)
    report = last_report()
    assert report is not None and len(report.rewritten) == 2
    assert [s.module_path for s in report.rewritten] == ["blocks.0.attn", "blocks.1.attn"]
    n = grid[0] * grid[1]
    model.set_reference_mask(sp.dense_mask(sp.Neighborhood(shape=grid, window=5), n, n))
    with torch.no_grad():
        ref = model(images)
    assert float((out - ref).abs().max()) < 1e-5


def _sliding_spec(window: int, layers: str = "0-") -> dict:
    return {"version": 1, "rules": [
        {"name": "local", "match": {"module": "layers.*", "layers": layers},
         "pattern": {"sliding": {"window": window, "causal": True}}}]}


def test_causal_site_keeps_causality_and_trains():
    torch.manual_seed(1)
    model = Model()
    x = torch.randn(2, 24, 32, requires_grad=True)
    compiled = _compile(model, _sliding_spec(5))
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    assert len(last_report().rewritten) == 2
    # Reference: the same layers with the window mask (a causal window is already causal).
    for layer in model.layers:
        layer.mask = sp.dense_mask(sp.Sliding(window=5, causal=True), 24, 24)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *model.parameters()])
    for layer in model.layers:
        layer.mask = None
    assert float((out - ref).detach().abs().max()) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).abs().max()) < 1e-4


def test_dense_rule_and_no_match_change_nothing():
    torch.manual_seed(2)
    model = Model()
    x = torch.randn(1, 16, 32)
    spec = {"version": 1, "rules": [{"match": "layers.0", "pattern": "dense"}]}
    out = _compile(model, spec)(x)
    report = last_report()
    assert not report.rewritten
    reasons = sorted(s.reason for s in report.sites)
    assert reasons == ["no rule matched", "the rule says dense"]
    assert torch.allclose(out, model(x), atol=1e-6)


def test_layer_ranges_select_sites():
    model = Model()
    _compile(model, _sliding_spec(5, layers="1"))(torch.randn(1, 16, 32))
    report = last_report()
    assert [s.module_path for s in report.rewritten] == ["layers.1"]


def test_strict_turns_left_dense_into_an_error():
    model = Model()
    spec = {"version": 1, "rules": [{"match": "nothing.*", "pattern": {"blocked": {"block": 4}}}]}
    with pytest.raises(Exception, match="left dense"):
        _compile(model, spec, strict=True)(torch.randn(1, 16, 32))
    assert issubclass(LeftDenseError, RuntimeError)


def test_unused_rules_are_reported():
    model = Model()
    spec = {"version": 1, "rules": [
        {"name": "llm", "match": "layers.*", "pattern": {"sliding": {"window": 3, "causal": True}}},
        {"name": "never", "match": "encoder.*", "pattern": "dense"}]}
    _compile(model, spec)(torch.randn(1, 16, 32))
    assert last_report().unused_rules == ["never"]


def test_spec_from_environment(monkeypatch, tmp_path):
    path = tmp_path / "attn.yaml"
    path.write_text("version: 1\nrules:\n  - match: 'layers.*'\n    pattern:\n"
                    "      sliding: {window: 3, causal: true}\n")
    monkeypatch.setenv("SPCOMPILE_SPEC", str(path))
    model = Model()
    torch._dynamo.reset()
    torch.compile(model, backend="spcompile", options={"inner": "eager"})(torch.randn(1, 8, 32))
    assert len(last_report().rewritten) == 2


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="unknown option"):
        parse_options({"spce": "x.yaml"})
    with pytest.raises(ValueError, match="inner"):
        parse_options({"inner": "tvm"})
    with pytest.raises(TypeError, match="strict"):
        parse_options({"strict": "yes"})


class ScaledAttention(nn.Module):
    """Hand-written attention whose scale is an attribute (dynamo lifts it when dynamic)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling = 0.3

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * self.scaling
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("dynamic", [False, True])
def test_scale_is_applied_with_dynamic_shapes(dynamic):
    model = ScaledAttention()
    spec = {"version": 1, "rules": [{"match": "*", "pattern": {"sliding": {"window": 5}}}]}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spcompile", dynamic=dynamic,
                             options={"spec": spec, "inner": "eager"})
    for n in (24, 40):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        out = compiled(q, k, v)
        ref = sp.reference_attention(q, k, v, sp.Sliding(window=5), scale=0.3)
        assert float((out - ref).abs().max()) < 1e-5, (dynamic, n)
    assert last_report().rewritten



def test_per_head_rule_runs_each_run_of_heads_on_its_pattern():
    """The op plans one single-head pattern per call: a PerHead site is one call per run of
    heads sharing a pattern, GQA groups kept."""
    pattern = sp.PerHead({"0-1": sp.Sliding(window=3), "2": sp.Dense(), "3": sp.Blocked(block=8)})
    spec = {"version": 1, "rules": [{"match": "*", "pattern": pattern.to_dict()}]}

    class Gqa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    q = torch.randn(2, 4, 20, 8)
    k, v = (torch.randn(2, 2, 20, 8) for _ in range(2))
    with torch.no_grad():
        out = _compile(Gqa(), spec)(q, k, v)
    assert last_report().rewritten[0].pattern == pattern.key
    ref = sp.reference_attention(q, k, v, pattern)
    assert float((out - ref).abs().max()) < 1e-5


class TopKReference(nn.Module):
    """CausalBlock with its attention replaced by the exact TopK reference."""

    def __init__(self, block: CausalBlock, pattern: sp.TopK) -> None:
        super().__init__()
        self.block, self.pattern = block, pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.block.heads
        q, k, v = self.block.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        out = sp.reference_attention(q, k, v, self.pattern)
        return out.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("training", [False, True])
def test_topk_site_runs_the_selection_and_its_kernel(training):
    """A TopK rule on an is_causal site: the selection op and the sparse op run in the graph,
    the site's causality is the TopK's own (it selects among causal blocks), and the result
    and gradients equal the reference TopK attention."""
    torch.manual_seed(0)
    block = CausalBlock()
    x = torch.randn(2, 80, 32, requires_grad=training)
    spec = {"version": 1, "rules": [{"match": "*", "pattern": {
        "topk": {"block": 16, "k": 1, "sink": 1, "local": 1}}}]}
    compiled = _compile(block, spec)
    want_model = TopKReference(block, sp.TopK(block=16, k=1, sink=1, local=1, causal=True))
    with torch.set_grad_enabled(training):
        got, want = compiled(x), want_model(x)
    assert float((got - want).abs().max()) < 1e-5
    site = last_report().sites[0]
    assert site.pattern is not None and "topk" in site.pattern and site.reason is None
    if training:
        g_got = torch.autograd.grad(got.sum(), (x, block.qkv.weight))
        g_want = torch.autograd.grad(want.sum(), (x, block.qkv.weight))
        for a, b in zip(g_got, g_want, strict=True):
            assert float((a - b).abs().max()) < 1e-4
