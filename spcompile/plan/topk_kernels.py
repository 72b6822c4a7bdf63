"""Triton kernels of TopK's dynamic half: rank the blocks of each query-block row, and compact a
selection into visiting lists, one program per row.

In PyTorch both steps are several passes over [L, n, n] (int64 keys, a top-k, a scatter; then
int32 keys and another top-k per list), and at 64k tokens they cost more than the attention
they select. Here each row of ``n`` block probabilities is read once into registers:

- ``select_rows`` takes the forced blocks, then ``k`` times the largest remaining candidate
  (``tl.argmax`` breaks ties to the lower column), stopping at candidates below 0 (the
  ineligible ones). That is exactly the reference's stable descending sort
  (``spec.topk.rank_blocks``); tests compare them bit for bit.
- ``compact_rows`` writes each row's selected columns in ascending order through a prefix sum,
  split into FULL and PARTIAL tiles by the same rule as ``partial_blocks``, in the format of
  ``tiles.ascending_lists``. Given transposed strides it makes dK/dV's per key tile lists.

Both run under ``TRITON_INTERPRET=1`` on a CPU, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..spec.patterns import TopK


@triton.jit
def _select_kernel(probs_ptr, sel_ptr, n, sink, local, take,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = row % n
    cols = tl.arange(0, BLOCK_N)
    inside = cols < n
    p = tl.load(probs_ptr + row * n + cols, mask=inside, other=0.0)
    eligible = inside & (cols <= r) if CAUSAL else inside
    forced = eligible & ((cols < sink) | ((cols <= r) & (cols > r - local)))
    candidate = tl.where(eligible & ~forced, p, -1.0)
    chosen = forced
    for _ in range(take):
        best = tl.max(candidate, 0)
        at = tl.argmax(candidate, 0, tie_break_left=True)
        hit = cols == tl.where(best >= 0, at, -1)
        chosen = chosen | hit
        candidate = tl.where(hit, -1.0, candidate)
    tl.store(sel_ptr + row * n + cols, chosen.to(tl.uint8), mask=inside)


def select_rows(pattern: TopK, probs: Tensor) -> Tensor:
    """Bool [..., n, n]: the forced blocks and the ``pattern.k`` most probable candidates of
    each row of ``probs`` (float32, contiguous), ties to the lower column."""
    assert pattern.k is not None and probs.dtype == torch.float32
    probs = probs.contiguous()
    n = probs.shape[-1]
    sel = torch.empty(probs.shape, dtype=torch.bool, device=probs.device)
    rows = probs.numel() // n if n else 0
    if rows:
        block = triton.next_power_of_2(n)
        _select_kernel[(rows,)](probs, sel.view(torch.uint8), n, pattern.sink, pattern.local,
                                min(pattern.k, n), CAUSAL=pattern.causal, BLOCK_N=block,
                                num_warps=_warps(block))
    return sel


@triton.jit
def _compact_kernel(hits_ptr, stride_l, stride_r, stride_c, full_idx_ptr, full_cnt_ptr,
                    part_idx_ptr, part_cnt_ptr, n, full_width, part_width, part_col, part_row,
                    DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lst, r = row // n, row % n
    cols = tl.arange(0, BLOCK_N)
    inside = cols < n
    hit = tl.load(hits_ptr + lst * stride_l + r * stride_r + cols * stride_c, mask=inside,
                  other=0) != 0
    part = (cols == part_col) | (r == part_row)
    if DIAGONAL:
        part = part | (cols == r)
    full, partial = hit & ~part, hit & part
    at = tl.cumsum(full.to(tl.int32), 0) - 1
    tl.store(full_idx_ptr + row * full_width + at, cols, mask=full & (at < full_width))
    tl.store(full_cnt_ptr + row, tl.sum(full.to(tl.int32), 0))
    at = tl.cumsum(partial.to(tl.int32), 0) - 1
    tl.store(part_idx_ptr + row * part_width + at, cols, mask=partial & (at < part_width))
    tl.store(part_cnt_ptr + row, tl.sum(partial.to(tl.int32), 0))


def compact_rows(hits: Tensor, full_width: int, part_width: int, diagonal: bool,
                 part_col: int = -1, part_row: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Visiting lists of ``hits`` [L, n, n] (bool, any strides): (full_idx [L, n, full_width],
    full_cnt [L, n], part_idx [L, n, part_width], part_cnt [L, n]), int32, indices ascending,
    padded with 0. PARTIAL: the diagonal when ``diagonal``, column ``part_col`` and row
    ``part_row`` (-1: none). The widths must hold every row (counts are exact either way)."""
    lists, n, _ = hits.shape
    dev = hits.device
    full_idx = torch.zeros(lists, n, full_width, dtype=torch.int32, device=dev)
    part_idx = torch.zeros(lists, n, part_width, dtype=torch.int32, device=dev)
    full_cnt = torch.empty(lists, n, dtype=torch.int32, device=dev)
    part_cnt = torch.empty(lists, n, dtype=torch.int32, device=dev)
    if lists * n:
        block = triton.next_power_of_2(n)
        _compact_kernel[(lists * n,)](
            hits.view(torch.uint8), *hits.stride(), full_idx, full_cnt, part_idx, part_cnt, n,
            full_width, part_width, part_col, part_row, DIAGONAL=diagonal, BLOCK_N=block,
            num_warps=_warps(block))
    return full_idx, full_cnt, part_idx, part_cnt


def _warps(block: int) -> int:
    """About eight row elements per thread, 1 to 16 warps."""
    return max(1, min(16, block // 256))
