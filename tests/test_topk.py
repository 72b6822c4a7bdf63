"""TopK: the fast estimation equals the reference rule, its lists are the selection, and
attention over them equals attention under the selection's mask, forward and gradients.

The reference mask is built from the selection made on the same q and k (same dtype, same
device), so a near-tie that another precision would break differently cannot make a test flaky.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spcompile as sp
from spcompile.attention import sparse_attention
from spcompile.plan.tiles import build_plan
from spcompile.plan.topk import block_lists, estimate_blocks, selected_pairs
from spcompile.spec.topk import select_blocks

GPU = torch.cuda.is_available()

PATTERNS = {
    "k": sp.TopK(block=16, k=2, sink=1, local=1),
    "k-causal": sp.TopK(block=16, k=2, sink=1, local=2, causal=True),
    "k-shared": sp.TopK(block=16, k=1, sink=0, local=1, share_gqa=True),
    "coverage": sp.TopK(block=16, coverage=0.6, sink=1, local=1),
    "coverage-causal-shared": sp.TopK(block=16, coverage=0.8, local=1, causal=True,
                                      share_gqa=True),
    "k0": sp.TopK(block=16, k=0, sink=2, local=1, causal=True),
}


def _qkv(s: int, dtype: torch.dtype, device: str, seed: int, h: int = 4, h_kv: int = 2,
         d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)
    return make(2, h, s, d), make(2, h_kv, s, d), make(2, h_kv, s, d), make(2, h, s, d)


def _full_selection(p: sp.TopK, q, k) -> torch.Tensor:
    sel = estimate_blocks(p, q, k)
    return sel.repeat_interleave(q.shape[1] // k.shape[1], 1) if p.share_gqa else sel


# ---------------------------------------------------------------------------------------------
# Estimation


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [160, 157])
def test_estimate_equals_reference(name, dtype, s):
    p = PATTERNS[name]
    q, k, _, _ = _qkv(s, dtype, "cpu", seed=s)
    assert torch.equal(_full_selection(p, q, k), select_blocks(p, q, k))


def test_ties_go_to_the_lower_block():
    """Constant keys give every block the same score: the k lowest candidates win."""
    p = sp.TopK(block=8, k=3, sink=1, local=1)
    q = torch.randn(1, 1, 64, 8)
    k = torch.ones(1, 1, 64, 8)
    sel = estimate_blocks(p, q, k)[0, 0]
    assert torch.equal(sel, select_blocks(p, q, k)[0, 0])
    # Row 5: sink 0, local 5, then the three lowest others: 1, 2, 3.
    assert sel[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]


def test_k_covering_every_block_is_dense():
    p = sp.TopK(block=8, k=100, sink=0, local=0)
    q, k, v, _ = _qkv(40, torch.float64, "cpu", seed=1)
    assert bool(estimate_blocks(p, q, k).all())
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    got = sparse_attention(q, k, v, p, impl="torch")
    assert float((got - want).abs().max()) < 1e-12


def test_selection_is_block_sized_not_token_sized():
    """The selection of a 64k-token sequence is [B, H, 1024, 1024] bits, not [S, S]."""
    p = sp.TopK(block=64, k=16, sink=1, local=2)
    q = torch.randn(1, 1, 65536, 8)
    sel = estimate_blocks(p, q, q)
    assert sel.shape == (1, 1, 1024, 1024)
    # 1 sink + 2 local + 16 chosen; in rows 0 and 1 the sink is also a local block.
    counts = sel.sum(-1)[0, 0]
    assert counts[:2].tolist() == [17, 18] and bool((counts[2:] == 19).all())


# ---------------------------------------------------------------------------------------------
# Lists


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("s", [160, 157])
def test_lists_are_the_selection(name, s):
    p = PATTERNS[name]
    q, k, _, _ = _qkv(s, torch.float32, "cpu", seed=7)
    sel = estimate_blocks(p, q, k)
    n = sel.shape[-1]
    for transposed in (False, True):
        lists = block_lists(p, sel, s, q.shape[1], transposed)
        assert lists.heads_per_list == (2 if p.share_gqa else 1)
        got = torch.zeros(sel.shape[0] * sel.shape[1], n, n, dtype=torch.bool)
        for idx, cnt, partial in ((lists.full_idx, lists.full_cnt, False),
                                  (lists.part_idx, lists.part_cnt, True)):
            slots = torch.arange(idx.shape[-1]) < cnt[..., None]
            assert bool((idx[..., 1:] >= idx[..., :-1])[slots[..., 1:]].all()), "ascending"
            rows = torch.arange(n)[None, :, None].expand_as(idx)
            lids = torch.arange(idx.shape[0])[:, None, None].expand_as(idx)
            r, c = (idx, rows) if transposed else (rows, idx)
            assert not got[lids[slots], r[slots].long(), c[slots].long()].any(), "listed twice"
            got[lids[slots], r[slots].long(), c[slots].long()] = True
            # A tile is PARTIAL exactly when it is the diagonal (causal) or the ragged last one.
            needs_mask = ((r == c) & p.causal) | ((c == n - 1) & (s % p.block != 0))
            assert bool((needs_mask[slots] == partial).all())
        assert torch.equal(got, sel.reshape(-1, n, n))


@pytest.mark.parametrize("name", ["k", "k-causal", "k0"])
@pytest.mark.parametrize("n", [1, 10, 21])
def test_select_kernel_equals_the_reference_ranking(name, n):
    """The Triton row ranking (used on GPUs) against the stable sort, with exact ties and
    zero probabilities planted in every row."""
    from spcompile.plan.topk_kernels import select_rows
    from spcompile.spec.topk import rank_blocks

    p = PATTERNS[name]
    gen = torch.Generator().manual_seed(n)
    probs = torch.rand(1, 2, n, n, generator=gen)
    probs[..., ::3] = 0.25  # ties
    probs[..., 1::4] = 0.0  # underflowed candidates are still candidates
    dev = "cuda" if GPU else "cpu"
    assert torch.equal(select_rows(p, probs.to(dev)).cpu(), rank_blocks(p, probs))
    wide = dataclasses.replace(p, k=n + 3)  # k beyond the row: every eligible block
    assert torch.equal(select_rows(wide, probs.to(dev)).cpu(), rank_blocks(wide, probs))


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("s", [160, 157])
def test_compact_kernel_equals_the_torch_lists(name, s):
    """The Triton compaction (used on GPUs) makes the same lists as ``ascending_lists``, rows
    and transposed, ragged and causal."""
    from spcompile.plan.topk_kernels import compact_rows

    p = PATTERNS[name]
    q, k, _, _ = _qkv(s, torch.float32, "cpu", seed=3)
    sel = estimate_blocks(p, q, k)
    n, dev = sel.shape[-1], "cuda" if GPU else "cpu"
    for transposed in (False, True):
        want = block_lists(p, sel, s, q.shape[1], transposed)
        m = sel.reshape(-1, n, n)
        m = m.transpose(1, 2) if transposed else m
        ragged = s % p.block != 0
        got = compact_rows(m.to(dev), want.full_idx.shape[-1], want.part_idx.shape[-1], p.causal,
                           n - 1 if ragged and not transposed else -1,
                           n - 1 if ragged and transposed else -1)
        for a, b in zip(got, (want.full_idx, want.full_cnt, want.part_idx, want.part_cnt),
                        strict=True):
            assert torch.equal(a.cpu(), b)


def test_static_half_of_the_plan():
    p = sp.TopK(block=16, k=2, local=1, causal=True)
    plan = build_plan(p, 50, 50)
    assert plan.q_tile == plan.kv_tile == (16,)
    # Eligible tiles of 4 blocks, causal: 10, of which the 4 diagonal ones are partial.
    assert plan.num_full == 6 and plan.num_partial == 4
    with pytest.raises(ValueError, match="TopK tiles are its blocks"):
        build_plan(p, 50, 50, q_tile=32, kv_tile=32)


def test_selected_pairs_counts_the_mask():
    p = sp.TopK(block=16, k=1, local=1, causal=True)
    q, k, _, _ = _qkv(50, torch.float32, "cpu", seed=2)
    sel = estimate_blocks(p, q, k)
    assert selected_pairs(p, sel, 50) == int(sp.dense_mask(p, 50, 50, q=q, k=k).sum())


# ---------------------------------------------------------------------------------------------
# Attention over the selection


def _reference(p: sp.TopK, q, k, v):
    """(out, lse, q, k, v) in float64 on the CPU: dense attention under the mask of the
    selection made on these q and k; the returned q, k, v require grad."""
    s = q.shape[2]
    blocks = _full_selection(p, q, k).cpu()
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    mask = blocks[:, :, i // p.block, j // p.block] & ((j <= i) if p.causal else True)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = qd @ kd.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return probs @ vd.repeat_interleave(group, 1), lse, qd, kd, vd


def _check(p, q, k, v, do, impl, tol):
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = sparse_attention(qg, kg, vg, p, impl=impl, return_lse=True)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    ref, ref_lse, qd, kd, vd = _reference(p, q, k, v)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), do.cpu().double())
    for name, got, want, size in (("out", out, ref, v), ("dq", grads[0], ref_grads[0], q),
                                  ("dk", grads[1], ref_grads[1], k),
                                  ("dv", grads[2], ref_grads[2], v)):
        got = got.detach().cpu().double()
        assert not got.isnan().any(), f"{name} has NaN"
        err = float((got - want).norm() / size.detach().cpu().double().norm())
        assert err < tol, f"{name}: error {err:.2e} (tolerance {tol:.0e})"
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("s", [160, 157])
def test_torch_path(name, s):
    q, k, v, do = _qkv(s, torch.float64, "cpu", seed=s + len(name))
    _check(PATTERNS[name], q, k, v, do, "torch", 1e-10)


TRITON_NAMES = list(PATTERNS) if GPU else ["k-causal", "coverage-causal-shared"]


@pytest.mark.parametrize("name", TRITON_NAMES)
@pytest.mark.parametrize("s", [64, 57])
def test_triton(name, s):
    device = "cuda" if GPU else "cpu"
    q, k, v, do = _qkv(s, torch.float32, device, seed=s + len(name))
    _check(PATTERNS[name], q, k, v, do, "triton", 1e-4)


@pytest.mark.skipif(not GPU, reason="half-precision kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_triton_half(dtype, d):
    for base in PATTERNS.values():
        for block in (64, 128):
            p = dataclasses.replace(base, block=block)
            q, k, v, do = _qkv(1000, dtype, "cuda", seed=d + block, d=d)
            _check(p, q, k, v, do, "triton", 3e-2)


def test_per_head_mix_with_topk():
    topk = sp.TopK(block=16, k=1, local=1, causal=True)
    p = sp.PerHead({"0-1": sp.Dense(), "2-": topk})
    q, k, v, _ = _qkv(48, torch.float64, "cpu", seed=5)
    got = sparse_attention(q, k, v, p, impl="torch")
    dense = sp.reference_attention(q[:, :2], k[:, :1], v[:, :1], sp.Dense())
    assert float((got[:, :2] - dense).abs().max()) < 1e-12
    assert float((got[:, 2:] - _reference(topk, q[:, 2:], k[:, 1:], v[:, 1:])[0]).abs().max()) \
        < 1e-12


def test_compiles_without_graph_break():
    p = sp.TopK(block=16, k=1, local=1, causal=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    fn = torch.compile(lambda q, k, v: sparse_attention(q, k, v, p, impl="torch"),
                       fullgraph=True, backend="eager")
    q, k, v, _ = _qkv(48, torch.float32, "cpu", seed=6)
    assert float((fn(q, k, v) - sparse_attention(q, k, v, p, impl="torch")).abs().max()) < 1e-6
    assert not counts["graph_break"]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_key_mask_with_topk(impl):
    p = PATTERNS["k-causal"]
    dtype = torch.float64 if impl == "torch" else torch.float32
    device = "cuda" if impl == "triton" and GPU else "cpu"
    q, k, v, _ = _qkv(57, dtype, device, seed=11)
    allowed = torch.rand(2, 57, generator=torch.Generator().manual_seed(0)) > 0.3
    got = sparse_attention(q, k, v, p, impl=impl, key_mask=allowed.to(device))
    blocks = _full_selection(p, q, k).cpu()
    i, j = torch.arange(57)[:, None], torch.arange(57)[None, :]
    mask = blocks[:, :, i // p.block, j // p.block] & (j <= i) & allowed[:, None, None, :]
    scores = q.cpu().double() @ k.cpu().double().repeat_interleave(2, 1).transpose(-1, -2) / 4
    want = torch.nan_to_num(scores.masked_fill(~mask, float("-inf")).softmax(-1)) \
        @ v.cpu().double().repeat_interleave(2, 1)
    assert float((got.cpu().double() - want).abs().max()) < (1e-10 if impl == "torch" else 1e-5)
