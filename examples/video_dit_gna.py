"""A DiT-style video block on a 3-D token grid, turned into Generalized Neighborhood Attention.

    python examples/video_dit_gna.py

The spec gives each axis its own window and stride (GNA): the stride makes groups of queries
share one window, which is what makes the pattern block-sparse for the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spcompile as sp

GRID = (4, 12, 10)  # frames x height x width tokens
SPEC = {
    "version": 1,
    "rules": [{"name": "video-gna", "match": "blocks.*.attn",
               "pattern": {"neighborhood": {"shape": list(GRID), "window": [3, 6, 6],
                                            "stride": [1, 2, 2]}}}],
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.reference_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.reference_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """Adaptive-norm transformer block, conditioned on a timestep embedding."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 4 * dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        s1, b1, s2, b2 = self.ada(t)[:, None].chunk(4, dim=-1)
        x = x + self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class VideoDiT(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, t)
        return x


def main() -> bool:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VideoDiT().to(device).eval()
    n = GRID[0] * GRID[1] * GRID[2]
    x, t = torch.randn(2, n, 128, device=device), torch.randn(2, 128, device=device)
    compiled = torch.compile(model, backend="spcompile",
                             options={"spec": SPEC, "report": False,
                                      "inner": "inductor" if device == "cuda" else "eager"})
    with torch.no_grad():
        out = compiled(x, t)
    report = sp.last_report()
    print(report.render())
    pattern = sp.load_spec(SPEC).rules[0].static_pattern
    for block in model.blocks:
        block.attn.reference_mask = sp.dense_mask(pattern, n, n).to(device)
    with torch.no_grad():
        ref = model(x, t)
    err = float((out - ref).abs().max() / ref.abs().max())
    ok = len(report.rewritten) == 2 and err < 1e-4
    print(f"max relative difference {err:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
