"""TopK at run time: estimate the block selection, then turn it into the kernels' visiting lists.

A TopK plan has two halves. The static half is an ordinary ``TilePlan`` (``build_plan`` of the
TopK pattern): 1-D layouts with tiles of exactly one block, the generated kernels, and which
tiles need a mask at all (the diagonal when causal, the last block when the length is ragged).
The dynamic half is ``BlockLists``: per (batch, head) lists of the selected KV tiles in the same
format as a static plan's lists, with a leading list dimension. The kernels read them through
one extra offset per program; the CPU path and the backward read them the same way.

Estimation is ``block_probs`` (pooled q and k, one small matmul, softmax) shared with the
reference rule, then a top-k on integer keys that carry the probability's bits above the
negated column index: the largest key is the highest probability, ties to the lower column,
exactly the reference's stable descending sort, at the cost of a top-k instead of a sort.
Everything here is O((S / block)^2), never O(S^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec.patterns import TopK
from ..spec.topk import block_probs, eligible_blocks, forced_blocks, rank_blocks
from .tiles import ascending_lists
from .topk_kernels import compact_rows, select_rows


def estimate_blocks(pattern: TopK, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Bool [B, Hs, n, n]: the selected key blocks per query block (Hs = H, or H_kv when a GQA
    group shares one selection). Equals ``spec.topk.select_blocks`` (before its repeat)."""
    probs = block_probs(pattern, q, k, scale)
    if pattern.k is None or probs.dtype != torch.float32:
        return rank_blocks(pattern, probs)  # coverage needs the sorted prefix sums
    if probs.is_cuda:
        return select_rows(pattern, probs)  # one pass over each row, in registers
    n = probs.shape[-1]
    forced = forced_blocks(pattern, n, probs.device)
    candidate = eligible_blocks(pattern, n, probs.device) & ~forced
    take = min(pattern.k, n)
    if take == 0:
        return forced.expand(probs.shape).clone()
    # Probabilities are >= 0, so their IEEE bits order like the values.
    column = torch.arange(n - 1, -1, -1, device=probs.device, dtype=torch.int64)
    key = (probs.view(torch.int32).to(torch.int64) << 32) | column
    key = key.masked_fill(~candidate, -1)
    top = key.topk(take, dim=-1, sorted=False)
    chosen = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    chosen.scatter_(-1, top.indices, top.values >= 0)
    return forced | chosen


def partial_blocks(pattern: TopK, n: int, kv_len: int, device: torch.device) -> Tensor:
    """Bool [n, n]: block pairs whose tile needs a mask: the diagonal when causal, and the last
    key block when the length is not a multiple of the block (its padding keys)."""
    out = torch.zeros(n, n, dtype=torch.bool, device=device)
    if pattern.causal:
        out.fill_diagonal_(True)
    if kv_len % pattern.block:
        out[:, n - 1] = True
    return out


@dataclass(frozen=True)
class BlockLists:
    """Visiting lists of one selection: index ``l = b * Hs + hs`` leads every tensor.

    ``heads_per_list`` query heads share a list (the GQA group with ``share_gqa``, else 1).
    """

    full_idx: Tensor  # int32 [L, n_tiles, W]
    full_cnt: Tensor  # int32 [L, n_tiles]
    part_idx: Tensor
    part_cnt: Tensor
    heads_per_list: int

    @property
    def num_lists(self) -> int:
        return self.full_cnt.shape[0]


def block_lists(pattern: TopK, sel: Tensor, kv_len: int, heads: int,
                transposed: bool = False) -> BlockLists:
    """The lists the kernels read for selection ``sel`` [B, Hs, n, n] (bool).

    Forward and dQ visit per query tile (rows); ``transposed`` gives dK/dV's per key tile lists
    (columns). FULL tiles skip the mask; PARTIAL ones (``partial_blocks``) evaluate it. A
    top-k row holds at most ``sink + local + k`` blocks and one PARTIAL (the diagonal, or the
    ragged last column, which a causal row only reaches on the diagonal); otherwise the widths
    are the longest row (one sync).
    """
    b, hs, n, _ = sel.shape
    m = sel.reshape(b * hs, n, n)
    if transposed:
        m = m.transpose(1, 2)
    if pattern.k is not None and not transposed:
        width, part_width = min(n, pattern.sink + pattern.local + pattern.k), 1
    else:
        width = part_width = max(1, int(m.sum(-1, dtype=torch.int32).max())) if m.numel() else 1
    ragged = kv_len % pattern.block != 0
    if m.is_cuda:
        col = n - 1 if ragged and not transposed else -1
        row = n - 1 if ragged and transposed else -1
        lists = compact_rows(m, width, part_width, pattern.causal, col, row)
    else:
        part = partial_blocks(pattern, n, kv_len, sel.device)
        part = part.T if transposed else part
        full_idx, full_cnt = ascending_lists(m & ~part, width)
        part_idx, part_cnt = ascending_lists(m & part, part_width)
        lists = full_idx, full_cnt, part_idx, part_cnt
    return BlockLists(*lists, heads // hs)


def selected_pairs(pattern: TopK, sel: Tensor, q_len: int) -> int:
    """Allowed (query, key) pairs of a selection, per (batch, head) list summed: for measuring
    what a run computed (the FLOP bound of that input)."""
    n, block = sel.shape[-1], pattern.block
    sizes = torch.full((n,), block, dtype=torch.float64, device=sel.device)
    sizes[-1] = q_len - (n - 1) * block
    area = sizes[:, None] * sizes[None, :]
    if pattern.causal:
        diag = sizes * (sizes + 1) / 2
        area = torch.where(torch.eye(n, dtype=torch.bool, device=sel.device), diag[:, None], area)
    return int((sel.to(torch.float64) * area).sum())


def estimation_passes(pattern: TopK, batch: int, heads: int, kv_heads: int, seq_len: int,
                      head_dim: int, elem_bytes: int) -> list[tuple[str, float, float]]:
    """(what, bytes moved, fp32 matrix FLOPs) of every device pass that ``estimate_blocks`` and
    ``block_lists`` make on a GPU, in order: the simulator's cost of TopK's dynamic half.

    PyTorch makes the pooled scores (a few kernels over [B, H, n, n], n = blocks, and one fp32
    matmul); the ranking and the lists are one Triton pass each (``topk_kernels``), except
    for coverage, which ranks by PyTorch's sort and prefix sums.
    """
    n = -(-seq_len // pattern.block)
    lists = batch * (kv_heads if pattern.share_gqa else heads)
    nn = batch * heads * n * n  # elements of the score matrix
    sel = lists * n * n
    passes = [
        ("pool q and k", (heads + kv_heads) * batch * seq_len * head_dim * elem_bytes, 0.0),
        ("score pooled blocks", nn * 4, 2.0 * nn * head_dim),
    ]
    if pattern.causal:
        passes.append(("mask later blocks", nn * 4 * 2, 0.0))
    passes.append(("softmax", nn * 4 * 2, 0.0))
    if pattern.share_gqa:
        passes.append(("average GQA groups", nn * 4 + sel * 4, 0.0))
    if pattern.k is not None:
        passes.append(("rank rows (Triton)", sel * (4 + 1), 0.0))
        width = min(n, pattern.sink + pattern.local + pattern.k) + 1
    else:
        passes += [("stable sort", sel * 4 * 8, 0.0), ("prefix sums and scatter", sel * 16, 0.0)]
        width = n + 1  # at most; the run syncs once for the longest row
    passes.append(("visiting lists (Triton)", sel + lists * n * width * 4 * 2, 0.0))
    return passes


def rank_steps(pattern: TopK, batch: int, heads: int, kv_heads: int, seq_len: int) -> int:
    """Row elements the ranking kernel (``topk_kernels.select_rows``) scans: each of a row's
    ``k`` rounds reads the whole (power-of-two padded) row. 0 for coverage (a sort instead)."""
    if pattern.k is None:
        return 0
    n = -(-seq_len // pattern.block)
    rows = batch * (kv_heads if pattern.share_gqa else heads) * n
    return rows * min(pattern.k, n) * (1 << max(n - 1, 0).bit_length())


#: Device kernels per pass of ``estimation_passes`` (each PyTorch op or Triton kernel is one;
#: pooling and the causal mask take a few).
LAUNCHES_PER_PASS = 2
