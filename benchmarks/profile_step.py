"""Where a training step's time goes: host work against GPU work, kernel by kernel.

    python benchmarks/profile_step.py [--rows blk16k,sw16k] [--out results.json]

For each row, the step ``run.py --bwd`` times (grads dropped, ``sparse_attention(...)
.backward(do)``), and SDPA's step beside it:

- ``step_ms``: the step's do_bench median (what run.py reports);
- ``host_ms``: the host time to issue one step while the GPU is busy (a long sleep kernel is
  queued first, so no launch waits on the GPU): Python, dispatch, autograd and launches;
- ``graph_ms``: the step captured once in a CUDA graph and replayed, timed as ``step_ms``: the
  same kernels with no host work between them. Where it is below ``step_ms``, the host issued
  some launch late in the timed step;
- ``back_to_back_ms``: steps issued back to back, the L2 not cleared between them, over one
  pair of events: the GPU time of a step when the host keeps ahead;
- ``kernels``: every GPU kernel of one step (torch.profiler, mean over steps) and their sum,
  and the GPU's idle time before each (steps back to back). These are the profiler's: on the
  H100 its kernel times ran 5-7% under every event-timed measure of the same work, and a step
  whose host time is near its GPU time shows idle time under the profiler alone (session 14:
  blk16k's ``graph_ms`` equal to its ``step_ms``, with 46 us idle before dQ here);
- ``host_top``: for our steps, the Python functions taking the most host time (cProfile, own
  time per step, the GPU kept busy as for ``host_ms``). Autograd runs the step's backward on
  a thread of its own, out of cProfile's sight, so the backward op is also measured alone
  (``bwd_op``: called directly on the forward's output).

``fb`` is the eager step (``ops.EagerAttention``); ``fb_op`` the same step through the custom
op and its registered autograd, as a traced call runs it; ``bwd_body`` the backward op's body
called directly.

A step whose ``host_ms`` is near its ``step_ms`` is bound by the host; one whose kernel sum
is near it is bound by its kernels. The forward alone (no grad) is measured the same way.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from run import B, D, H
from suite import suite

import spcompile as sp
from spcompile.ops import attention_backward, attention_backward_op, attention_op, pattern_key
from spcompile.timing import back_to_back_ms, median_ms

STEPS = 20  # steps per host measurement and per profile


def host_ms(fn, steps: int = STEPS) -> float:
    """Median host milliseconds to issue ``fn`` once, with the GPU kept busy behind a sleep
    kernel so that no call waits for it (five batches of ``steps`` calls)."""
    batches = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(500_000_000)  # ~0.3 s of GPU time: the queue never drains
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        batches.append((time.perf_counter() - t0) * 1e3 / steps)
        torch.cuda.synchronize()
    return statistics.median(batches)


def graph_ms(fn) -> float | str:
    """``median_ms`` of ``fn`` captured in a CUDA graph (warmed up on a side stream first, as
    capture asks), or why it could not be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # report, never hide
        return f"{type(e).__name__}: {str(e)[:200]}"
    return median_ms(graph.replay)


def kernels(fn, steps: int = STEPS) -> tuple[dict[str, float], dict[str, float]]:
    """Mean GPU microseconds per call of each kernel ``fn`` launches, and the mean idle GPU
    time before each (since the previous kernel ended; calls back to back), from
    torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    idle: dict[str, float] = collections.defaultdict(float)
    ran = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    for before, e in zip([None, *ran[:-1]], ran, strict=True):
        total[e.name[:70]] += e.device_time / steps
        if before is not None:
            idle[e.name[:70]] += max(0.0, e.time_range.start - before.time_range.end) / steps
    return dict(sorted(total.items(), key=lambda kv: -kv[1])), dict(idle)


def host_top(fn, steps: int = STEPS, top: int = 12) -> list[tuple[str, float]]:
    """(function, own host microseconds per call of ``fn``) for the ``top`` costliest."""
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim, tottime, cumtime, _)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [(f"{Path(f).name}:{line} {name}", t * 1e6 / steps)
            for (f, line, name), (_, _, t, _, _) in rows]


def measure(fn, profile_host: bool = False) -> dict:
    ks, idle = kernels(fn)
    res = {"step_ms": median_ms(fn), "graph_ms": graph_ms(fn),
           "back_to_back_ms": back_to_back_ms(fn, calls=50), "host_ms": host_ms(fn),
           "kernel_sum_ms": sum(ks.values()) / 1e3, "kernels_us": ks, "idle_before_us": idle}
    if profile_host:
        res["host_top"] = host_top(fn)
    return res


def profile_row(row) -> dict:
    s = row.seq_len
    q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def step(attention):
        def run():
            qg.grad = kg.grad = vg.grad = None
            attention(qg, kg, vg).backward(do)
        return run

    ours = functools.partial(sp.sparse_attention, pattern=row.pattern)
    key = pattern_key(row.pattern)

    def through_op(q, k, v):  # the custom op and its registered autograd, as a traced call
        return attention_op(q, k, v, key, D**-0.5, "triton", [], [])[0]

    res = {"id": row.id, "tokens": s}
    with torch.no_grad():
        res["fwd"] = measure(lambda: ours(q, k, v), profile_host=True)
        res["sdpa_fwd"] = measure(lambda: F.scaled_dot_product_attention(q, k, v))
    res["fb"] = measure(step(ours), profile_host=True)
    res["fb_op"] = measure(step(through_op))
    out, lse = sp.sparse_attention(q, k, v, row.pattern, return_lse=True)
    args = (do, q, k, v, out, lse, key, D**-0.5, "triton", [], [])
    res["bwd_op"] = measure(lambda: attention_backward_op(*args), profile_host=True)
    res["bwd_body"] = measure(lambda: attention_backward(*args))
    res["sdpa_fb"] = measure(step(F.scaled_dot_product_attention))
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="blk16k,sw16k")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    results = []
    for row in suite():
        if row.id not in wanted:
            continue
        res = profile_row(row)
        results.append(res)
        for name in ("fwd", "sdpa_fwd", "fb", "fb_op", "sdpa_fb", "bwd_op", "bwd_body"):
            m = res[name]
            graph = m["graph_ms"]
            graph = f"{graph:7.3f} ms" if isinstance(graph, float) else graph
            print(f"{row.id:8s} {name:9s} step {m['step_ms']:7.3f} ms  graph {graph}  back to "
                  f"back {m['back_to_back_ms']:7.3f} ms  host {m['host_ms']:6.3f} ms  kernels "
                  f"{m['kernel_sum_ms']:7.3f} ms")
            for kname, us in m["kernels_us"].items():
                print(f"{'':20s}{us:9.1f} us  {kname}  (idle before: "
                      f"{m['idle_before_us'].get(kname, 0.0):.1f} us)")
            for fname, us in m.get("host_top", []):
                print(f"{'':20s}{us:9.1f} us  host: {fname}")
        if args.out:
            env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}
            Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
