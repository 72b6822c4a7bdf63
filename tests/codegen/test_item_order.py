"""Head-major item order against rank-major: the same programs, numbered differently.

Each work item computes the same thing whichever program runs it, so under the interpreter the
two orders agree bit for bit (on a GPU too: no item's arithmetic depends on the order).
"""

from __future__ import annotations

import pytest
import torch
from test_attention import CASES

import spcompile as sp
from spcompile.codegen import fwd
from spcompile.codegen.fwd import LaunchConfig, attn_fwd, fwd_source
from spcompile.plan.tiles import build_plan
from spcompile.plan.topk import block_lists, estimate_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(sq: int, skv: int, seed: int, h: int = 4, h_kv: int = 2):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    return make(2, h, sq, 16), make(2, h_kv, skv, 16), make(2, h_kv, skv, 16)


def _both_orders(plan, q, k, v, persistent: bool = False, lists=None) -> None:
    rank, rank_lse = attn_fwd(q, k, v, plan, lists=lists,
                              config=LaunchConfig(4, 2, persistent=persistent))
    head, head_lse = attn_fwd(q, k, v, plan, lists=lists,
                              config=LaunchConfig(4, 2, persistent=persistent, head_major=True))
    assert torch.equal(rank, head) and torch.equal(rank_lse, head_lse)


@pytest.mark.parametrize("case", ["sliding-decode", "na3d-causal-dil", "stripes-gathered"])
@pytest.mark.parametrize("persistent", [False, True])
def test_head_major_equals_rank_major(case: str, persistent: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fwd, "num_sms", lambda device: 2)  # persistent programs loop
    pattern, sq, skv, qt, kt = CASES[case]
    plan = build_plan(pattern, sq, skv, qt, kt)
    _both_orders(plan, *_qkv(sq, skv, seed=len(case)), persistent=persistent)


def test_head_major_with_runtime_lists() -> None:
    pattern = sp.TopK(block=16, k=1, sink=1, local=1, causal=True)
    s = 57
    q, k, v = _qkv(s, s, seed=5)
    plan = build_plan(pattern, s, s)
    _both_orders(plan, q, k, v, lists=block_lists(pattern, estimate_blocks(pattern, q, k), s, 4))


def test_orders_number_items_differently() -> None:
    plan = build_plan(sp.Sliding(window=7, causal=True), 40, 40, (16,), (16,))  # 3 Q tiles
    assert "rank = pid // BH" in fwd_source(plan)
    assert "bh = pid // 3" in fwd_source(plan, head_major=True)
    assert "bh = work // 3" in fwd_source(plan, persistent=True, head_major=True)


@pytest.mark.parametrize("case", ["sliding-decode", "stripes-gathered"])
def test_backward_orders_agree(case: str) -> None:
    """dK/dV and dQ programs numbered head-major compute what tile-major ones do (the gathered
    dK/dV kernel of stripes-gathered included)."""
    from spcompile.codegen.bwd import attn_bwd, dkdv_source

    pattern, sq, skv, qt, kt = CASES[case]
    plan = build_plan(pattern, sq, skv, qt, kt)
    q, k, v = _qkv(sq, skv, seed=11)
    out, lse = attn_fwd(q, k, v, plan)
    do = torch.randn_like(out)
    grads = [attn_bwd(do, q, k, v, out, lse, plan, config=LaunchConfig(4, 2, head_major=hm))
             for hm in (False, True)]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert f"bhk = pid // {plan.num_kv_tiles}" in dkdv_source(plan, head_major=True)
