"""The rewrite under ``torch.compile(dynamic=True)``: one graph for every length where the pattern
allows it, and guards only on what the matched rule reads.

Graphs are counted with dynamo's own counter (``counters["stats"]["unique_graphs"]``), and every
output is compared with :func:`spcompile.reference_attention` of the pattern that should have
run at that length, so a graph reused across a rule's threshold would show as a wrong output.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import spcompile as sp

HEAD_DIM = 8  # never equal to a length below: dynamo's duck sizing would tie the two symbols


class SdpaAttention(nn.Module):
    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class HandAttention(nn.Module):
    """Hand-written attention with a constant scale (the eager HuggingFace spelling)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)) / HEAD_DIM ** 0.5
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _run(model: nn.Module, spec: dict, lengths: Iterable[int | tuple[int, int]]
         ) -> tuple[list[tuple[int, int, torch.Tensor, tuple[torch.Tensor, ...]]], int]:
    """Compile with dynamic=True, call at each (q_len, kv_len); (results, graphs compiled)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="spcompile", dynamic=True,
                             options={"spec": spec, "inner": "eager", "report": False})
    results = []
    for n in lengths:
        q_len, kv_len = (n, n) if isinstance(n, int) else n
        torch.manual_seed(q_len * 1000 + kv_len)
        q = torch.randn(2, 2, q_len, HEAD_DIM)
        k, v = (torch.randn(2, 2, kv_len, HEAD_DIM) for _ in range(2))
        with torch.no_grad():
            results.append((q_len, kv_len, compiled(q, k, v), (q, k, v)))
    return results, counters["stats"]["unique_graphs"]


def _spec(*rules: dict) -> dict:
    return {"version": 1, "rules": list(rules)}


PATTERNS = {
    "sliding": ({"sliding": {"window": 5}}, sp.Sliding(window=5)),
    "sliding-causal": ({"sliding": {"window": 4, "causal": True}},
                       sp.Sliding(window=4, causal=True)),
    "blocked": ({"blocked": {"block": 8}}, sp.Blocked(block=8)),
    "strided": ({"strided": {"local": 4, "stride": 5}}, sp.Strided(local=4, stride=5)),
    "sinks+window": ({"any_of": [{"sliding": {"window": 6, "causal": True}},
                                 {"global": {"first": 2}}]},
                     sp.AnyOf(sp.Sliding(window=6, causal=True), sp.Global(first=2))),
    "bigbird": ({"block_layout": {"kind": "bigbird", "block": 8, "local": 3, "random": 1}},
                sp.BlockLayout(kind="bigbird", block=8, local=3, random=1)),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("model", [SdpaAttention, HandAttention], ids=["sdpa", "matmul"])
def test_one_graph_serves_every_length(name: str, model: type[nn.Module]) -> None:
    tree, pattern = PATTERNS[name]
    results, graphs = _run(model(), _spec({"match": "*", "pattern": tree}), (20, 27, 41, 64))
    assert graphs == 1
    for n, _, out, (q, k, v) in results:
        ref = sp.reference_attention(q, k, v, pattern)
        assert float((out - ref).abs().max()) < 1e-5, n
    report = sp.last_report()
    assert len(report.rewritten) == 1 and report.rewritten[0].pattern == pattern.key
    assert "s" in report.rewritten[0].shape  # the report shows the symbolic lengths


def test_queries_and_keys_of_different_lengths_share_the_graph() -> None:
    """Bottom-right alignment is applied by the op at run time (decode / KV cache shapes)."""
    pattern = sp.Sliding(window=4, causal=True)
    spec = _spec({"match": "*", "pattern": {"sliding": {"window": 4, "causal": True}}})
    results, graphs = _run(SdpaAttention(), spec, [(20, 30), (24, 40), (3, 37)])
    assert graphs == 1
    for _, _, out, (q, k, v) in results:
        assert float((out - sp.reference_attention(q, k, v, pattern)).abs().max()) < 1e-5


def test_min_seq_len_guards_its_threshold_only() -> None:
    """Lengths on one side of min_seq_len share a graph; crossing it recompiles once, to the
    other rule; coming back reuses the first graph."""
    spec = _spec({"match": {"module": "*", "min_seq_len": 32},
                  "pattern": {"sliding": {"window": 5}}},
                 {"match": "*", "pattern": {"blocked": {"block": 8}}})
    lengths = (20, 27, 32, 45, 31, 64, 21)
    results, graphs = _run(SdpaAttention(), spec, lengths)
    assert graphs == 2
    for n, _, out, (q, k, v) in results:
        pattern = sp.Sliding(window=5) if n >= 32 else sp.Blocked(block=8)
        ref = sp.reference_attention(q, k, v, pattern)
        assert float((out - ref).abs().max()) < 1e-5, n


def test_max_seq_len_leaves_longer_sites_dense() -> None:
    spec = _spec({"match": {"module": "*", "max_seq_len": 30},
                  "pattern": {"sliding": {"window": 3}}})
    results, graphs = _run(SdpaAttention(), spec, (20, 24, 40, 50))
    assert graphs == 2
    for n, _, out, (q, k, v) in results:
        pattern = sp.Sliding(window=3) if n <= 30 else sp.Dense()
        ref = sp.reference_attention(q, k, v, pattern)
        assert float((out - ref).abs().max()) < 1e-5, n
    assert sp.last_report().sites[0].reason == "no rule matched"


def test_neighborhood_specializes_to_its_grid() -> None:
    """A grid pattern only fits length == volume: it guards that, and other lengths stay
    dense with the reason."""
    spec = _spec({"match": "*", "pattern": {"neighborhood": {"shape": [4, 5], "window": 3}}})
    results, graphs = _run(SdpaAttention(), spec, (20, 24))
    assert graphs == 2
    (_, _, out20, qkv20), (_, _, out24, qkv24) = results
    grid = sp.Neighborhood(shape=(4, 5), window=3)
    assert float((out20 - sp.reference_attention(*qkv20, grid)).abs().max()) < 1e-5
    assert float((out24 - sp.reference_attention(*qkv24, sp.Dense())).abs().max()) < 1e-5
    (site,) = sp.last_report().sites
    assert not site.rewritten and "holds 20 tokens" in site.reason


def test_pattern_expression_of_seq_len_specializes() -> None:
    """``window: seq_len // 4`` is a different pattern at each length: one graph per length,
    each with its own window."""
    spec = _spec({"match": "*", "pattern": {"sliding": {"window": "seq_len // 4"}}})
    results, graphs = _run(SdpaAttention(), spec, (20, 28))
    assert graphs == 2
    for n, _, out, (q, k, v) in results:
        ref = sp.reference_attention(q, k, v, sp.Sliding(window=n // 4))
        assert float((out - ref).abs().max()) < 1e-5, n


def test_sdpa_is_causal_with_different_symbolic_lengths_stays_dense() -> None:
    """SDPA aligns is_causal top-left when q_len != kv_len and spcompile bottom-right: with
    two length symbols the detector guards on their equality instead of assuming it."""
    spec = _spec({"match": "*", "pattern": {"sliding": {"window": 64}}})
    model = SdpaAttention(causal=True)
    results, graphs = _run(model, spec, [(20, 30), (24, 36), (40, 40)])
    assert graphs == 2
    for q_len, kv_len, out, (q, k, v) in results:
        if q_len != kv_len:
            assert torch.allclose(out, model(q, k, v), atol=1e-6)
        else:
            pattern = sp.AnyOf(sp.Sliding(window=64), causal=True)  # the site's causality kept
            ref = sp.reference_attention(q, k, v, pattern)
            assert float((out - ref).abs().max()) < 1e-5
