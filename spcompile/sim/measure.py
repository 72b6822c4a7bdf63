"""Measuring this GPU for ``spcompile calibrate``: hardware figures and our kernel's timings.

Times dense matmul, copies (HBM, and L2 through ``l2probe``), SDPA at several key lengths,
launch latency and the host time of one call, and our kernel on a small suite that separates
full tiles (Blocked), partial tiles (sliding windows, neighborhoods), short loops (small
blocks), permuted layouts (2-D grids) and tile sizes. Rows come out in the results format that
``calibrate.load_results`` reads, so a measurement can be re-fitted later.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from ..plan.tiles import build_plan
from ..spec.patterns import Pattern
from ..timing import median_ms
from .hardware import KernelCoefficients, Profile

__all__ = ["calibration_suite", "measure_gpu", "profile_from_measurements"]


#: The kernel rows ``measure_gpu`` times. Each launch configuration the kernel uses by default
#: gets long loops, short loops (2-4 tiles: the per-program overhead) and, for 1-D tiles, partial
#: tiles; the N-d configuration (128x128 tiles) also runs 1-D blocks, so that the permuted-load
#: cost is told apart from the configuration's efficiency.
def calibration_suite() -> list[tuple[str, Pattern, int, tuple[int, ...] | None]]:
    from ..spec.patterns import Blocked, Neighborhood, Sliding

    na = (128, 128)
    return [
        ("blk1024", Blocked(block=1024), 16384, None),
        ("blk256", Blocked(block=256), 16384, None),
        ("blk128", Blocked(block=128), 16384, None),
        ("sw1024", Sliding(left=1024, right=1024), 16384, None),
        ("csw2048", Sliding(window=2048, causal=True), 16384, None),
        ("blk1024-kv128", Blocked(block=1024), 16384, (128,)),
        ("blk256-kv128", Blocked(block=256), 16384, (128,)),
        ("na2d31", Neighborhood(shape=na, window=31), 16384, None),
        ("gna2d", Neighborhood(shape=na, window=32, stride=16), 16384, None),
        ("gna2d64", Neighborhood(shape=na, window=64, stride=16), 16384, None),
        ("blk2d16", Neighborhood(shape=na, window=16, stride=16), 16384, None),
        ("blk1024-q64", Blocked(block=1024), 16384, (64,)),
        ("blk256-q64", Blocked(block=256), 16384, (64,)),
    ]


def l2_mib(l2_cache_size: int) -> float:
    """A profile's ``l2_mb`` for CUDA's ``L2_cache_size`` (bytes): MiB, as the built-in profiles
    give it and ``Profile.l2_bytes`` reads it back (the H100's 52428800 bytes: 50.0)."""
    return round(l2_cache_size / 2**20, 1)


def measure_gpu(say: Callable[[str], None] = print, heads: int = 24, head_dim: int = 128
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure the visible GPU: (hardware figures, kernel result rows in the results format)."""
    import torch.nn.functional as F

    from ..codegen.fwd import attn_fwd, default_config
    from ..codegen.launch import forward, forward_kernel, wgmma_device

    if not torch.cuda.is_available():
        raise RuntimeError("calibrate needs a CUDA GPU (or --from-results FILE)")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    name = torch.cuda.get_device_name(dev)
    say(f"measuring {name}")
    hw: dict[str, Any] = {"name": name, "num_sms": props.multi_processor_count,
                          "l2_mb": l2_mib(getattr(props, "L2_cache_size", 0))}
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    if smem:
        hw["smem_per_sm_kb"] = smem / 1024
    hw["wgmma"] = wgmma_device(dev.index)
    threads = getattr(props, "max_threads_per_multi_processor", 0)
    if threads:
        hw["max_warps_per_sm"] = threads // 32

    matmul: dict[str, float] = {}
    for dtype, torch_dtype, n in (("bf16", torch.bfloat16, 8192), ("fp16", torch.float16, 8192),
                                  ("fp32", torch.float32, 4096)):
        a = torch.randn(n, n, device=dev, dtype=torch_dtype)
        b = torch.randn(n, n, device=dev, dtype=torch_dtype)
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # our fp32 kernel runs ieee fp32
        try:
            ms = median_ms(lambda a=a, b=b: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
        matmul[dtype] = round(2 * n**3 / (ms * 1e-3) / 1e12, 1)
        del a, b
    hw["matmul_tflops"] = matmul
    say(f"  matmul TFLOP/s: {matmul}")

    big = torch.empty(1 << 29, dtype=torch.uint8, device=dev)  # 512 MiB, far beyond L2
    dst = torch.empty_like(big)
    ms = median_ms(lambda big=big, dst=dst: dst.copy_(big))
    hw["hbm_gbps"] = round(2 * big.numel() / (ms * 1e-3) / 1e9)
    del big, dst
    from .l2probe import l2_read_gbps

    hw["l2_gbps"] = round(l2_read_gbps(int(hw["l2_mb"] * 2**20), hw["num_sms"], median_ms))
    say(f"  GB/s: HBM copy {hw['hbm_gbps']}, L2 read {hw['l2_gbps']}")

    from ..spec.patterns import Dense

    tiny = torch.zeros(16, device=dev)
    hw["launch_us"] = round(median_ms(lambda: tiny.add_(1)) * 1e3, 1)
    small = torch.randn(1, 1, 128, head_dim, device=dev, dtype=torch.bfloat16)
    plan = build_plan(Dense(), 128, 128, (128,), (64,))
    attn_fwd(small, small, small, plan)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        attn_fwd(small, small, small, plan)
    hw["host_us"] = round((time.perf_counter() - start) / 200 * 1e6, 1)
    torch.cuda.synchronize()
    say(f"  launch (tiny kernel) {hw['launch_us']} us; host time of one attn_fwd call "
        f"{hw['host_us']} us")

    sdpa: dict[str, float] = {}
    by_len: dict[str, float] = {}
    for dtype, torch_dtype, lengths in (("bf16", torch.bfloat16, (16384, 65536, 131072)),
                                        ("fp16", torch.float16, (16384,))):
        for s in lengths:
            q, k, v = (torch.randn(1, heads, s, head_dim, device=dev, dtype=torch_dtype)
                       for _ in range(3))
            ms = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
            rate = round(4 * heads * s**2 * head_dim / (ms * 1e-3) / 1e12, 1)
            if dtype == "bf16":
                by_len[str(s)] = rate
            sdpa.setdefault(dtype, rate)
            del q, k, v
    hw["sdpa_tflops"] = sdpa
    hw["sdpa_tflops_by_kv_len"] = {"bf16": by_len}
    say(f"  SDPA TFLOP/s: {sdpa}; bf16 by key length: {by_len}")

    rows: list[dict[str, Any]] = []
    sdpa_at: dict[int, float] = {}
    for rid, pattern, s, tile in calibration_suite():
        q, k, v = (torch.randn(1, heads, s, head_dim, device=dev, dtype=torch.bfloat16)
                   for _ in range(3))
        if s not in sdpa_at:
            sdpa_at[s] = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        plan = build_plan(pattern, s, s, tile, tile, head_dim=head_dim)
        config = default_config(plan)
        attn_fwd(q, k, v, plan, config=config)
        ms = median_ms(lambda q=q, k=k, v=v, p=plan, c=config: attn_fwd(q, k, v, p, config=c))
        row = {"id": rid, "pattern": pattern.to_dict(), "tokens": s, "q_tile": plan.q_tile,
               "kv_tile": plan.kv_tile, "warps": config.num_warps,
               "stages": config.num_stages, "ms": ms, "sdpa_ms": sdpa_at[s],
               "speedup": sdpa_at[s] / ms, "tile_bound": plan.tile_bound, "batch": 1,
               "heads": heads, "head_dim": head_dim, "dtype": "bf16"}
        rows.append(row)
        say(f"  {rid:12s} q {plan.q_tile} kv {plan.kv_tile} w{config.num_warps}"
            f"s{config.num_stages}: {ms:.3f} ms ({row['speedup']:.2f}x over SDPA)")
        if forward_kernel(plan, q, v) == "sm90":  # what calls of this plan run here
            ws_ms = median_ms(lambda q=q, k=k, v=v, p=plan: forward(q, k, v, p))
            rows.append({**row, "kernel": "sm90", "ms": ws_ms, "speedup": sdpa_at[s] / ws_ms,
                         "warps": None, "stages": None})
            say(f"  {rid:12s} warp-specialized: {ws_ms:.3f} ms "
                f"({sdpa_at[s] / ws_ms:.2f}x over SDPA)")
        del q, k, v
        torch.cuda.empty_cache()
    return hw, rows


def profile_from_measurements(hw: dict[str, Any], base: Profile | None, name: str) -> Profile:
    """A profile with this GPU's measured figures, datasheet peaks from ``base`` if it is the
    same GPU, else the measured matmul rates as peaks (efficiencies are then relative to
    them)."""
    same = base is not None and any(a.lower() in hw["name"].lower() for a in base.aliases)
    peak = dict(base.peak_tflops) if same and base is not None else dict(hw["matmul_tflops"])
    sources = dict(base.sources) if same and base is not None else {
        "peak_tflops": "measured GEMM rates (no datasheet profile matched this GPU)"}
    sources.update({k: f"measured by spcompile calibrate, {time.strftime('%Y-%m-%d')}"
                    for k in ("hbm_gbps", "l2_gbps", "launch_us", "matmul_tflops", "host_us")})
    kernel = base.kernel if base is not None else KernelCoefficients(
        {}, 0.0, 0.0, 0.0, {})
    kernel = dataclasses.replace(kernel, sdpa_tflops=hw["sdpa_tflops"],
                                 sdpa_tflops_by_kv_len=hw.get("sdpa_tflops_by_kv_len", {}),
                                 host_us=float(hw.get("host_us", 0.0)))
    template = base
    return Profile(
        name=name, description=hw["name"], num_sms=int(hw["num_sms"]), peak_tflops=peak,
        hbm_gbps=float(hw["hbm_gbps"]), l2_gbps=float(hw["l2_gbps"]),
        l2_mb=float(hw["l2_mb"] or (template.l2_mb if template else 0)),
        smem_per_sm_kb=float(hw.get("smem_per_sm_kb") or
                             (template.smem_per_sm_kb if template else 228)),
        max_warps_per_sm=int(hw.get("max_warps_per_sm") or 64),
        launch_us=float(hw["launch_us"]), kernel=kernel, calibrated=True,
        wgmma=bool(hw.get("wgmma", False)),
        aliases=(hw["name"],), matmul_tflops=dict(hw["matmul_tflops"]), sources=sources,
    )
