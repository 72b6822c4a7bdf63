"""A small vision transformer whose attention becomes 2-D neighborhood attention.

The model is written as timm / diffusers write it (fused qkv projection, heads split by
reshape, ``F.scaled_dot_product_attention``), with no trace of sparsity: the spec adds it.
``reference_mask`` lets the same model run with the pattern given to SDPA as a dense mask, which
is what the compiled model must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reference_mask: Tensor | None = None  # set only for the dense reference run

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.reference_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding to a ``grid`` of tokens, ``depth`` blocks, mean-pooled head."""

    def __init__(self, grid: tuple[int, int] = (24, 24), patch: int = 4, dim: int = 128,
                 heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.grid = grid
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.image_size = (grid[0] * patch, grid[1] * patch)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))

    def set_reference_mask(self, mask: Tensor | None) -> None:
        for block in self.blocks:
            block.attn.reference_mask = mask


def spec_for(grid: tuple[int, int], window: int = 7) -> dict:
    """The demo's spec: every block's attention becomes a ``window``-wide 2-D neighborhood."""
    return {
        "version": 1,
        "rules": [
            {"name": "vit-neighborhood", "match": "blocks.*.attn",
             "pattern": {"neighborhood": {"shape": list(grid), "window": window}}},
        ],
    }
