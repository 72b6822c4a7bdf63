"""The benchmark suite of shared/TARGETS.md: one row per case, with the goal we hold ourselves to.

bf16, batch 1, 24 heads, head dim 128 unless a row says otherwise. FLOPs of dense attention
forward: 4 * B * H * S^2 * D (two matmuls of 2 * S^2 * D each); "dense-equivalent TFLOP/s" is
that number over the sparse kernel's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import spcompile as sp


@dataclass(frozen=True)
class Row:
    id: str
    pattern: sp.Pattern
    seq_len: int
    goal: float | None  # forward speedup over dense SDPA (None: TARGETS.md sets none)
    flex: bool = True  # also time FlexAttention (skipped where it is known to be impractical)
    structured: bool = False  # TopK: also measure the attention mass kept on structured inputs


def suite() -> list[Row]:
    na2d = (128, 128)
    # StreamingLLM: 4 attention sinks and a causal window of 4096 keys.
    streaming = sp.AnyOf(sp.Sliding(window=4096, causal=True), sp.Global(first=4), causal=True)
    return [
        Row("sw16k", sp.Sliding(left=1024, right=1024), 16384, 7.0),
        Row("sw32k", sp.Sliding(left=1024, right=1024), 32768, 13.0),
        Row("csw32k", sp.Sliding(window=4096, causal=True), 32768, 7.5),
        Row("vert16k", sp.Sliding(left=512, right=512) | sp.Global(every=64), 16384, 6.0),
        Row("blk16k", sp.Blocked(block=1024), 16384, 14.0),
        Row("na2d31", sp.Neighborhood(shape=na2d, window=31), 16384, 8.0),
        Row("na2d63", sp.Neighborhood(shape=na2d, window=63), 16384, 3.0),
        Row("na3d", sp.Neighborhood(shape=(16, 48, 80), window=(7, 17, 33)), 61440, 6.0),
        Row("flux_na", sp.Neighborhood(shape=(256, 256), window=80), 65536, 6.5),
        Row("flux_gna", sp.Neighborhood(shape=(256, 256), window=80, stride=16), 65536, 9.0),
        Row("hunyuan_na", sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24)), 115200, 4.5),
        Row("hunyuan_gna", sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24),
                                           stride=(16, 8, 8)), 115200, 9.5),
        # Issue 6: data-dependent, long-context and per-head rows. Estimation is timed.
        Row("topk64k", sp.TopK(block=64, k=16, sink=1, local=2), 65536, 10.0, flex=False,
            structured=True),
        Row("stream128k", streaming, 131072, None),
        Row("mixed32k", sp.PerHead({range(0, 4): sp.Dense(), range(4, 24): streaming}), 32768,
            None, flex=False),
    ]


def held_out() -> list[Row]:
    """Rows outside TARGETS.md, for checking the simulator on shapes its calibration never saw
    (``benchmarks/run.py --rows`` takes their ids too)."""
    return [
        Row("topk32k_causal", sp.TopK(block=64, k=8, sink=1, local=2, causal=True), 32768, None,
            flex=False),
        Row("topk64k_b128", sp.TopK(block=128, k=8, sink=1, local=1), 65536, None, flex=False),
    ]
