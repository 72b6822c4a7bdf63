"""Sweep tile sizes and launch configs of the forward kernel on a few suite rows.

    python benchmarks/tune.py [--rows blk16k,na3d] [--bwd | --persistent | --loops | --sm90]

``--persistent``: at each row's default tiles and warps/stages, the one-item forward against the
persistent one with 1 and 2 programs per SM, in one run (decides LaunchConfig.persistent and
programs_per_sm). ``--loops``: the FULL loop reading its list against computing the plan's box,
and the work items numbered rank-major against head-major (decides LaunchConfig.box_loops and
head_major), then both at other warps/stages; with ``--bwd``, the backward's program order at
its default tiles, then its other tile pairs head-major. ``--sm90``: the warp-specialized
Hopper kernel at 64- and 128-token KV tiles (``--kv``) and every ring depth that fits, against
the Triton kernel at the default tiles (decides the KV tiles plan.choose should give the calls
it runs).

For each row and (q tokens, kv tokens, warps, stages): correctness on sampled rows, then the
do_bench median; prints the speedup over SDPA measured in the same run. The winners become the
defaults in spcompile.codegen.fwd.default_config / spcompile.plan.choose.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from run import B, D, H, sampled_error
from suite import suite

import spcompile as sp
from spcompile.codegen.bwd import attn_bwd, attn_bwd_dkdv, attn_bwd_dq, bwd_config
from spcompile.codegen.fwd import LaunchConfig, attn_fwd, default_config, fwd_grid
from spcompile.plan.assign import stride_items
from spcompile.plan.choose import backward_tiles, best_boxes
from spcompile.plan.tiles import TilePlan, build_plan, grid_of
from spcompile.plan.topk import block_lists, estimate_blocks
from spcompile.timing import interleaved_ms, median_ms


def _tiles(row, mq: int, mk: int):
    """(q_tile, kv_tile) of ``mq`` Q and ``mk`` KV tokens for a row: runs in 1-D, the boxes
    visiting the fewest tile-equivalents on a grid."""
    s = row.seq_len
    if grid_of(row.pattern) is None:
        return (mq,), (mk,)
    return best_boxes(row.pattern, s, s, mq, mk)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="blk16k,sw32k,na2d31,na3d,hunyuan_gna")
    parser.add_argument("--out", default="")
    parser.add_argument("--bwd", action="store_true", help="sweep the backward kernels")
    parser.add_argument("--persistent", action="store_true",
                        help="one-item vs persistent forward (1 and 2 programs per SM)")
    parser.add_argument("--loops", action="store_true",
                        help="list vs box FULL loops x rank- vs head-major item order")
    parser.add_argument("--sm90", action="store_true",
                        help="warp-specialized kernel: KV tiles and ring depths")
    parser.add_argument("--kv", default="64,128", help="--sm90: the KV tile sizes to time")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=DIR",
                        help="--sm90: time this tree's default forward (with --bwd: its "
                             "backward kernels) against the one of the spcompile package "
                             "copied into DIR (repeatable)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--against: rounds of rotating order (more resolve smaller gaps)")
    parser.add_argument("--sizes", default="128x128,128x64,64x64",
                        help="tile sweep: Q tokens x KV tokens per tile, comma-separated")
    parser.add_argument("--configs", default="4w2s,4w3s,4w4s,8w2s,8w3s,8w4s",
                        help="tile sweep: warps and stages, comma-separated")
    args = parser.parse_args()
    rows = [r for r in suite() if r.id in args.rows.split(",")]
    if args.sm90:
        if args.against:
            against = tune_against_bwd if args.bwd else tune_against
            against(rows, args.out, dict(a.split("=", 1) for a in args.against), args.rounds)
        elif args.bwd:
            tune_sm90_bwd(rows, args.out)
        else:
            tune_sm90(rows, args.out, tuple(int(x) for x in args.kv.split(",")))
        return
    if args.persistent or (args.loops and not args.bwd):
        tune_variants(rows, persistent_variants if args.persistent else loop_variants, args.out)
        return
    if any(isinstance(r.pattern, sp.TopK) for r in rows):
        tune_topk([r for r in rows if isinstance(r.pattern, sp.TopK)], args.out)
        return
    if args.bwd:
        (tune_bwd_orders if args.loops else tune_bwd)(rows, args.out)
        return
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    configs = [LaunchConfig(int(w), int(st))
               for w, st in (c.rstrip("s").split("w") for c in args.configs.split(","))]
    results = []
    for row in rows:
        s = row.seq_len
        q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        sdpa = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        for (mq, mk), cfg in itertools.product(sizes, configs):
            qt, kt = _tiles(row, mq, mk)
            plan = build_plan(row.pattern, s, s, qt, kt)
            try:
                out, _ = attn_fwd(q, k, v, plan, config=cfg)
                err = sampled_error(row, q, k, v, out)
                ms = median_ms(lambda q=q, k=k, v=v, p=plan, c=cfg: attn_fwd(q, k, v, p, config=c))
            except Exception as e:
                print(row.id, mq, mk, cfg, "ERROR", type(e).__name__, str(e)[:120])
                continue
            res = {"id": row.id, "q": qt, "kv": kt, "warps": cfg.num_warps,
                   "stages": cfg.num_stages, "err": err, "ms": ms, "speedup": sdpa / ms,
                   "tile_bound": plan.tile_bound}
            results.append(res)
            print(json.dumps(res), flush=True)
        best = max((r for r in results if r["id"] == row.id), key=lambda r: r["speedup"])
        print("BEST", json.dumps(best), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


Variant = tuple[str, TilePlan, LaunchConfig]


def persistent_variants(plan: TilePlan) -> list[Variant]:
    """The one-item forward and the persistent one with 1 and 2 programs per SM."""
    one_item = dataclasses.replace(default_config(plan), persistent=False)
    return [("one-item", plan, one_item)] + [
        (f"persistent-{n}", plan,
         dataclasses.replace(one_item, persistent=True, programs_per_sm=n)) for n in (1, 2)]


def loop_variants(plan: TilePlan) -> list[Variant]:
    """FULL tiles read from the list vs computed from the plan's box, items numbered rank-major
    vs head-major, at the default warps/stages; then box + head-major at the neighbouring
    warps/stages (a config may win only with them)."""
    base = dataclasses.replace(default_config(plan), box_loops=True, head_major=True)
    out = [(f"{loop}-{order}", plan, dataclasses.replace(base, box_loops=loop == "box",
                                                        head_major=order == "head"))
           for loop in ("list", "box") for order in ("rank", "head")]
    for w, st in ((4, 2), (4, 3), (8, 2), (8, 3)):
        if (w, st) != (base.num_warps, base.num_stages):
            out.append((f"box-head-{w}w{st}s", plan,
                        dataclasses.replace(base, num_warps=w, num_stages=st)))
    return out


def tune_variants(rows, make_variants, out_path: str) -> None:
    """Launch variants of the forward (most at each row's default tiles) and SDPA, timed in two
    alternating rounds (``interleaved_ms``: a clock drift over the run falls on every variant
    alike). Each variant's output is checked against sampled float64 rows and against the
    first variant's. TopK rows run over one fixed selection (estimation excluded: it does not
    depend on the launch); PerHead rows are skipped (sparse_attention launches them and takes
    no LaunchConfig)."""
    results = []
    for row in rows:
        if isinstance(row.pattern, sp.PerHead):
            print(row.id, "skipped: PerHead rows launch through sparse_attention", flush=True)
            continue
        s = row.seq_len
        q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        default_plan = build_plan(row.pattern, s, s)
        lists = None
        if isinstance(row.pattern, sp.TopK):
            lists = block_lists(row.pattern, estimate_blocks(row.pattern, q, k), s, H)
        fns = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        checked, base_out = {}, None
        for name, plan, cfg in make_variants(default_plan):
            fn = functools.partial(attn_fwd, q, k, v, plan, config=cfg, lists=lists)
            try:
                out, _ = fn()
            except Exception as e:
                print(row.id, name, "ERROR", type(e).__name__, str(e)[:200], flush=True)
                continue
            base_out = out if base_out is None else base_out
            checked[name] = (plan, cfg, sampled_error(row, q, k, v, out),
                             float((out.float() - base_out.float()).abs().max()))
            fns[name] = fn
        rounds = interleaved_ms(fns, rounds=2)
        sdpa = statistics.median(rounds["sdpa"])
        base_ms = None
        for name, (plan, cfg, err, diff) in checked.items():
            ms = statistics.median(rounds[name])
            base_ms = base_ms or ms
            res = {"id": row.id, "variant": name, "q": plan.q_tile, "kv": plan.kv_tile,
                   "warps": cfg.num_warps, "stages": cfg.num_stages,
                   "persistent": cfg.persistent, "box_loops": cfg.box_loops,
                   "head_major": cfg.head_major,
                   "programs": fwd_grid(plan, B * H, cfg, q.device),
                   "items": plan.num_q_tiles * B * H, "err": err, "max_diff_vs_first": diff,
                   "ms": ms, "rounds_ms": rounds[name], "sdpa_ms": sdpa,
                   "sdpa_rounds_ms": rounds["sdpa"], "speedup": sdpa / ms,
                   "vs_first": base_ms / ms, "tile_bound": plan.tile_bound,
                   "of_tile_bound": sdpa / ms / plan.tile_bound}
            results.append(res)
            print(json.dumps(res), flush=True)
        print("SUMMARY", row.id, "speedup over SDPA:", ", ".join(
            f"{r['variant']} {r['speedup']:.2f}x" for r in results if r["id"] == row.id),
            flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


def tune_sm90(rows, out_path: str, kv_sizes: tuple[int, ...] = (64, 128)) -> None:
    """The warp-specialized kernel (``codegen.sm90``) at 128-token Q tiles with 64- and
    128-token KV tiles, at every ring depth from 3 to what fits, each launched with a program
    per item and persistent (one program per SM, name suffix "-p"; "-ps": its items by the
    fixed stride of ``plan.assign.stride_items``, not ``assign_items``), and the Triton kernel at
    the row's default tiles: timed in three alternating rounds with SDPA, each output checked
    on sampled float64 rows. Rows record ``kernel`` (as run.py's do), ``stages`` and
    ``programs``; ``spcompile calibrate --from-results`` reads the first two."""
    from spcompile.codegen.fwd import num_sms
    from spcompile.codegen.sm90 import attn_fwd_sm90, in_scope, stages_for

    results = []
    for row in rows:
        s = row.seq_len
        q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        default_plan = build_plan(row.pattern, s, s)
        fns = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
               "triton": functools.partial(attn_fwd, q, k, v, default_plan)}
        variants = {"triton": ("triton", default_plan, default_config(default_plan).num_stages,
                               None, False)}
        sms = num_sms(q.device)
        for mk in kv_sizes:
            plan = build_plan(row.pattern, s, s, *_tiles(row, 128, mk))
            if not in_scope(plan, q.dtype, D, D):
                print(row.id, f"kv{mk}: outside the kernel's scope", flush=True)
                continue
            items = plan.num_q_tiles * B * H
            stride = tuple(x.cuda() for x in stride_items(items, sms))
            for stages, (suffix, programs, rule) in itertools.product(
                    range(3, stages_for(plan, D, 2) + 1),
                    (("", items, None), ("-p", sms, None), ("-ps", sms, stride))):
                name = f"sm90-kv{mk}-s{stages}{suffix}"
                fns[name] = functools.partial(attn_fwd_sm90, q, k, v, plan, D**-0.5, stages,
                                              programs, rule)
                variants[name] = ("sm90", plan, stages, programs, rule is not None)
        errors = {}
        for name in variants:
            out, _ = fns[name]()
            errors[name] = sampled_error(row, q, k, v, out)
        rounds = interleaved_ms(fns)
        sdpa = statistics.median(rounds["sdpa"])
        for name, (kernel, plan, stages, programs, strided) in variants.items():
            ms = statistics.median(rounds[name])
            res = {"id": row.id, "variant": name, "kernel": kernel, "q": plan.q_tile,
                   "kv": plan.kv_tile, "stages": stages, "programs": programs,
                   "assignment": "stride" if strided else "balanced",
                   "err": errors[name], "ms": ms,
                   "rounds_ms": rounds[name], "sdpa_ms": sdpa, "sdpa_rounds_ms": rounds["sdpa"],
                   "speedup": sdpa / ms, "tile_bound": plan.tile_bound,
                   "of_tile_bound": sdpa / ms / plan.tile_bound}
            if kernel == "triton":
                res["warps"] = default_config(plan).num_warps
            results.append(res)
            print(json.dumps(res), flush=True)
        if out_path:  # after every row: a run cut short keeps what it measured
            Path(out_path).write_text(json.dumps(results, indent=1))


def tune_against(rows, out_path: str, others: dict[str, str], rounds: int = 3) -> None:
    """This tree's default forward ("ours": the kernel, tiles and launch a call gets) against
    that of each other version of the package, in ``rounds`` rounds with SDPA, each round in
    another order, each output checked on sampled float64 rows. An other version is a copy of
    the ``spcompile`` directory of another revision, e.g.

        git archive REV spcompile | tar -x -C /tmp/rev   # then NAME=/tmp/rev/spcompile

    Each copy is imported under its own NAME, its parent package left unexecuted (its
    ``__init__`` would register the custom op a second time): only its plans and kernels
    run. A change to the Gluon kernel's source is thus timed against the source it replaces,
    on the same inputs in the same rounds."""
    from spcompile.codegen import launch

    packages = {name: _package_copy(name, path) for name, path in others.items()}
    results = []
    for row in rows:
        s = row.seq_len
        q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        plan = launch.forward_plan(
            lambda spec, s=s, p=row.pattern: build_plan(p, s, s, specialized=spec), q, v)
        fns = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
               "ours": functools.partial(launch.forward, q, k, v, plan, D**-0.5)}
        kernels = {"ours": launch.forward_kernel(plan, q, v)}
        for name, pkg in packages.items():
            other = _as_pattern(pkg, row.pattern)
            other_plan = pkg.codegen.launch.forward_plan(
                lambda spec, s=s, p=other, pkg=pkg: pkg.plan.tiles.build_plan(
                    p, s, s, specialized=spec), q, v)
            fns[name] = functools.partial(pkg.codegen.launch.forward, q, k, v, other_plan,
                                          D**-0.5)
            kernels[name] = pkg.codegen.launch.forward_kernel(other_plan, q, v)
        errors = {name: sampled_error(row, q, k, v, fns[name]()[0]) for name in kernels}
        timed = interleaved_ms(fns, rounds=rounds, rotate=True)
        sdpa = statistics.median(timed["sdpa"])
        ours = statistics.median(timed["ours"])
        for name in kernels:
            ms = statistics.median(timed[name])
            res = {"id": row.id, "variant": name, "kernel": kernels[name], "err": errors[name],
                   "ms": ms, "rounds_ms": timed[name], "sdpa_ms": sdpa,
                   "sdpa_rounds_ms": timed["sdpa"], "speedup": sdpa / ms,
                   "ours_gain": ms / ours - 1.0,  # > 0: this version is slower than ours
                   "tile_bound": plan.tile_bound,
                   "of_tile_bound": sdpa / ms / plan.tile_bound}
            results.append(res)
            print(json.dumps(res), flush=True)
        if out_path:
            Path(out_path).write_text(json.dumps(results, indent=1))


def tune_against_bwd(rows, out_path: str, others: dict[str, str], rounds: int = 3) -> None:
    """``tune_against`` for the Hopper backward: this tree's dQ and dK/dV kernels (each on
    its own tiles and default launch) against those of each other version, on the same
    forward's output and the same dO, with our forward and SDPA's forward and fwd+bwd, in
    ``rounds`` rounds of rotating order. ``fb_over_fwd``: the fwd+bwd speedup of our forward and
    the version's two kernels, over the forward's speedup. Each other version's gradients
    are compared with ours (``agreement``: relative norm of the difference, 0 where
    bit-identical). "ours_items" is our dK/dV kernel launched one program per item,
    "ours_kv1" holding one item's K and V at a time."""
    from spcompile.codegen import launch, sm90_bwd

    packages = {name: _package_copy(name, path) for name, path in others.items()}
    results = []
    for row in rows:
        s = row.seq_len
        q, k, v, do, qg, kg, vg = _grad_inputs(s)
        scale = D**-0.5
        fwd_plan = launch.forward_plan(
            lambda spec, s=s, p=row.pattern: build_plan(p, s, s, specialized=spec), q, v)
        out, lse = launch.forward(q, k, v, fwd_plan, scale)
        versions = {"ours": (sm90_bwd, row.pattern, build_plan)}
        for name, pkg in packages.items():
            versions[name] = (pkg.codegen.sm90_bwd, _as_pattern(pkg, row.pattern),
                              pkg.plan.tiles.build_plan)
        fns = {"sdpa_fb": lambda qg=qg, kg=kg, vg=vg, do=do: F.scaled_dot_product_attention(
            qg, kg, vg).backward(do),
               "sdpa": functools.partial(F.scaled_dot_product_attention, q, k, v),
               "fwd": functools.partial(launch.forward, q, k, v, fwd_plan, scale)}
        grads = {}
        for name, (mod, pattern, build) in versions.items():
            dq_plan = build(pattern, s, s, *mod.dq_tiles(pattern, s, s))
            dkdv_plan = build(pattern, s, s, *mod.dkdv_tiles(pattern, s, s))
            dq_fn = functools.partial(mod.attn_bwd_dq_sm90, do, q, k, v, out, lse, dq_plan,
                                      scale)
            dq, delta = dq_fn()
            dkdv_fn = functools.partial(mod.attn_bwd_dkdv_sm90, do, q, k, v, lse, delta,
                                        dkdv_plan, scale)
            grads[name] = (dq, *dkdv_fn())
            fns[f"{name}_dq"], fns[f"{name}_dkdv"] = dq_fn, dkdv_fn
            if name == "ours":  # one program per item; one item's K and V at a time
                fns["ours_items_dkdv"] = functools.partial(
                    dkdv_fn, programs=dkdv_plan.num_kv_tiles * B * H)
                fns["ours_kv1_dkdv"] = functools.partial(dkdv_fn, kv_buffers=1)
                grads["ours_kv1"] = (dq, *fns["ours_kv1_dkdv"]())
        timed = interleaved_ms(fns, rounds=rounds, rotate=True)
        ms = {n: statistics.median(r) for n, r in timed.items()}
        fwd_speedup = ms["sdpa"] / ms["fwd"]
        for name in grads:
            if name == "ours_kv1":
                continue
            agreement = max(float((a.float() - b.float()).norm() / b.float().norm())
                            for a, b in zip(grads[name], grads["ours"], strict=True))
            res = {"id": row.id, "variant": name, "agreement": agreement,
                   "dq_ms": ms[f"{name}_dq"], "dkdv_ms": ms[f"{name}_dkdv"],
                   "dq_rounds_ms": timed[f"{name}_dq"],
                   "dkdv_rounds_ms": timed[f"{name}_dkdv"], "sdpa_fb_ms": ms["sdpa_fb"],
                   # > 0: this version is slower than ours
                   "dq_gain": ms[f"{name}_dq"] / ms["ours_dq"] - 1.0,
                   "dkdv_gain": ms[f"{name}_dkdv"] / ms["ours_dkdv"] - 1.0,
                   "fwd_ms": ms["fwd"], "sdpa_ms": ms["sdpa"],
                   "fb_over_fwd": ms["sdpa_fb"] / (ms["fwd"] + ms[f"{name}_dq"]
                                                   + ms[f"{name}_dkdv"]) / fwd_speedup}
            results.append(res)
            print(json.dumps(res), flush=True)
        for name in ("ours_items", "ours_kv1"):
            res = {"id": row.id, "variant": name, "dkdv_ms": ms[f"{name}_dkdv"],
                   "dkdv_rounds_ms": timed[f"{name}_dkdv"],
                   "dkdv_gain": ms[f"{name}_dkdv"] / ms["ours_dkdv"] - 1.0,
                   "fb_over_fwd": ms["sdpa_fb"] / (ms["fwd"] + ms["ours_dq"]
                                                   + ms[f"{name}_dkdv"]) / fwd_speedup}
            if name in grads:
                res["agreement"] = max(float((a.float() - b.float()).norm() / b.float().norm())
                                       for a, b in zip(grads[name], grads["ours"], strict=True))
            results.append(res)
            print(json.dumps(res), flush=True)
        if out_path:
            Path(out_path).write_text(json.dumps(results, indent=1))


def _package_copy(name: str, path: str):
    """The spcompile package copied into ``path``, imported as ``name`` with the submodules
    ``tune_against`` and ``tune_against_bwd`` run (its ``__init__`` left unexecuted)."""
    import importlib
    import types

    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(path).resolve())]
    sys.modules[name] = pkg
    for sub in ("spec.patterns", "plan.tiles", "codegen.launch", "codegen.sm90_bwd"):
        module = importlib.import_module(f"{name}.{sub}")
        parent, _, leaf = sub.rpartition(".")
        setattr(sys.modules[f"{name}.{parent}"], leaf, module)
        setattr(pkg, parent, sys.modules[f"{name}.{parent}"])
    return pkg


def _as_pattern(pkg, pattern: sp.Pattern):
    """``pattern`` as ``pkg``'s pattern: through its spec form (``to_dict``), which every
    revision reads back (``pattern_from_dict``)."""
    return pkg.spec.patterns.pattern_from_dict(pattern.to_dict())


def tune_sm90_bwd(rows, out_path: str) -> None:
    """The Hopper backward kernels (``codegen.sm90_bwd``, each on its own tiles; pipelined and
    plain; dQ over 64- and 128-token KV tiles) at every ring depth that fits, against the
    Triton kernels at the backward's default tiles, with our forward and SDPA's forward and
    fwd+bwd: timed in three alternating rounds. Each Gluon variant's gradients are checked
    against the Triton kernel's; the summary's fwd+bwd over SDPA's is our forward + the fastest
    dQ + the fastest dK/dV, all from this run."""
    from spcompile.codegen.launch import forward
    from spcompile.codegen.sm90_bwd import (
        attn_bwd_dkdv_sm90,
        attn_bwd_dq_sm90,
        dkdv_stages,
        dkdv_tiles,
        dq_stages,
        dq_tiles,
    )

    results = []
    for row in rows:
        s = row.seq_len
        q, k, v, do, qg, kg, vg = _grad_inputs(s)
        scale = 1.0 / D ** 0.5
        fwd_plan = build_plan(row.pattern, s, s)
        out, lse = forward(q, k, v, fwd_plan, scale)
        plan = build_plan(row.pattern, s, s, *backward_tiles(row.pattern, s, s, D))
        ref_dq, delta = attn_bwd_dq(do, q, k, v, out, lse, plan, scale)
        ref_dkdv = attn_bwd_dkdv(do, q, k, v, lse, delta, plan, scale)
        fns = {"sdpa": functools.partial(F.scaled_dot_product_attention, q, k, v),
               "sdpa_fb": lambda qg=qg, kg=kg, vg=vg, do=do: F.scaled_dot_product_attention(
                   qg, kg, vg).backward(do),
               "fwd": functools.partial(forward, q, k, v, fwd_plan, scale),
               "dq_triton": functools.partial(attn_bwd_dq, do, q, k, v, out, lse, plan, scale),
               "dkdv_triton": functools.partial(attn_bwd_dkdv, do, q, k, v, lse, delta, plan,
                                                scale)}
        plans = {"dq_triton": plan, "dkdv_triton": plan}
        dq_plan = build_plan(row.pattern, s, s, *dq_tiles(row.pattern, s, s))
        dkdv_plan = build_plan(row.pattern, s, s, *dkdv_tiles(row.pattern, s, s))
        dq128_plan = build_plan(row.pattern, s, s, *dq_tiles(row.pattern, s, s, kv_tokens=128))
        kernels = [(kind, p, dq_stages(p, D), ref_dq[:1],
                    functools.partial(attn_bwd_dq_sm90, do, q, k, v, out, lse, p, scale,
                                      pipelined=pipelined))
                   for kind, p, pipelined in (("dq", dq_plan, True), ("dq_plain", dq_plan, False),
                                              ("dq128", dq128_plan, True),
                                              ("dq128_plain", dq128_plan, False))]
        kernels += [(kind, dkdv_plan, dkdv_stages(dkdv_plan, D), ref_dkdv,
                     functools.partial(attn_bwd_dkdv_sm90, do, q, k, v, lse, delta, dkdv_plan,
                                       scale, pipelined=pipelined))
                    for kind, pipelined in (("dkdv", True), ("dkdv_plain", False))]
        agreement = {}
        for kind, sm90_plan, most, ref, kernel in kernels:
            for stages in range(2, most + 1):
                fn = functools.partial(kernel, stages=stages)
                try:
                    got = fn()
                except Exception as e:  # a variant that fails to build is a result too
                    print(row.id, kind, f"s{stages}: {type(e).__name__}: {e}"[:300], flush=True)
                    break
                if got is None:
                    print(row.id, kind, "sm90: declined the tensors", flush=True)
                    break
                name = f"{kind}_sm90_s{stages}"
                agreement[name] = max(float((a.float() - b.float()).norm() / b.float().norm())
                                      for a, b in zip(got, ref, strict=False))
                fns[name], plans[name] = fn, sm90_plan
        rounds = interleaved_ms(fns)
        ms = {name: statistics.median(r) for name, r in rounds.items()}
        for name in fns:
            res = {"id": row.id, "variant": name, "ms": ms[name], "rounds_ms": rounds[name],
                   "agreement": agreement.get(name)}
            if name in plans:
                p = plans[name]
                base = ms["dkdv_triton" if name.startswith("dkdv") else "dq_triton"]
                res.update(q=p.q_tile, kv=p.kv_tile, tile_bound=p.tile_bound,
                           vs_triton=base / ms[name])
            results.append(res)
            print(json.dumps(res), flush=True)
        best = {kind: min((n for n in fns if n.startswith(kind)), key=ms.__getitem__)
                for kind in ("dq", "dkdv")}
        summary = {"id": row.id, "summary": True, "best": best,
                   "fwd_speedup": ms["sdpa"] / ms["fwd"],
                   "fb_speedup_triton": ms["sdpa_fb"] / (ms["fwd"] + ms["dq_triton"]
                                                         + ms["dkdv_triton"]),
                   "fb_speedup_best": ms["sdpa_fb"] / (ms["fwd"] + ms[best["dq"]]
                                                       + ms[best["dkdv"]])}
        results.append(summary)
        print("BEST", json.dumps(summary), flush=True)
        if out_path:
            Path(out_path).write_text(json.dumps(results, indent=1))


def tune_topk(rows, out_path: str) -> None:
    """TopK: launch configs of the forward and backward kernels over one fixed selection
    (estimation excluded: it does not depend on the launch)."""
    results = []
    for row in rows:
        s, p = row.seq_len, row.pattern
        q, k, v, do = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16)
                       for _ in range(4))
        sdpa = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        plan = build_plan(p, s, s)
        sel = estimate_blocks(p, q, k)
        lists, lists_t = block_lists(p, sel, s, H), block_lists(p, sel, s, H, transposed=True)
        out, lse = attn_fwd(q, k, v, plan, lists=lists)
        for warps, stages in itertools.product((4, 8), (1, 2, 3, 4)):
            cfg = LaunchConfig(warps, stages)
            try:
                fwd = median_ms(functools.partial(attn_fwd, q, k, v, plan, config=cfg,
                                              lists=lists))
                bwd = median_ms(functools.partial(attn_bwd, do, q, k, v, out, lse, plan,
                                              config=cfg, lists=lists, lists_t=lists_t))
            except Exception as e:
                print(row.id, warps, stages, "ERROR", type(e).__name__, str(e)[:100])
                continue
            res = {"id": row.id, "warps": warps, "stages": stages, "fwd_ms": fwd,
                   "bwd_ms": bwd, "fwd_speedup_no_estimation": sdpa / fwd}
            results.append(res)
            print(json.dumps(res), flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


def _grad_inputs(s: int) -> tuple[torch.Tensor, ...]:
    """Fresh bf16 q, k, v and dO of ``s`` tokens, and copies of q, k, v that take gradients
    (SDPA's fwd+bwd runs on those)."""
    q, k, v, do = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, do, *(x.clone().requires_grad_() for x in (q, k, v))


def _backward_inputs(row):
    """Fresh q, k, v, dO; our forward's out and LSE at the default tiles; SDPA's fwd+bwd time
    and our forward's time, both from this run; and the forward's plan."""
    s = row.seq_len
    q, k, v, do, qg, kg, vg = _grad_inputs(s)

    def sdpa_fb():
        F.scaled_dot_product_attention(qg, kg, vg).backward(do)

    sdpa = median_ms(sdpa_fb)
    fwd_plan = build_plan(row.pattern, s, s)
    out, lse = attn_fwd(q, k, v, fwd_plan)
    fwd_ms = median_ms(functools.partial(attn_fwd, q, k, v, fwd_plan))
    return q, k, v, do, out, lse, sdpa, fwd_ms, fwd_plan


# Backward sweep: (q tokens, kv tokens, warps, stages) per kernel. The dQ loop steps over KV
# tiles and the dK/dV loop over Q tiles: each is tried with its own tile long and its loop's
# tile short, as well as at the square 64/64 default.
DQ_VARIANTS = [(64, 64, 4, 2), (128, 32, 4, 2), (128, 32, 8, 2), (128, 32, 8, 3),
               (128, 64, 8, 2), (64, 32, 4, 3)]
DKDV_VARIANTS = [(64, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (32, 128, 8, 3),
                 (64, 128, 8, 2), (32, 64, 4, 3)]


def tune_bwd(rows, out_path: str) -> None:
    """The two backward kernels timed apart, each over its own tiles and launch configs
    (``DQ_VARIANTS``, ``DKDV_VARIANTS``). Each variant's gradient is checked against the first
    variant's; the row's best fwd+bwd over SDPA's is the fastest dQ plus the fastest dK/dV
    plus our forward, all timed in this run. Also timed: delta = rowsum(dO * O) in torch, as
    the backward computed it before the dQ kernel took it over."""
    results = []
    for row in rows:
        s = row.seq_len
        q, k, v, do, out, lse, sdpa, fwd_ms, _ = _backward_inputs(row)
        scale = 1.0 / D ** 0.5
        def torch_delta(do=do, out=out):
            return (do.float() * out.float()).sum(-1)

        torch_delta_ms = median_ms(torch_delta)
        delta = torch_delta()  # the dK/dV variants' input: it does not depend on tiles
        best = {}
        for kind, variants in (("dq", DQ_VARIANTS), ("dkdv", DKDV_VARIANTS)):
            ref = None
            for mq, mk, warps, stages in variants:
                qt, kt = _tiles(row, mq, mk)
                plan = build_plan(row.pattern, s, s, qt, kt)
                cfg = LaunchConfig(warps, stages)
                if kind == "dq":
                    fn = functools.partial(attn_bwd_dq, do, q, k, v, out, lse, plan, scale, cfg)
                else:
                    fn = functools.partial(attn_bwd_dkdv, do, q, k, v, lse, delta, plan, scale,
                                           cfg)
                try:
                    grads = fn()[:1] if kind == "dq" else fn()
                    ms = median_ms(fn)
                except Exception as e:
                    print(row.id, kind, qt, kt, warps, stages, "ERROR", type(e).__name__,
                          str(e)[:100], flush=True)
                    continue
                ref = grads if ref is None else ref
                err = max(float((a.float() - b.float()).norm() / b.float().norm())
                          for a, b in zip(grads, ref, strict=True))
                res = {"id": row.id, "kernel": kind, "q": qt, "kv": kt, "warps": warps,
                       "stages": stages, "ms": ms, "agreement": err,
                       "tile_bound": plan.tile_bound}
                results.append(res)
                print(json.dumps(res), flush=True)
                if err < 2e-2 and ms < best.get(kind, (float("inf"),))[0]:
                    best[kind] = (ms, res)
        bwd_ms = best["dq"][0] + best["dkdv"][0]
        summary = {"id": row.id, "summary": True, "sdpa_fb_ms": sdpa, "fwd_ms": fwd_ms,
                   "torch_delta_ms": torch_delta_ms, "best_dq": best["dq"][1],
                   "best_dkdv": best["dkdv"][1], "best_bwd_ms": bwd_ms,
                   "best_fb_speedup": sdpa / (fwd_ms + bwd_ms)}
        results.append(summary)
        print("BEST", json.dumps(summary), flush=True)
        if out_path:  # after every row: a run cut short keeps what it measured
            Path(out_path).write_text(json.dumps(results, indent=1))


def tune_bwd_orders(rows, out_path: str) -> None:
    """The backward at its default tiles (``choose.backward_tiles``) with programs numbered
    tile-major vs head-major; then, head-major, the other tile pairs (1-D rows' backward tiles
    had never been swept). Gradients checked against the first variant's; fwd+bwd over SDPA's
    fwd+bwd in the same run."""
    results = []
    for row in rows:
        s = row.seq_len
        q, k, v, do, out, lse, sdpa, fwd_ms, _ = _backward_inputs(row)
        default = backward_tiles(row.pattern, s, s)
        pairs = [(128, 64), (64, 128), (128, 128), (64, 64)]
        variants = [(default, False), (default, True)]
        for mq, mk in pairs:
            tiles = _tiles(row, mq, mk)
            if tiles != default:
                variants.append((tiles, True))
        ref = None
        for (qt, kt), head_major in variants:
            plan = build_plan(row.pattern, s, s, qt, kt)
            cfg = dataclasses.replace(bwd_config(plan.q_layout.tile_size,
                                                 plan.kv_layout.tile_size),
                                      head_major=head_major)
            try:
                grads = attn_bwd(do, q, k, v, out, lse, plan, config=cfg)
                ms = median_ms(functools.partial(attn_bwd, do, q, k, v, out, lse, plan, config=cfg))
            except Exception as e:
                print(row.id, qt, kt, head_major, "ERROR", type(e).__name__, str(e)[:100])
                continue
            ref = grads if ref is None else ref
            err = max(float((a.float() - b.float()).norm() / b.float().norm())
                      for a, b in zip(grads, ref, strict=True))
            res = {"id": row.id, "q": qt, "kv": kt, "head_major": head_major,
                   "warps": cfg.num_warps, "stages": cfg.num_stages, "bwd_ms": ms,
                   "fwd_ms": fwd_ms, "fb_speedup": sdpa / (fwd_ms + ms), "agreement": err}
            results.append(res)
            print(json.dumps(res), flush=True)
        print("SUMMARY", row.id, "fwd+bwd over SDPA:", ", ".join(
            f"{r['q']}/{r['kv']} {'head' if r['head_major'] else 'tile'} {r['fb_speedup']:.2f}x"
            for r in results if r["id"] == row.id), flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
