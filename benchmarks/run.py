"""Run the suite on a GPU: check correctness, then time SDPA, FlexAttention and spcompile.

    python benchmarks/run.py [--rows sw16k,na2d31] [--bwd] [--out results.json]

Correctness: on fresh random inputs, 64 sampled query rows of every head are compared with a
float64 masked softmax over all keys (no S x S mask is built). Timing: SDPA and our forward in
three alternating rounds (``spcompile.timing.interleaved_ms``: do_bench medians of at least 5
runs each), all in one process; each is the median of its rounds, and speedup = SDPA time / our
time, both measured in this run (the rounds are recorded).
FlexAttention uses a compiled flex_attention and a block mask built once outside the timed
region (row-major tokens, as its users would write it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from suite import Row, held_out, suite

import spcompile as sp
from spcompile.codegen import sm90
from spcompile.codegen.fwd import attn_fwd
from spcompile.codegen.launch import backward_kernels, forward, forward_kernel, forward_plan
from spcompile.codegen.sm90_bwd import dkdv_tiles, dq_tiles
from spcompile.plan.choose import backward_tiles
from spcompile.plan.tiles import allowed_pairs, build_plan
from spcompile.plan.topk import block_lists, estimate_blocks, selected_pairs
from spcompile.sim import simulate
from spcompile.timing import interleaved_ms, median_ms

B, H, D = 1, 24, 128


def row_mask(row: Row, rows: torch.Tensor, q, k) -> torch.Tensor:
    """Bool [B|1, H|1, len(rows), S]: which keys the sampled query rows may see."""
    s, p = row.seq_len, row.pattern
    j = torch.arange(s)[None, :]
    if isinstance(p, sp.TopK):
        blocks = estimate_blocks(p, q, k).cpu()
        out = blocks[:, :, (rows.cpu() // p.block)[:, None], j // p.block]
        return out & (j <= rows.cpu()[:, None]) if p.causal else out
    if isinstance(p, sp.PerHead):
        return torch.stack([m.allowed(rows.cpu()[:, None], j, s, s).expand(len(rows), s)
                            for m in p.resolve(H)])[None]
    return p.allowed(rows.cpu()[:, None], j, s, s)[None, None]


def sampled_error(row: Row, q, k, v, out) -> float:
    """Relative error of 64 random query rows (all heads) against float64 masked softmax."""
    s = row.seq_len
    rows = torch.randperm(s, device=q.device)[:64].sort().values
    allowed = row_mask(row, rows, q, k)
    qs = q[:, :, rows].double()
    scores = qs @ k.double().transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    ref = scores.softmax(-1).nan_to_num(0.0) @ v.double()
    got = out[:, :, rows].double()
    return float((got - ref).norm() / ref.norm())


def kept_mass(row: Row, q, k, v=None) -> dict[str, float]:
    """On 64 sampled query rows, all heads: the exact attention probability the selection
    keeps ("kept", 1.0 = nothing lost), what the best blocks by exact mass would keep with the
    same budget per row ("oracle"), and, with ``v``, the output's error against exact dense
    attention ("out_err")."""
    s = row.seq_len
    rows = torch.randperm(s, device=q.device)[:64].sort().values
    allowed = row_mask(row, rows, q, k).to(q.device)
    scores = q[:, :, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(D)
    if getattr(row.pattern, "causal", False):  # exact attention of a causal site is causal
        later = torch.arange(s, device=q.device)[None, :] > rows[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    probs = scores.softmax(-1)
    out = {"kept": float((probs * allowed).sum(-1).mean())}
    block = getattr(row.pattern, "block", None)
    if block and s % block == 0:
        per_block = probs.unflatten(-1, (s // block, block)).sum(-1)
        budget = int(allowed.unflatten(-1, (s // block, block)).any(-1).sum(-1).max())
        out["oracle"] = float(per_block.topk(budget, dim=-1).values.sum(-1).mean())
    if v is not None:
        exact = probs @ v.float()
        kept = (probs * allowed) / (probs * allowed).sum(-1, keepdim=True)
        out["out_err"] = float(((kept @ v.float()) - exact).norm() / exact.norm())
    return out


def structured_qk(s: int, heads: int = H, device: str = "cuda", dtype=torch.bfloat16,
                  columns: int = 8, width: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose attention is local plus a few strong key columns, as in trained LLMs.

    Tokens share a smooth feature (a moving sum of noise over ``width`` tokens: the correlation
    of tokens i and j is 1 - |i - j| / width), so a query's largest logits (~10) are its
    neighbours'; ``columns`` random keys point along a direction every query leans to (logit
    ~6); the rest average 0 with a spread of ~1, as logits of unrelated tokens do.
    """
    noise = torch.randn(B, heads, s + width, D, device=device).cumsum(2)
    local = (noise[:, :, width:] - noise[:, :, :-width]) / width**0.5
    shared = torch.randn(B, heads, 1, D, device=device)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    radius = (12 * D**0.5) ** 0.5
    q = radius * unit(local + 0.5 * torch.randn_like(local) + 0.7 * unit(shared) * D**0.5)
    k = radius * unit(local + 0.5 * torch.randn_like(local))
    strong = torch.randperm(s, device=device)[:columns]
    k[:, :, strong] = radius * unit(shared).expand(-1, -1, columns, -1) * 1.2
    return q.to(dtype), k.to(dtype)


def ours_plan(row: Row, q, v):
    """The forward plan of a static single pattern, as ``sp.sparse_attention`` builds it (its
    default tiles are the Gluon forward's where that kernel takes the call)."""
    s = row.seq_len
    return forward_plan(lambda sm90: build_plan(row.pattern, s, s, head_dim=D, specialized=sm90),
                        q, v)


def sparse_stats(row: Row, q, k) -> tuple[int, float, str, str]:
    """(allowed pairs per batch and head, tile bound, q tiles, kv tiles) of this row's input."""
    s, p = row.seq_len, row.pattern
    if isinstance(p, sp.TopK):
        sel = estimate_blocks(p, q, k)
        lists = block_lists(p, sel, s, H)
        visited = int(lists.full_cnt.sum() + lists.part_cnt.sum())
        n = sel.shape[-1]
        pairs = selected_pairs(p, sel, s) / (sel.shape[0] * sel.shape[1])
        return pairs, n * n * lists.num_lists / visited, str(p.block), str(p.block)
    if isinstance(p, sp.PerHead):
        plans = [build_plan(m, s, s) for m in p.resolve(H)]
        pairs = sum(allowed_pairs(m, s, s) for m in p.resolve(H)) / H
        total = sum(pl.num_q_tiles * pl.num_kv_tiles for pl in plans)
        tiles = sorted({f"{pl.q_tile}/{pl.kv_tile}" for pl in plans})
        return pairs, total / sum(pl.num_visited for pl in plans), ", ".join(tiles), ""
    plan = ours_plan(row, q, k)
    return allowed_pairs(p, s, s), plan.tile_bound, str(plan.q_tile), str(plan.kv_tile)


def flex_fn(row: Row, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s, pattern = row.seq_len, row.pattern

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx, kv_idx, s, s)

    # _compile=True builds the block mask without materializing S x S (65k rows: 384 GB).
    block_mask = create_block_mask(mask_mod, None, None, s, s, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def ours_fn(row: Row, q, k, v):
    """Our forward as users call it; static single patterns time the kernel launch alone
    (as in every earlier run), TopK includes its estimation, PerHead its per-run launches."""
    if isinstance(row.pattern, (sp.TopK, sp.PerHead)):
        return lambda: sp.sparse_attention(q, k, v, row.pattern)
    plan = ours_plan(row, q, v)
    return lambda: forward(q, k, v, plan)


def kernel_of(row: Row, q, v) -> str:
    """Which forward kernel ``ours_fn`` runs ("sm90" or "triton"; TopK and PerHead: see
    ``codegen.launch``, reported as the default)."""
    if isinstance(row.pattern, (sp.TopK, sp.PerHead)):
        return "triton"
    return forward_kernel(ours_plan(row, q, v), q, v)


def backward_kernels_of(row: Row, q, v) -> tuple[str, str]:
    """Which dQ and dK/dV kernels the backward runs ("sm90" or "triton", as ``kernel_of``)."""
    if isinstance(row.pattern, (sp.TopK, sp.PerHead)):
        return "triton", "triton"
    s = row.seq_len
    plans = [build_plan(row.pattern, s, s, *tiles(row.pattern, s, s))
             for tiles in (backward_tiles, dq_tiles, dkdv_tiles)]
    return backward_kernels(q, v, None, *plans)


def run_row(row: Row, args) -> dict:
    s = row.seq_len
    dev = "cuda"
    q, k, v = (torch.randn(B, H, s, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    t0 = time.time()
    pairs, tile_bound, q_tile, kv_tile = sparse_stats(row, q, k)
    plan_s = time.time() - t0
    fn = ours_fn(row, q, k, v)
    t0 = time.time()
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    torch.cuda.synchronize()
    first_call_s = time.time() - t0
    err = sampled_error(row, q, k, v, out)
    predicted = simulate(row.pattern, s, s, heads=H, head_dim=D, device="current")
    res = {"id": row.id, "tokens": s, "q_tile": q_tile, "kv_tile": kv_tile,
           "predicted_speedup": predicted.predicted_speedup, "batch": B, "heads": H, "head_dim": D,
           "flop_bound": s * s / pairs, "tile_bound": tile_bound, "rel_err": err,
           "plan_s": plan_s, "first_call_s": first_call_s, "goal": row.goal}
    if isinstance(row.pattern, sp.TopK):
        res["estimation_ms"] = median_ms(lambda: estimate_blocks(row.pattern, q, k))
        # The rest of the call, apart: the lists, then the attention kernel alone.
        sel = estimate_blocks(row.pattern, q, k)
        res["lists_ms"] = median_ms(lambda: block_lists(row.pattern, sel, s, H))
        lists = block_lists(row.pattern, sel, s, H)
        plan = build_plan(row.pattern, s, s)
        res["kernel_ms"] = median_ms(lambda: attn_fwd(q, k, v, plan, lists=lists))
        res["predicted_estimation_ms"] = predicted.estimation_ms
        res["kept_mass_random"] = kept_mass(row, q, k, v)
        if row.structured:
            qs, ks = structured_qk(s)
            res["kept_mass_structured"] = kept_mass(row, qs, ks, v)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "ours": fn}
    res["kernel"] = kernel_of(row, q, v)
    if res["kernel"] == "sm90":  # the Triton kernel on the same inputs, in the same rounds,
        res["sm90_persistent"] = sm90.persistent_call(k)
        res["assignment"] = "balanced"  # plan.assign.assign_items (session 10: a fixed stride)
        plan = build_plan(row.pattern, s, s)  # on its own default tiles
        res["triton_q_tile"], res["triton_kv_tile"] = str(plan.q_tile), str(plan.kv_tile)
        fns["triton"] = lambda: attn_fwd(q, k, v, plan)
        fns["triton"]()
    rounds = interleaved_ms(fns)
    sdpa_ms, ours_ms = (statistics.median(rounds[name]) for name in ("sdpa", "ours"))
    res.update(sdpa_ms=sdpa_ms, ours_ms=ours_ms, speedup=sdpa_ms / ours_ms,
               sdpa_rounds_ms=rounds["sdpa"], ours_rounds_ms=rounds["ours"])
    if "triton" in rounds:
        res["triton_ms"] = statistics.median(rounds["triton"])
        res["triton_speedup"] = sdpa_ms / res["triton_ms"]
        res["triton_rounds_ms"] = rounds["triton"]
    res["prediction_error"] = res["predicted_speedup"] / res["speedup"] - 1
    dense_flops = 4 * B * H * s * s * D
    res["sdpa_tflops"] = dense_flops / sdpa_ms / 1e9
    res["ours_dense_equiv_tflops"] = dense_flops / ours_ms / 1e9
    if row.flex and not args.no_flex:
        try:
            fn = flex_fn(row, q, k, v)
            fn()
            res["flex_ms"] = median_ms(fn)
            res["flex_speedup"] = sdpa_ms / res["flex_ms"]
        except Exception as e:  # report, never hide
            res["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if args.bwd:
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        # Gradients are dropped before each step, as optimizer.zero_grad() does by default
        # (set_to_none), so the step writes them instead of adding into the previous ones. With
        # --acc the accumulating step (every run before session 8) is timed too: its three
        # in-place adds over q, k and v (~0.3 ms at S = 16k on the H100) fall on both sides.
        def step(attention, accumulate: bool):
            def run():
                if not accumulate:
                    qg.grad = kg.grad = vg.grad = None
                attention(qg, kg, vg).backward(do)
            return run

        sdpa = F.scaled_dot_product_attention
        ours = functools.partial(sp.sparse_attention, pattern=row.pattern)
        t0 = time.time()  # the forward is built already: this is the backward's first call
        step(ours, False)()
        torch.cuda.synchronize()
        res["first_fb_call_s"] = time.time() - t0
        steps = {"sdpa": step(sdpa, False), "ours": step(ours, False)}
        if args.acc:
            steps.update(sdpa_acc=step(sdpa, True), ours_acc=step(ours, True))
        fb = interleaved_ms(steps)
        res["sdpa_fb_ms"], res["ours_fb_ms"] = (statistics.median(fb[n]) for n in ("sdpa", "ours"))
        if args.acc:
            res["sdpa_fb_acc_ms"], res["ours_fb_acc_ms"] = (statistics.median(fb[n])
                                                            for n in ("sdpa_acc", "ours_acc"))
            res["fb_acc_speedup"] = res["sdpa_fb_acc_ms"] / res["ours_fb_acc_ms"]
        res["dq_kernel"], res["dkdv_kernel"] = backward_kernels_of(row, q, v)
        # Memory above the inputs, outputs and gradients that any attention needs: O(S^2) would
        # show here (an S x S bool mask at 128k tokens is 16 GiB).
        qg.grad = kg.grad = vg.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(ours, False)()
        torch.cuda.synchronize()
        res["ours_fb_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res["fb_speedup"] = res["sdpa_fb_ms"] / res["ours_fb_ms"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="")
    parser.add_argument("--bwd", action="store_true")
    parser.add_argument("--acc", action="store_true",
                        help="with --bwd, also time the step that accumulates gradients")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    wanted = set(filter(None, args.rows.split(",")))
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env))
    results = []
    for row in suite() + [r for r in held_out() if r.id in wanted]:
        if wanted and row.id not in wanted:
            continue
        try:
            res = run_row(row, args)
        except Exception as e:
            res = {"id": row.id, "error": f"{type(e).__name__}: {e}"}
        results.append(res)
        print(json.dumps(res, default=str), flush=True)
        torch.cuda.empty_cache()
        if args.out:  # after every row: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1,
                                                 default=str))
    print()
    print(f"{'row':12s} {'flop':>6s} {'tile':>6s} {'err':>8s} {'sdpa ms':>8s} {'ours':>7s} "
          f"{'speedup':>8s} {'pred':>6s} {'goal':>5s} {'flex':>6s} {'eqTF':>6s}")
    for r in results:
        if "error" in r:
            print(f"{r['id']:12s} ERROR {r['error'][:100]}")
            continue
        flex = f"{r['flex_speedup']:.2f}x" if "flex_speedup" in r else "-"
        print(f"{r['id']:12s} {r['flop_bound']:6.2f} {r['tile_bound']:6.2f} {r['rel_err']:8.1e} "
              f"{r['sdpa_ms']:8.2f} {r['ours_ms']:7.3f} {r['speedup']:7.2f}x "
              f"{r['predicted_speedup']:5.2f}x {r['goal'] or 0:5.1f} "
              f"{flex:>6s} {r['ours_dense_equiv_tflops']:6.0f}"
              + (f"  fb {r['fb_speedup']:.2f}x ({r['fb_speedup'] / r['speedup']:.0%}"
                 + (f"; accumulating {r['fb_acc_speedup']:.2f}x" if "fb_acc_speedup" in r
                    else "") + ") "
                 f"dQ {r['dq_kernel']} dK/dV {r['dkdv_kernel']} "
                 f"+{r['ours_fb_peak_extra_mib']:.0f}MiB" if "fb_speedup" in r else "")
              + (f"  est {r['estimation_ms']:.2f} lists {r['lists_ms']:.2f} kernel "
                 f"{r['kernel_ms']:.2f} ms kept {r['kept_mass_random']['kept']:.3f}"
                 f"/{r.get('kept_mass_structured', {}).get('kept', float('nan')):.3f}"
                 if "estimation_ms" in r else "")
              + (f"  [{r['kernel']}; triton {r['triton_speedup']:.2f}x]"
                 if "triton_speedup" in r else ""))


if __name__ == "__main__":
    main()
