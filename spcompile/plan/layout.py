"""Token layouts: how a row-major token grid is cut into tiles that are boxes of the grid.

A 2-D or 3-D neighborhood is far from block-sparse in row-major order (a 128-token tile is a
sliver of one row), but dense when each tile is a small box of the grid (NATTEN's token
permutation; GNA's answer to the "curse of multi-dimensionality"). Dilation groups (tokens whose
coordinates agree modulo the dilation) never see each other, so each group gets its own tiles,
which is the same as moving the groups to the batch dimension.

Tile ``t`` of a layout holds the tokens, row-major inside the box, of

    group g = t // tiles_per_group               (row-major over the dilation residues)
    box     c = unravel(t % tiles_per_group)     (row-major over tiles_per_axis)
    coords  x_a = (c_a * tile_a + o_a) * dilation_a + g_a,   o = unravel(row, tile)

and a row whose coordinates fall outside the grid is padding (token index -1). The kernels fuse
exactly this arithmetic into their loads and stores; ``token_index`` is the same map as a tensor
for the CPU path and the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _unravel(flat: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    out = []
    for a in range(len(shape)):
        inner = math.prod(shape[a + 1 :])
        out.append((flat // inner) % shape[a])
    return out


@dataclass(frozen=True)
class TokenLayout:
    """Tiling of a token grid ``grid`` by boxes ``tile``, one set of tiles per dilation group."""

    grid: tuple[int, ...]
    tile: tuple[int, ...]
    dilation: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.dilation:
            object.__setattr__(self, "dilation", (1,) * len(self.grid))
        if not (len(self.grid) == len(self.tile) == len(self.dilation)):
            raise ValueError(f"TokenLayout: grid {self.grid}, tile {self.tile} and dilation "
                             f"{self.dilation} need one entry per axis")
        if any(t < 1 for t in self.tile) or any(g < 1 for g in self.grid):
            raise ValueError(f"TokenLayout: expected positive grid and tile, got grid "
                             f"{self.grid}, tile {self.tile}")

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def group_extent(self) -> tuple[int, ...]:
        """Per axis, the longest dilation group: ceil(L / d)."""
        return tuple(-(-g // d) for g, d in zip(self.grid, self.dilation, strict=True))

    @property
    def tiles_per_axis(self) -> tuple[int, ...]:
        return tuple(-(-e // t) for e, t in zip(self.group_extent, self.tile, strict=True))

    @property
    def num_groups(self) -> int:
        return math.prod(self.dilation)

    @property
    def tiles_per_group(self) -> int:
        return math.prod(self.tiles_per_axis)

    @property
    def num_tiles(self) -> int:
        return self.num_groups * self.tiles_per_group

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def padded_len(self) -> int:
        return self.num_tiles * self.tile_size

    @property
    def is_identity(self) -> bool:
        """True when tiles are consecutive runs of the flat sequence (no permutation needed)."""
        return all(d == 1 for d in self.dilation) and all(
            t == g for t, g in zip(self.tile[1:], self.grid[1:], strict=True)
        )

    def group_length(self, axis: int, group: Tensor) -> Tensor:
        """Length of dilation group ``group`` on ``axis``: L // d + (group < L % d)."""
        length, d = self.grid[axis], self.dilation[axis]
        return length // d + (group < length % d).to(group.dtype)

    def tile_coords(self, tile: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(dilation group per axis, box coordinate per axis) of tile ids."""
        group = _unravel(tile // self.tiles_per_group, self.dilation)
        box = _unravel(tile % self.tiles_per_group, self.tiles_per_axis)
        return group, box

    def token_coords(self, tile: Tensor, row: Tensor) -> list[Tensor]:
        """Grid coordinates (per axis) of row ``row`` of tile ``tile`` (broadcasting)."""
        group, box = self.tile_coords(tile)
        offset = _unravel(row, self.tile)
        return [
            (box[a] * self.tile[a] + offset[a]) * self.dilation[a] + group[a]
            for a in range(self.ndim)
        ]

    def token_index(self) -> Tensor:
        """Long [padded_len]: the flat token index at each permuted position, -1 for padding."""
        tiles = torch.arange(self.num_tiles)[:, None]
        rows = torch.arange(self.tile_size)[None, :]
        coords = self.token_coords(tiles, rows)
        valid = torch.ones(coords[0].shape, dtype=torch.bool)
        flat = torch.zeros(coords[0].shape, dtype=torch.long)
        for a, x in enumerate(coords):
            valid &= x < self.grid[a]
            flat = flat * self.grid[a] + x
        return torch.where(valid, flat, -1).reshape(-1)

    def permute(self, x: Tensor, dim: int = -2) -> Tensor:
        """Tokens of ``x`` along ``dim`` into tile order, zeros at padding (padded_len long)."""
        dim = dim % x.dim()
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"TokenLayout.permute: expected {self.num_tokens} tokens along dim "
                             f"{dim}, got {x.shape[dim]}")
        index = self.token_index().to(x.device)
        out = x.index_select(dim, index.clamp_min(0))
        keep = (index >= 0).view([-1 if d == dim else 1 for d in range(x.dim())])
        return out * keep.to(out.dtype) if x.dtype.is_floating_point else torch.where(keep, out, 0)

    def unpermute(self, y: Tensor, dim: int = -2) -> Tensor:
        """The exact inverse of :meth:`permute` (padding dropped)."""
        dim = dim % y.dim()
        index = self.token_index().to(y.device)
        valid = (index >= 0).nonzero().squeeze(1)
        out = torch.empty_like(y.narrow(dim, 0, self.num_tokens))
        out.index_copy_(dim, index[valid], y.index_select(dim, valid))
        return out
