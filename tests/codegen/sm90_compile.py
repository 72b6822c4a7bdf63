"""Compile forward kernels for sm_90 (H100) without a GPU and print what they need, as JSON.

    python tests/codegen/sm90_compile.py [--both | --gluon | --gluon-bwd]  # TRITON_INTERPRET unset

Run as a separate process by test_persistent.py: the test process runs Triton's interpreter,
which never compiles. Triton's NVIDIA backend lowers to PTX and runs its bundled ptxas on any
machine, so a CPU session can check that a kernel compiles for Hopper with TMA and how much
shared memory one program takes (what decides whether it launches, and how many fit on an SM).
Compiles the persistent kernel at the default launch config of a 128x64-tile and a
128x128-tile plan (``--both``: the one-item kernel too, ~10 s more). ``--gluon``: the
warp-specialized Hopper kernel (``codegen.sm90``) of a 1-D, a 2-D and a 3-D plan instead;
``--gluon-bwd``: the Hopper backward's dQ and dK/dV kernels (``codegen.sm90_bwd``) of the same.
Exit status 3: no NVIDIA backend here (the test skips).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import spcompile as sp
from spcompile.codegen.cache import load_source
from spcompile.codegen.fwd import (
    LaunchConfig,
    default_config,
    descriptor_box,
    fwd_source,
    variant_name,
)
from spcompile.plan.tiles import TilePlan, build_plan

HEAD_DIM = 128
_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32",
             "DELTA": "*fp32", "AUX": "*i8", "sm_scale": "fp32"}
_LISTS = ("FULL_IDX", "FULL_CNT", "PART_IDX", "PART_CNT", "SCHEDULE", "GATHER", "FULL_BOX",
          "T_FULL_IDX", "T_FULL_CNT", "T_PART_IDX", "T_PART_CNT", "STARTS", "ITEMS")


def compile_fwd(plan: TilePlan, persistent: bool, config: LaunchConfig) -> dict[str, Any]:
    """The sm_90 build of the TMA forward (bf16, head dim 128): shared bytes and TMA ops."""
    box = config.box_loops and plan.full_box is not None
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = variant_name(plan, "sm90", persistent=persistent, box=box)
    source = fwd_source(plan, tma=True, persistent=persistent, box=box)
    fn = load_source(name, source).attn_fwd_kernel
    const = {"H": 8, "H_KV": 8, "GROUP": 1, "LIST_GROUP": 1, "HEAD_DIM": HEAD_DIM,
             "HEAD_DIM_V": HEAD_DIM, "BLOCK_D": HEAD_DIM, "BLOCK_DV": HEAD_DIM,
             "BLOCK_M": plan.q_layout.tile_size, "BLOCK_N": plan.kv_layout.tile_size,
             "INPUT_PRECISION": "tf32"}
    q_box = descriptor_box(plan, plan.q_tile, HEAD_DIM)
    kv_box = descriptor_box(plan, plan.kv_tile, HEAD_DIM)
    boxes = {"QD": q_box, "KD": kv_box, "VD": kv_box, "OD": q_box}
    signature = {}
    for arg in fn.arg_names:
        if arg in const:
            signature[arg] = "constexpr"
        elif arg in boxes:
            signature[arg] = f"tensordesc<bf16[{','.join(map(str, boxes[arg]))}]>"
        else:
            signature[arg] = _POINTERS.get(arg, "*i32" if arg in _LISTS else "i32")
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps,
                                     "num_stages": config.num_stages})
    return {"plan": name, "persistent": persistent, "warps": config.num_warps,
            "stages": config.num_stages, "shared": kernel.metadata.shared,
            "tma_ops": kernel.asm["ptx"].count("cp.async.bulk.tensor")}


def _build_gluon(name: str, fn: Any, boxes: dict[str, list[int]], const: dict[str, Any]
                 ) -> dict[str, Any]:
    """Compile Gluon kernel ``fn`` for sm_90 (bf16 descriptors with these boxes, these
    constexprs): shared bytes, TMA copies, warpgroup MMAs and register-budget changes in its
    PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {}
    for arg in fn.arg_names:
        if arg in const:
            signature[arg] = "constexpr"
        elif arg in boxes:
            layout = gl.NVMMASharedLayout(swizzle_byte_width=const["SWIZZLE"],
                                          element_bitwidth=16, rank=len(boxes[arg]))
            signature[arg] = f"tensordesc<bf16[{','.join(map(str, boxes[arg]))}],{layout!r}>"
        else:
            signature[arg] = _POINTERS.get(arg, "*i32" if arg in _LISTS else "i32")
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    return {"plan": name, "stages": const["STAGES"], "shared": kernel.metadata.shared,
            "tma_ops": ptx.count("cp.async.bulk.tensor"), "wgmma": ptx.count("wgmma.mma_async"),
            "setmaxnreg": ptx.count("setmaxnreg")}


def compile_gluon(plan: TilePlan) -> dict[str, Any]:
    """The sm_90 build of ``codegen.sm90``'s kernel (bf16, head dim 128)."""
    from spcompile.codegen import sm90

    name = variant_name(plan, "sm90")
    fn = load_source(name, sm90.sm90_source(plan)).attn_fwd_sm90
    half, kv = sm90.boxes(plan, HEAD_DIM)
    boxes = {"QD": half, "KD": kv, "VD": kv, "OD": half}
    const = {"BLOCK_N": plan.kv_layout.tile_size, "BLOCK_D": HEAD_DIM,
             "SWIZZLE": sm90.swizzle_bytes(HEAD_DIM, 2),
             "STAGES": sm90.launch_stages(plan, HEAD_DIM)}
    return _build_gluon(name, fn, boxes, const)


def compile_gluon_bwd(plan: TilePlan, kernel: str, pipelined: bool = False) -> dict[str, Any]:
    """The sm_90 build of ``codegen.sm90_bwd``'s dQ or dK/dV kernel (bf16, head dim 128; the
    plain loop, or the pipelined one that ``benchmarks/tune.py`` times)."""
    from spcompile.codegen import sm90, sm90_bwd

    name = variant_name(plan, f"sm90-{kernel}", pipelined=pipelined)
    if kernel == "dq":
        fn = load_source(name, sm90_bwd.dq_source(plan, pipelined)).attn_bwd_dq_sm90
        half = descriptor_box(plan, sm90.half_box(plan.q_layout), HEAD_DIM)
        kv = descriptor_box(plan, plan.kv_tile, HEAD_DIM)
        boxes = {"QD": half, "DOD": half, "DQD": half, "KD": kv, "VD": kv}
        const = {"BLOCK_N": plan.kv_layout.tile_size,
                 "STAGES": sm90_bwd.dq_stages(plan, HEAD_DIM)}
    else:
        fn = load_source(name, sm90_bwd.dkdv_source(plan, pipelined)).attn_bwd_dkdv_sm90
        q_box = descriptor_box(plan, plan.q_tile, HEAD_DIM)
        half = descriptor_box(plan, sm90.half_box(plan.kv_layout), HEAD_DIM)
        boxes = {"QD": q_box, "DOD": q_box, "KD": half, "VD": half, "DKD": half, "DVD": half}
        const = {"STAGES": sm90_bwd.dkdv_launch_stages(plan, HEAD_DIM),
                 "KV_BUFS": sm90_bwd.DKDV_KV_BUFFERS}
    const.update(BLOCK_D=HEAD_DIM, SWIZZLE=sm90.swizzle_bytes(HEAD_DIM, 2))
    return {**_build_gluon(name, fn, boxes, const), "kernel": kernel, "pipelined": pipelined}


def _bwd_plans(pattern: sp.Pattern, n: int) -> list[tuple[TilePlan, str]]:
    from spcompile.codegen.sm90_bwd import dkdv_tiles, dq_tiles

    return [(build_plan(pattern, n, n, *dq_tiles(pattern, n, n)), "dq"),
            (build_plan(pattern, n, n, *dkdv_tiles(pattern, n, n)), "dkdv")]


def main() -> None:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        sys.exit(3)
    if "--gluon" in sys.argv:
        sliding = sp.Sliding(window=1000, causal=True)
        plans = [build_plan(sliding, 4096, 4096),
                 build_plan(sliding, 4096, 4096, specialized=True),  # 128-token KV tiles
                 build_plan(sp.Neighborhood(shape=(128, 128), window=31), 16384, 16384),
                 build_plan(sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24),
                                            stride=(16, 8, 8)), 115200, 115200)]
        print(json.dumps([compile_gluon(plan) for plan in plans]))
        return
    if "--gluon-bwd" in sys.argv:
        patterns = [(sp.Sliding(window=1000, causal=True), 4096),
                    (sp.Neighborhood(shape=(128, 128), window=31), 16384),
                    (sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24),
                                     stride=(16, 8, 8)), 115200)]
        builds = [compile_gluon_bwd(plan, kernel) for p, n in patterns
                  for plan, kernel in _bwd_plans(p, n)]
        # The pipelined loops (tune.py's variants) on the 1-D plans: they keep building.
        builds += [compile_gluon_bwd(plan, kernel, pipelined=True)
                   for plan, kernel in _bwd_plans(*patterns[0])]
        print(json.dumps(builds))
        return
    plans = [build_plan(sp.Sliding(left=1024, right=1024), 16384, 16384),  # 128x64 tiles
             build_plan(sp.Neighborhood(shape=(128, 128), window=31), 16384, 16384)]  # 128x128
    variants = (False, True) if "--both" in sys.argv else (True,)
    rows = [compile_fwd(plan, persistent, default_config(plan))
            for plan in plans for persistent in variants]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
