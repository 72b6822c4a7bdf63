"""A Triton kernel that reads an L2-resident buffer from every SM: L2 bandwidth for calibrate.

Copying a small buffer with torch measures kernel launches, not L2 (32 copies of 6 MB ran at
1.1 TB/s on the H100, launch-bound). Here each program walks the whole buffer from its own
starting chunk, loads bypass L1 (``.cg``), and the buffer is a quarter of L2, so after the
first touch every byte comes from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["l2_read_gbps"]


@triton.jit
def _l2_read_kernel(SRC, OUT, n_chunks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_chunks):
        chunk = (pid + i) % n_chunks
        acc += tl.load(SRC + chunk * BLOCK + offs, cache_modifier=".cg")
    tl.store(OUT + pid * BLOCK + offs, acc)


def l2_read_gbps(l2_bytes: int, num_sms: int, bench, block: int = 4096) -> float:
    """GB/s read from L2 by ``4 * num_sms`` programs over a buffer of ``l2_bytes / 4``."""
    n_chunks = max(1, l2_bytes // 4 // (block * 4))
    src = torch.rand(n_chunks * block, device="cuda", dtype=torch.float32)
    programs = 4 * num_sms
    out = torch.empty(programs * block, device="cuda", dtype=torch.float32)

    def run() -> None:
        _l2_read_kernel[(programs,)](src, out, n_chunks, BLOCK=block, num_warps=8)

    run()
    ms = bench(run)
    return programs * src.numel() * 4 / (ms * 1e-3) / 1e9
