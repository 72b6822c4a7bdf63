"""FULL lists as boxes of KV tiles: found where they are boxes, refused where they are not, and
the kernel's box loop visits exactly what the list loop visits."""

from __future__ import annotations

import pytest
import torch
from test_attention import CASES

import spcompile as sp
from spcompile.codegen.fwd import LaunchConfig, attn_fwd, fwd_source
from spcompile.plan.boxes import box_lists, box_offsets, tile_strides
from spcompile.plan.layout import TokenLayout
from spcompile.plan.tiles import ascending_lists, build_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _lists(rows: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    hits = torch.zeros(len(rows), n, dtype=torch.bool)
    for r, cols in enumerate(rows):
        hits[r, cols] = True
    return ascending_lists(hits)


def test_boxes_of_a_2d_tile_grid() -> None:
    layout = TokenLayout((12, 16), (4, 4))  # 3 x 4 tiles
    idx, cnt = _lists([[1, 2, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7], [11], []], 12)
    box = box_lists(idx, cnt, layout)
    assert box is not None
    assert box.tolist() == [[1, 2], [0, 4], [11, 1], [0, 1]]
    for bad in ([1, 2, 6], [3, 4], [0, 5]):  # an L, a wrap to the next row, a diagonal
        assert box_lists(*_lists([bad], 12), layout) is None, bad


def test_dilation_groups_are_separate_grids() -> None:
    layout = TokenLayout((8, 8), (2, 2), dilation=(2, 1))  # 2 groups of 2 x 4 tiles
    idx, cnt = _lists([[8, 9, 12, 13]], 16)  # a 2 x 2 box inside group 1
    assert box_lists(idx, cnt, layout).tolist() == [[8, 2]]
    assert box_lists(*_lists([[7, 8]], 16), layout) is None  # crosses from group 0 to 1


def test_offsets_enumerate_the_box_row_major() -> None:
    inner = tile_strides(TokenLayout((30, 48, 80), (2, 8, 8)))
    assert inner == (60, 10, 1)
    it = torch.arange(2 * 3 * 4)
    off = box_offsets(it, [torch.tensor(3), torch.tensor(4)], inner)
    expect = [a * 60 + b * 10 + c for a in range(2) for b in range(3) for c in range(4)]
    assert off.tolist() == expect


@pytest.mark.parametrize(("pattern", "s", "qt", "kt", "is_box"), [
    (sp.Sliding(window=1024), 16384, (128,), (64,), True),
    (sp.Blocked(block=1024), 16384, (128,), (64,), True),
    (sp.Sliding(window=4096, causal=True), 32768, (128,), (64,), True),
    (sp.Neighborhood(shape=(17, 23), window=(5, 7), dilation=(2, 1)), 391, (4, 4), (4, 4), True),
    (sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24), stride=(16, 8, 8)), 115200,
     (2, 8, 8), (2, 8, 8), True),
    (sp.Sliding(window=65) | sp.Global(first=16, rows=False), 512, (16,), (16,), False),
])
def test_which_plans_get_boxes(pattern, s: int, qt, kt, is_box: bool) -> None:
    plan = build_plan(pattern, s, s, qt, kt)
    assert (plan.full_box is not None) == is_box


STATIC = [c for c, (p, *_) in CASES.items() if p.static]


@pytest.mark.parametrize("case", STATIC)
def test_box_loop_equals_list_loop(case: str) -> None:
    """Same tiles in the same order: bit-identical under the interpreter."""
    pattern, sq, skv, qt, kt = CASES[case]
    plan = build_plan(pattern, sq, skv, qt, kt)
    gen = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(2, 2, n, 24, generator=gen).to(DEVICE) for n in (sq, skv, skv))
    box, box_lse = attn_fwd(q, k, v, plan, config=LaunchConfig(4, 2, box_loops=True))
    ref, ref_lse = attn_fwd(q, k, v, plan, config=LaunchConfig(4, 2, box_loops=False))
    if DEVICE == "cpu":
        assert torch.equal(box, ref) and torch.equal(box_lse, ref_lse)
    else:
        torch.testing.assert_close(box, ref, rtol=1e-5, atol=1e-5)
    uses_box = "f_corner" in fwd_source(plan, box=plan.full_box is not None)
    assert uses_box == (plan.full_box is not None)
