"""TokenLayout: the token permutation every kernel, the CPU path and the simulator share.

Checked on seeded random 1-3-D grids, dilations and tiles, sizes not divisible by the tile
included (17x23, 5x7x3):

- ``token_index`` is a permutation of range(S) plus -1 padding, and each tile's tokens are the
  box the module docstring names (one dilation group, contiguous group coordinates, row-major
  inside the box, the box's lower corner at ``box * tile``);
- ``permute`` / ``unpermute`` round-trip exactly (no tolerance), along any dim and for float and
  integer dtypes, with zeros at padding;
- ``is_identity`` layouts are the plain flat order (padding only at the end).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from spcompile.plan.layout import TokenLayout

CASES = 60


def random_layout(rng: random.Random, ndim: int | None = None) -> TokenLayout:
    ndim = ndim or rng.randint(1, 3)
    side = {1: 90, 2: 24, 3: 9}[ndim]
    grid = tuple(rng.randint(1, side) for _ in range(ndim))
    dilation = tuple(rng.choice([1, 1, 1, 2, 3]) if n >= 2 else 1 for n in grid)
    tile = tuple(rng.randint(1, max(1, min(12, -(-n // d) + 2))) if ndim > 1
                 else rng.randint(1, 40) for n, d in zip(grid, dilation, strict=True))
    return TokenLayout(grid, tile, dilation)


def layouts(seed: int, cases: int = CASES) -> list[TokenLayout]:
    rng = random.Random(seed)
    fixed = [
        TokenLayout((17, 23), (4, 8)),
        TokenLayout((17, 23), (4, 8), (2, 3)),
        TokenLayout((5, 7, 3), (2, 4, 2)),
        TokenLayout((5, 7, 3), (2, 2, 2), (2, 3, 1)),
        TokenLayout((37,), (16,)),
        TokenLayout((37,), (5,), (3,)),
        TokenLayout((3, 4), (8, 8)),  # tile larger than the grid
    ]
    return fixed + [random_layout(rng) for _ in range(cases)]


def coords_of(flat: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    out = []
    for a in range(len(grid)):
        out.append((flat // math.prod(grid[a + 1 :])) % grid[a])
    return out


def box_problems(layout: TokenLayout) -> list[str]:
    """Every way tiles of ``layout`` fail to be the boxes the layout promises (empty: none)."""
    index = layout.token_index()
    problems = []
    tiles = index.view(layout.num_tiles, layout.tile_size)
    for t in range(layout.num_tiles):
        rows = tiles[t]
        valid = rows[rows >= 0]
        if valid.numel() == 0:
            continue
        group = (t // layout.tiles_per_group)
        box = t % layout.tiles_per_group
        want_group = [(group // math.prod(layout.dilation[a + 1 :])) % layout.dilation[a]
                      for a in range(layout.ndim)]
        want_box = [(box // math.prod(layout.tiles_per_axis[a + 1 :])) % layout.tiles_per_axis[a]
                    for a in range(layout.ndim)]
        xs = coords_of(valid, layout.grid)
        ranges = []
        for a, x in enumerate(xs):
            d = layout.dilation[a]
            if bool((x % d != want_group[a]).any()):
                problems.append(f"tile {t}: axis {a} coords {x.tolist()} leave dilation group "
                                f"{want_group[a]} (dilation {d})")
                continue
            g = torch.unique(x // d)
            lo = want_box[a] * layout.tile[a]
            if g.numel() > layout.tile[a] or int(g[0]) != lo or \
                    g.tolist() != list(range(lo, lo + g.numel())):
                problems.append(f"tile {t}: axis {a} group coords {g.tolist()} are not the "
                                f"run starting at {lo} of at most {layout.tile[a]}")
            ranges.append((g * d + want_group[a]).tolist())
        if len(ranges) != layout.ndim:
            continue
        # The tile is exactly the product of its per-axis ranges, row-major.
        box_tokens = []
        for c in itertools.product(*ranges):
            flat = 0
            for a, x in enumerate(c):
                flat = flat * layout.grid[a] + x
            box_tokens.append(flat)
        if valid.tolist() != box_tokens:
            problems.append(f"tile {t}: tokens {valid.tolist()[:12]}... are not the row-major "
                            f"box {[(r[0], r[-1]) for r in ranges]}")
    return problems


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_token_index_is_permutation_plus_padding(seed):
    for layout in layouts(seed):
        index = layout.token_index()
        assert index.dtype == torch.long and index.shape == (layout.padded_len,), layout
        valid = index[index >= 0]
        bad = index[(index < -1)]
        assert bad.numel() == 0, f"{layout}: entries below -1: {bad.tolist()[:8]}"
        assert torch.equal(valid.sort().values, torch.arange(layout.num_tokens)), (
            f"{layout}: valid entries are not a permutation of range({layout.num_tokens}); "
            f"missing {sorted(set(range(layout.num_tokens)) - set(valid.tolist()))[:8]}, "
            f"{valid.numel()} valid entries")
        assert layout.padded_len == layout.num_tiles * layout.tile_size
        assert layout.num_tiles == math.prod(layout.dilation) * math.prod(layout.tiles_per_axis)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiles_are_boxes_in_one_dilation_group(seed):
    for layout in layouts(seed):
        problems = box_problems(layout)
        assert not problems, f"{layout}:\n" + "\n".join(problems[:5])


def test_box_check_can_fail():
    """The box check catches a layout whose tiles are not boxes (a shuffled token_index)."""

    class Shuffled(TokenLayout):
        def token_index(self):
            index = super().token_index()
            return index.flip(0)

    assert box_problems(Shuffled((17, 23), (4, 8)))
    assert not box_problems(TokenLayout((17, 23), (4, 8)))


def test_padding_sits_where_boxes_leave_the_grid():
    layout = TokenLayout((17, 23), (4, 8))
    assert layout.tiles_per_axis == (5, 3)
    index = layout.token_index().view(15, 4, 8)
    # Last tile row (rows 16..19): only row 16 exists; last tile column (cols 16..23): 7 exist.
    assert (index[12:, 1:] == -1).all()
    assert (index[[2, 5, 8, 11, 14], :, 7] == -1).all()
    assert int((index >= 0).sum()) == 17 * 23
    # Dilation groups: 17 = 9 + 8 rows, 23 = 8 + 8 + 7 columns.
    dil = TokenLayout((17, 23), (4, 4), (2, 3))
    assert dil.group_extent == (9, 8) and dil.tiles_per_axis == (3, 2) and dil.num_groups == 6
    per_group = (dil.token_index() >= 0).view(6, -1).sum(1).tolist()
    assert per_group == [9 * 8, 9 * 8, 9 * 7, 8 * 8, 8 * 8, 8 * 7], per_group


@pytest.mark.parametrize("seed", [0, 1])
def test_permute_unpermute_round_trip_exact(seed):
    gen = torch.Generator().manual_seed(seed)
    for n, layout in enumerate(layouts(seed, cases=30)):
        s = layout.num_tokens
        cases = [
            (torch.randn(2, 3, s, 5, generator=gen), -2),
            (torch.randn(s, 4, generator=gen, dtype=torch.float64), 0),
            (torch.randint(-100, 100, (3, s), generator=gen), 1),
            (torch.randn(2, s, 3, generator=gen).to(torch.bfloat16), 1),
        ]
        for x, dim in cases:
            y = layout.permute(x, dim)
            d = dim % x.dim()
            assert y.shape[d] == layout.padded_len and y.dtype == x.dtype
            index = layout.token_index()
            # Row k of the permuted tensor is token index[k], zero at padding.
            want = x.index_select(d, index.clamp_min(0))
            pad = (index < 0).nonzero().squeeze(1)
            want.index_fill_(d, pad, 0)
            assert torch.equal(y, want), f"case {n} {layout} dim {dim}: permute differs"
            back = layout.unpermute(y, dim)
            if not torch.equal(back, x):
                where = (back != x).nonzero()[:5].tolist()
                raise AssertionError(f"case {n} {layout} dim {dim} {x.dtype}: round trip "
                                     f"differs at {where}")


def test_unpermute_ignores_padding_rows():
    layout = TokenLayout((5, 7, 3), (2, 4, 2), (1, 2, 1))
    x = torch.randn(layout.num_tokens, 6)
    y = layout.permute(x, 0)
    y[layout.token_index() < 0] = float("nan")
    assert torch.equal(layout.unpermute(y, 0), x)


def test_permute_rejects_wrong_length():
    with pytest.raises(ValueError, match="expected 391 tokens"):
        TokenLayout((17, 23), (4, 8)).permute(torch.zeros(2, 390, 4))


@pytest.mark.parametrize(
    ("grid", "tile", "dilation", "identity"),
    [
        ((37,), (16,), (1,), True),
        ((37,), (64,), (1,), True),
        ((17, 23), (3, 23), (1, 1), True),
        ((5, 7, 3), (2, 7, 3), (1, 1, 1), True),
        ((5, 7, 3), (1, 7, 3), (1, 1, 1), True),
        ((17, 23), (4, 8), (1, 1), False),
        ((17, 23), (1, 24), (1, 1), False),  # a row of 24 slots over 23 tokens pads each row
        ((5, 7, 3), (2, 4, 3), (1, 1, 1), False),
        ((37,), (16,), (2,), False),
        ((17, 23), (3, 23), (2, 1), False),
    ],
)
def test_is_identity(grid, tile, dilation, identity):
    layout = TokenLayout(grid, tile, dilation)
    assert layout.is_identity is identity
    index = layout.token_index()
    flat = torch.equal(index[: layout.num_tokens], torch.arange(layout.num_tokens)) and bool(
        (index[layout.num_tokens :] == -1).all())
    if identity:
        assert flat, f"{layout} claims identity but token_index is {index.tolist()[:20]}..."
    else:
        assert not flat


@pytest.mark.parametrize("seed", [0, 1])
def test_is_identity_implies_flat_order(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        ndim = rng.randint(1, 3)
        grid = tuple(rng.randint(1, 12) for _ in range(ndim))
        tile = (rng.randint(1, 14), *grid[1:])
        layout = TokenLayout(grid, tile)
        assert layout.is_identity
        index = layout.token_index()
        s = layout.num_tokens
        assert torch.equal(index[:s], torch.arange(s)) and bool((index[s:] == -1).all()), layout


def test_layout_validates():
    with pytest.raises(ValueError, match="one entry per axis"):
        TokenLayout((4, 4), (2,))
    with pytest.raises(ValueError, match="positive"):
        TokenLayout((4, 4), (0, 2))
