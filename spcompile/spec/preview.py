"""How sparse a pattern is at one size, and a small picture of its mask.

For ``explain`` and reports. Up to ``EXACT_LIMIT`` tokens the full mask is built with
``dense_mask``; beyond it a 61,440-token video grid would need a 3.8-billion-entry mask, so the
figures come from ``pattern.allowed`` on a few hundred evenly spread query rows (every picture
row gets the same number of sampled rows), and say so.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masks import dense_mask
from .patterns import Dense, Pattern, PerHead, TopK

__all__ = ["EXACT_LIMIT", "MaskSummary", "render_blocks", "summarize"]

#: Largest q_len (and kv_len) whose full mask is built.
EXACT_LIMIT = 4096
#: Query rows evaluated above EXACT_LIMIT (spread over the picture's rows).
SAMPLE_ROWS = 256
#: Rows evaluated per call of ``allowed``: bounds the [rows, kv_len] temporaries (~8 MB each).
_CHUNK = 16
_SHADES = " ░▒▓█"


@dataclass(frozen=True)
class MaskSummary:
    """Density figures of one pattern at (q_len, kv_len), averaged over heads.

    ``cells`` is the picture: rows x cols fractions of allowed pairs. ``rows_used`` is q_len
    when exact, else how many query rows were sampled.
    """

    q_len: int
    kv_len: int
    allowed_pairs: float
    min_keys: int
    mean_keys: float
    max_keys: int
    cells: list[list[float]]
    rows_used: int

    @property
    def exact(self) -> bool:
        return self.rows_used == self.q_len

    @property
    def density(self) -> float:
        return self.allowed_pairs / (self.q_len * self.kv_len)

    @property
    def flop_bound(self) -> float:
        """Dense work over sparse work, S^2 / allowed pairs: the most sparsity can save."""
        return math.inf if self.allowed_pairs == 0 else 1.0 / self.density


def summarize(pattern: Pattern, q_len: int, kv_len: int, *, num_heads: int | None = None,
              rows: int = 32, cols: int = 64) -> MaskSummary:
    """The figures and a ``rows`` x ``cols`` picture (fewer when the mask is smaller).

    TopK is data-dependent and has no position-only mask: NotImplementedError.
    """
    if isinstance(pattern, PerHead):
        if num_heads is None:
            raise ValueError("a per-head pattern needs the number of heads (--heads)")
        heads = Counter(pattern.resolve(num_heads))
        parts = [(summarize(p, q_len, kv_len, rows=rows, cols=cols), n) for p, n in heads.items()]
        return _average(parts, num_heads)
    if isinstance(pattern, TopK) or not pattern.static:
        raise NotImplementedError(f"{type(pattern).__name__} is data-dependent: its mask needs "
                                  "q and k, so it has no density at a size alone")
    pattern.check_lengths(q_len, kv_len)
    rows, cols = min(rows, q_len), min(cols, kv_len)
    if isinstance(pattern, Dense):
        return MaskSummary(q_len, kv_len, float(q_len * kv_len), kv_len, float(kv_len), kv_len,
                           [[1.0] * cols for _ in range(rows)], q_len)
    if q_len <= EXACT_LIMIT and kv_len <= EXACT_LIMIT:
        mask = dense_mask(pattern, q_len, kv_len)
        counts = mask.sum(1)
        cells = F.adaptive_avg_pool2d(mask[None, None].float(), (rows, cols))[0, 0]
        return MaskSummary(q_len, kv_len, float(counts.sum()), int(counts.min()),
                           float(counts.float().mean()), int(counts.max()), cells.tolist(), q_len)
    per_band = max(1, SAMPLE_ROWS // rows)
    bands = torch.linspace(0, q_len, rows + 1)
    sample = torch.cat([
        torch.linspace(float(lo), float(hi) - 1, per_band).round().long().clamp(0, q_len - 1)
        for lo, hi in itertools.pairwise(bands.tolist())
    ])
    j = torch.arange(kv_len)[None, :]
    counts, band_cells = [], []
    for start in range(0, len(sample), _CHUNK):
        i = sample[start : start + _CHUNK, None]
        mask = pattern.allowed(i, j, q_len, kv_len).expand(len(i), kv_len)
        counts.append(mask.sum(1))
        band_cells.append(F.adaptive_avg_pool1d(mask[:, None].float(), cols)[:, 0])
    count = torch.cat(counts)
    cells = torch.cat(band_cells).view(rows, per_band, cols).mean(1)
    mean = float(count.float().mean())
    return MaskSummary(q_len, kv_len, mean * q_len, int(count.min()), mean, int(count.max()),
                       cells.tolist(), len(sample))


def _average(parts: list[tuple[MaskSummary, int]], num_heads: int) -> MaskSummary:
    first = parts[0][0]
    rows, cols = len(first.cells), len(first.cells[0])
    cells = [[sum(s.cells[r][c] * n for s, n in parts) / num_heads for c in range(cols)]
             for r in range(rows)]
    return MaskSummary(
        first.q_len, first.kv_len,
        sum(s.allowed_pairs * n for s, n in parts) / num_heads,
        min(s.min_keys for s, _ in parts),
        sum(s.mean_keys * n for s, n in parts) / num_heads,
        max(s.max_keys for s, _ in parts),
        cells, min(s.rows_used for s, _ in parts),
    )


def render_blocks(cells: list[list[float]]) -> list[str]:
    """One text line per picture row: blank for no allowed pair, full block for all allowed,
    and any allowed pair shows (so a thin diagonal does not vanish when downsampled)."""
    lines = []
    for row in cells:
        chars = []
        for value in row:
            if value <= 0:
                chars.append(_SHADES[0])
            elif value >= 1:
                chars.append(_SHADES[-1])
            else:
                chars.append(_SHADES[1 + min(2, int(value * 3))])
        lines.append("".join(chars))
    return lines
