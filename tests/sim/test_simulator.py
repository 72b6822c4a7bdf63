"""The simulator: NATTEN's published bounds, the cost model's parts, profiles, reports, the fit,
the command line, and predicted against measured speedups on the H100.

Accuracy (``test_h100_predictions_match_measurements``): ``spcompile/sim/profiles/h100.json`` was
fitted to the Triton kernel of sessions 4-5 (FULL tiles from boxes, head-major items) and the
warp-specialized Hopper kernel of session 7 (``codegen.sm90``) with

    spcompile calibrate --device h100 \\
        --hold-out sw32k,csw32k,flux_gna,hunyuan_na,stream128k \\
        --from-results benchmarks/data/2026-11-23-s4-h100-loops.json \\
        benchmarks/data/2026-11-23-s5-h100-tune-nd.json \\
        benchmarks/data/2026-11-23-s5-h100-rescale.json \\
        benchmarks/data/2026-11-23-s5-h100-run-b.json@default \\
        benchmarks/data/2026-12-06-s7-h100-run-{a,b,c,d}.json \\
        benchmarks/data/2026-12-06-s9-h100-run-{a,b}.json \\
        benchmarks/data/2026-12-06-s9-h100-tune-sm90-fwd.json \\
        benchmarks/data/2026-12-07-s10-h100-run-{a,b}.json \\
        benchmarks/data/2026-12-07-s10-h100-tune-sm90-fwd.json \\
        benchmarks/data/2026-12-07-s12-h100-run-{a,b,c,d,e}.json \\
        benchmarks/data/2026-12-07-s14-h100-run-{a,c,d}.json \\
        benchmarks/data/2026-12-07-s14-h100-run-e.json@default \\
        benchmarks/data/2026-12-07-s14-h100-run-{f,g}.json \\
        --out spcompile/sim/profiles/h100.json

(rows of other kernels in those files are skipped by ``load_results``; a session-7 or -9 row
gives two measurements: the warp-specialized kernel, and the Triton kernel timed in the same
rounds on its own tiles). Session 9 added the warp-specialized kernel's 1-D launch at 128-token
KV tiles (fitted on sw16k and blk16k; sw32k and csw32k held out: +3.0% and -0.7%). Session 10
made that launch persistent (``sm90.persistent_for``): rows of the Gluon kernel count only where
they ran their plan's launch, so the 1-D launch is now fitted on session 10's rows alone
(sw16k +4.6%, blk16k -8.9%; sw32k and csw32k held out: +1.0% and +3.2%), the N-d launches on
sessions 7-10's one-program-per-item rows. ``host_us`` was re-measured (161 us a forward call),
which let blk16k's 0.36 ms rows into the fit. Session 11 made every launch persistent over
``plan.assign``'s lists, except where one head's K and V outgrow L2 (the hunyuan rows: one
program per item). Its rows replace the older ones of those launches: the 1-D and N-d
persistent launches are fitted on session 11's rows, with an item's start and end costed
apart (``item_overhead_us``: 0.68 us, against 2.48 us for a program of one item). Speedup
errors on session 11's run: sw16k +2.5%, blk16k -4.0%, na2d31 +0.0%, na2d63 -2.9%; held out:
sw32k -2.4%, csw32k -4.7%, flux_gna -3.5%. The hunyuan rows' launch is fitted on sessions
7-9's. Session 12 changed the Gluon forward's item boundary (Q in registers, the output's store
waited for at the next item's start): its runs replace session 11's, and the item's own
overhead fitted to zero (``item_overhead_us``: 0.0). Speedup errors on session 12's runs: sw16k
-1.6% and -0.8%, blk16k -4.0% and -2.0%, na2d31 +2.4%, na2d63 -4.1%, na3d +0.5%, flux_na -1.3%,
hunyuan_gna -1.5%; held out: sw32k -3.2% and -2.7%, csw32k -6.0% and -7.9%, flux_gna -6.6%,
hunyuan_na +17.4% (one program per item: 4.89x measured, against 5.31x in session 7; on the
median of the two, +12.4%).
Session 14 re-ran the whole suite on the same kernels and added its runs to the fit (the
coefficients moved by at most 6%). Speedup errors on session 14's runs: sw16k -1.1%, blk16k
-2.2%, -2.2%, -2.7% and +2.3%, na2d31 -4.5%, na2d63 -4.9%, na3d -3.6%, flux_na -7.3%,
hunyuan_gna -0.2%, vert16k +0.0% (Triton kernel); held out: sw32k -3.0%, csw32k -7.1%, flux_gna
-6.9%, hunyuan_na +13.5% (also on the median of its three runs of this launch, sessions 7, 12
and 14: 5.31x, 4.89x, 5.07x).
na3d left the held-out rows: its launch (64-token N-d KV boxes) ran only there, and without a
row of its own the model costs it at the nearest launch (-20.6% on na3d, in a trial fit).
Held out of that fit: every row (all configurations, both kernels) of sw32k, csw32k, flux_gna,
hunyuan_na and stream128k, and the whole of ``2026-11-23-s5-h100-run-a.json`` (a suite run at the
default tiles and launches in another process, never fitted). The test checks every default-launch
row (128-token Q tiles with the KV tokens ``plan.choose`` may pick, launched as
``codegen.fwd.default_config`` launches them: 1-D q128/kv64 at 4 warps, 2 stages; N-d q128/kv128 and
q128/kv64 at 8 warps, 3 stages; or the warp-specialized kernel) within 15% of the median of its
measurements (two to four runs for most rows), held out or not, and each single measurement within
18%: single runs of one row and launch differ by up to 19% on this H100 (hunyuan_na: 4.49x to 5.33x
over four runs; the H100 runs dense attention at its 700 W power cap, its clock moving between 1245
and 1980 MHz). Worst (session 14's fit): hunyuan_na's Gluon launch, held out, +17.8% on session
12's run (+13.5% on the median of its three runs); flux_gna, held out, -12.3% on one session-4
run. The other launch configurations (warps/stages around the default) are held to median error
under 10%, none beyond 50%.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import spcompile as sp
from spcompile.cli import main
from spcompile.codegen.fwd import default_config
from spcompile.plan.tiles import build_plan
from spcompile.sim import SimReport, builtin_profiles, load_profile, simulate
from spcompile.sim.calibrate import HOST_BOUND, Measurement, fit, load_results, predict_ms
from spcompile.sim.hardware import LaunchKey
from spcompile.sim.measure import l2_mib
from spcompile.sim.model import Problem, dense_sdpa_ms, launch_cost, makespan, workload_from_plan
from spcompile.sim.report import tile_map_image

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "benchmarks" / "data"
SUITE = ROOT / "benchmarks" / "suite.py"
VALIDATION = "2026-11-23-s5-h100-run-a.json@default"
DEFAULT_TOKENS = {1: {(128, 64)}, 2: {(128, 128), (128, 64)}, 3: {(128, 128), (128, 64)}}


# ---------------------------------------------------------------------------------------------
# NATTEN's analysis (GNA paper, Table/figures; NATTEN docs)


@pytest.mark.parametrize(("pattern", "q_tile", "kv_tile", "flop", "tile", "sparse"), [
    (sp.Neighborhood(shape=(32768,), window=2048), 256, 128, 16.0, 14.32, False),
    (sp.Neighborhood(shape=(32768,), window=2048, stride=256), 256, 128, 16.0, 16.0, True),
    (sp.Neighborhood(shape=(256, 256), window=80), (16, 8), (16, 8), 10.24, 7.51, False),
    (sp.Neighborhood(shape=(256, 256), window=80, stride=16), (16, 8), (16, 8), 10.24, 10.24,
     True),
    (sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24)), (2, 8, 8), (2, 8, 8), 11.11,
     5.44, False),
    (sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24), stride=(16, 8, 8)), (2, 8, 8),
     (2, 8, 8), 11.11, 11.11, True),
])
def test_natten_bounds(pattern, q_tile, kv_tile, flop, tile, sparse):
    r = simulate(pattern, q_tile=q_tile, kv_tile=kv_tile)
    assert r.flop_bound == pytest.approx(flop, abs=0.01)
    assert r.tile_bound == pytest.approx(tile, abs=0.01)
    assert r.block_sparse is sparse
    assert all(a.block_sparse for a in r.axes) is sparse
    assert (r.num_partial == 0) is sparse


def test_axis_verdicts_name_the_failing_condition():
    flux = simulate(sp.Neighborhood(shape=(256, 256), window=80), q_tile=(16, 8), kv_tile=(16, 8))
    assert "stride 1 is not a multiple of the q tile side 16" in flux.axes[0].reason
    assert "not on kv tile boundaries" in flux.axes[1].reason
    gna = simulate(sp.Neighborhood(shape=(256, 256), window=80, stride=16), q_tile=(16, 8),
                   kv_tile=(16, 8))
    assert "window 80 % kv tile 16 == 0" in gna.axes[0].reason
    odd = simulate(sp.Neighborhood(shape=(128, 128), window=31, stride=16), q_tile=(8, 16),
                   kv_tile=(8, 16))
    assert "window 31 is not a multiple of the kv tile side 8" in odd.axes[0].reason
    band = simulate(sp.Sliding(left=512, right=512), 8192)
    assert not band.block_sparse and "moves with every query" in band.axes[0].reason
    blocks = simulate(sp.Blocked(block=96), 8192, q_tile=128, kv_tile=64)
    assert "block 96 is not a multiple of the q tile 128" in blocks.axes[0].reason
    assert simulate(sp.Blocked(block=1024), 8192).block_sparse


def test_persistent_items_cost_their_own_start_and_end():
    """A persistent launch's item starts behind the previous item's end, so it is charged
    ``item_overhead_us``, not a program's ``q_tile_overhead_us``; a profile without the figure
    charges both alike."""
    import dataclasses

    profile = load_profile("h100")
    plan = build_plan(sp.Blocked(block=1024), 16384, 16384, (128,), (128,))
    problem = Problem(1, 24, 24, 16384, 16384, 128, "bf16")

    def cost(persistent, profile=profile):
        work = workload_from_plan(plan, problem, 12, 3, True, persistent)
        return launch_cost(work, profile, "bf16")

    k = profile.kernel
    assert cost(False).overhead_us == pytest.approx(k.q_tile_overhead_us)
    assert cost(True).overhead_us == pytest.approx(k.item_overhead_us)
    assert k.item_overhead_us < k.q_tile_overhead_us
    assert cost(True).kernel_ms < cost(False).kernel_ms
    older = dataclasses.replace(profile, kernel=dataclasses.replace(k, item_overhead_us=None))
    assert cost(True, older).kernel_ms == pytest.approx(cost(False).kernel_ms)


def test_report_says_how_the_gluon_forward_launches():
    """Persistent where one head's K and V fit in L2, else one program per item, and why
    (``codegen.sm90.persistent_for``); the Triton kernel's launch gets no such note."""
    def launch_notes(report):
        return [n for n in report.notes if n.startswith("launch:")]

    video = sp.Neighborhood(shape=(30, 48, 80), window=(18, 24, 24))
    one = launch_notes(simulate(video))
    assert len(one) == 1 and "one program per item" in one[0] and "(56 MiB)" in one[0]
    persistent = launch_notes(simulate(sp.Sliding(left=1024, right=1024), 16384))
    assert len(persistent) == 1 and "persistent, 132 programs" in persistent[0]
    assert not launch_notes(simulate(sp.Sliding(left=1024, right=1024), 16384, dtype="fp32"))


def test_report_carries_the_plan_it_costed():
    pattern = sp.Sliding(window=4096, causal=True)
    r = simulate(pattern, 32768)
    # The H100 runs this call on the warp-specialized kernel, whose 1-D tiles hold 128 keys:
    # 3 K/V stages of 128 tokens.
    plan = build_plan(pattern, 32768, 32768, specialized=True)
    assert (r.q_tile, r.kv_tile) == (plan.q_tile, plan.kv_tile) == ((128,), (128,))
    assert (r.num_full, r.num_partial) == (plan.num_full, plan.num_partial)
    assert r.tile_bound == plan.tile_bound
    assert r.launch == "q128-kv128-w12-s3-ws" and r.programs == plan.num_q_tiles * 24
    # Where the Triton kernel runs (A100; gathered keys on the H100), the plan is its own:
    # 64-token KV tiles.
    triton = simulate(pattern, 32768, device="a100")
    assert (triton.q_tile, triton.kv_tile) == ((128,), (64,))
    gathered = simulate(sp.Sliding(left=512, right=512) | sp.Global(every=64), 16384)
    assert (gathered.kv_tile, gathered.launch) == ((64,), "q128-kv64-w4-s2")
    assert r.predicted_speedup == pytest.approx(r.sdpa_ms / r.predicted_ms)
    assert r.permutation_bytes == 0 and "none" in r.permutation
    grid = simulate(sp.Neighborhood(shape=(64, 64), window=15))
    assert grid.permutation_bytes == 0 and "fused" in grid.permutation
    assert "own efficiency" in grid.permutation  # the H100 profile fits no per-token cost


# ---------------------------------------------------------------------------------------------
# The cost model's parts


def test_makespan_is_the_greedy_schedule():
    """The vectorized dispatch equals a heap of slots fed one program at a time."""
    torch.manual_seed(0)
    for slots, copies in ((7, 3), (132, 24), (264, 5)):
        durations = torch.sort(torch.randint(1, 40, (60,)).double(), descending=True).values
        durations[::5] = durations[::5] * 1.5  # not strictly longest-first either
        heap = [0.0] * slots
        for x in durations.tolist():
            for _ in range(copies):
                heapq.heapreplace(heap, heap[0] + x)
        assert makespan(durations, copies, slots) == pytest.approx(max(heap))


def test_occupancy_and_launch_costs():
    h100 = load_profile("h100")
    # 128x64 tiles, 2 stages: 96 KB of shared memory, twice per SM; 3 stages: once.
    assert h100.occupancy(128, 64, 128, 128, 2, 4, 2) == 2
    assert h100.occupancy(128, 64, 128, 128, 2, 4, 3) == 1
    assert h100.occupancy(128, 128, 128, 128, 2, 8, 3) == 1
    problem = Problem(1, 24, 24, 16384, 16384, 128, "bf16")
    plan = build_plan(sp.Blocked(block=1024), 16384, 16384, 128, 64)
    cost = launch_cost(workload_from_plan(plan, problem, 4, 2), h100, "bf16")
    assert cost.occupancy == 2 and cost.slots == 264 and cost.programs == 128 * 24
    assert cost.kernel_ms == pytest.approx(max(cost.compute_ms, cost.l2_ms, cost.hbm_ms)
                                           + cost.launch_ms)
    assert cost.balance >= 1.0
    # Dense SDPA: 4 B H S^2 D FLOPs at the measured rate.
    rate = h100.sdpa_rate("bf16", 16384)
    assert dense_sdpa_ms(problem, h100) == pytest.approx(4 * 24 * 16384**2 * 128 / rate * 1e3)


def test_launch_follows_the_kernel_that_runs():
    """Where a GPU has warpgroup MMA (the Hopper profiles) and ``codegen.sm90.in_scope`` takes
    the call, the simulator costs the warp-specialized launch, as ``codegen.launch.forward``
    runs it; elsewhere, in fp32, or at an explicit (warps, stages), the Triton kernel."""
    key = LaunchKey.parse("q128-kv64-w12-s4-ws-nd")
    assert key.specialized and key.permuted and str(key) == "q128-kv64-w12-s4-ws-nd"
    assert not LaunchKey.parse("q128-kv64-w4-s2").specialized
    with pytest.raises(ValueError, match="warp-specialized"):
        LaunchKey.parse("q128-kv64-w4-s2-nd-ws")
    assert load_profile("h100").wgmma and load_profile("h200").wgmma
    assert not load_profile("a100").wgmma and not load_profile("b200").wgmma
    pattern = sp.Neighborhood(shape=(128, 128), window=31)
    assert simulate(pattern, device="h100").launch.endswith("-ws-nd")
    assert "-ws" not in simulate(pattern, device="a100").launch
    assert "-ws" not in simulate(pattern, device="h100", dtype="fp32").launch
    assert simulate(pattern, device="h100", launch=(8, 3)).launch == "q128-kv128-w8-s3-nd"
    gathered = sp.Sliding(left=512, right=512) | sp.Global(every=64)
    assert "-ws" not in simulate(gathered, 16384, device="h100").launch


def test_every_builtin_profile_loads_and_simulates():
    names = builtin_profiles()
    assert {"h100", "h200", "b200", "a100", "l40s"} <= set(names)
    pattern = sp.Neighborhood(shape=(64, 64), window=16, stride=8)
    for name in names:
        profile = load_profile(name)
        assert profile.num_sms > 0 and all(profile.peak_tflops[d] > 0 for d in
                                           ("bf16", "fp16", "fp32"))
        r = simulate(pattern, device=name)
        assert r.device == name and r.predicted_speedup > 0
        assert r.calibrated == profile.calibrated
        if not profile.calibrated:
            assert any("uncalibrated" in n for n in r.notes)
    assert load_profile("h100").calibrated
    b200 = simulate(pattern, device="b200")
    assert b200.sdpa_ms < simulate(pattern, device="h100").sdpa_ms  # faster datasheet


def test_unknown_device_and_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match=r"unknown device 'tpu'.*h100"):
        simulate(sp.Blocked(block=64), 1024, device="tpu")
    with pytest.raises(ValueError, match="q_len is needed for a Sliding"):
        simulate(sp.Sliding(window=64))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        simulate(sp.Blocked(block=64), 1024, heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="dtype among bf16"):
        simulate(sp.Blocked(block=64), 1024, dtype="int8")


def test_measured_l2_reads_back_as_cuda_reports_it():
    # CUDA's L2_cache_size on an H100, an A100 and an L40S: a measured profile must decide the
    # Gluon forward's launch (``sm90.persistent_for``) on the bytes the kernel compares against.
    for size in (52428800, 41943040, 100663296):
        profile = dataclasses.replace(load_profile("h100"), l2_mb=l2_mib(size))
        assert profile.l2_bytes == size
    assert l2_mib(52428800) == load_profile("h100").l2_mb == 50.0


def test_profile_by_path(tmp_path):
    profile = load_profile("h100")
    path = profile.write(tmp_path / "mine.json")
    r = simulate(sp.Blocked(block=256), 4096, device=str(path))
    assert r.predicted_ms == pytest.approx(simulate(sp.Blocked(block=256), 4096).predicted_ms)


# ---------------------------------------------------------------------------------------------
# PerHead, TopK, dense


def test_per_head_sums_its_launches():
    pattern = sp.PerHead({range(0, 2): sp.Dense(),
                          range(2, 8): sp.Sliding(window=512, causal=True)})
    r = simulate(pattern, 8192, heads=8)
    assert [g.label for g in r.groups] == ["heads 0-1", "heads 2-7"]
    assert [g.heads for g in r.groups] == [2, 6]
    assert r.predicted_ms == pytest.approx(sum(g.predicted_ms for g in r.groups))
    pairs = sum(g.heads * 8192**2 / g.flop_bound for g in r.groups)
    assert r.flop_bound == pytest.approx(8 * 8192**2 / pairs)
    assert not r.block_sparse


def test_topk_expected_tiles_and_estimation():
    r = simulate(sp.TopK(block=64, k=16, sink=1, local=2), 65536)
    # Forced blocks: sink {0} and local {r-1, r}; they overlap for query blocks 0 and 1.
    visited = (1 + 16) + (2 + 16) + 1022 * 19
    assert r.num_full + r.num_partial == visited
    assert r.tile_bound == pytest.approx(1024**2 / visited)
    assert r.flop_bound == pytest.approx(1024**2 / visited)  # ~53.9x, as TARGETS.md says
    assert r.estimation_ms > 0 and r.predicted_ms == pytest.approx(r.kernel_ms + r.estimation_ms)
    assert "pool q and k" in r.estimation and r.block_sparse
    # The estimation is costed from the passes the estimator makes: q and k read once (bf16),
    # one fp32 matmul of pooled blocks, then passes over [H, 1024, 1024] scores.
    from spcompile.plan.topk import estimation_passes

    passes = estimation_passes(sp.TopK(block=64, k=16, sink=1, local=2), 1, 24, 24, 65536, 128, 2)
    assert passes[0] == ("pool q and k", 48 * 65536 * 128 * 2, 0.0)
    assert passes[1][2] == 2.0 * 24 * 1024 * 1024 * 128
    assert 0.3 < r.estimation_ms < 3.0
    causal = simulate(sp.TopK(block=64, k=16, sink=1, local=2, causal=True), 65536)
    assert causal.num_partial == 1024 and not causal.block_sparse
    assert causal.num_full + causal.num_partial == sum(min(r + 1, 19) for r in range(1024))


def test_dense_site_is_sdpa():
    r = simulate(sp.Dense(), 4096)
    assert r.predicted_speedup == 1.0 and r.flop_bound == 1.0


# ---------------------------------------------------------------------------------------------
# Reports


def test_json_round_trip():
    for report in (simulate(sp.Neighborhood(shape=(64, 64), window=15)),
                   simulate(sp.PerHead({"0-1": sp.Dense(), "2-3": sp.Blocked(block=256)}), 2048,
                            heads=4),
                   simulate(sp.TopK(block=64, k=4), 4096)):
        text = report.to_json()
        back = SimReport.from_json(text)
        assert back == report
        assert json.loads(back.to_json()) == json.loads(text)
    with pytest.raises(ValueError, match="unknown keys"):
        SimReport.from_dict({**report.to_dict(), "bogus": 1})


def test_table_and_plain_text():
    r = simulate(sp.Neighborhood(shape=(256, 256), window=80))
    text = r.render()
    for label in ("FLOP bound", "tile bound", "block-sparse", "axis 0", "predicted",
                  "dense SDPA", "speedup", "permutation"):
        assert label in text
    assert f"{r.predicted_speedup:.2f}x" in text.splitlines()[0]
    from rich.console import Console

    console = Console(record=True, width=160, force_terminal=True)
    console.print(r.table())
    assert "tile bound" in console.export_text()


def test_tile_map_image_downsamples():
    states = torch.zeros(1000, 700, dtype=torch.int8)
    states[:, :350] = 2
    image, factor = tile_map_image(states, cells=256)
    assert factor == 4 and image.shape == (250, 175, 3)
    assert float(image[:, :80, 2].mean()) < 0.7 < float(image[:, 100:, 2].mean())


def test_plot(tmp_path):
    r = simulate(sp.Neighborhood(shape=(64, 64), window=15))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="needs matplotlib"):
            r.plot(tmp_path / "tiles.png")
        return
    path = r.plot(tmp_path / "tiles.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no tile map"):
        simulate(sp.TopK(block=64, k=4), 4096).plot(tmp_path / "topk.png")


# ---------------------------------------------------------------------------------------------
# Calibration


def test_fit_recovers_known_coefficients():
    """Rows timed by a known profile: the fit finds its efficiencies and coefficients again."""
    import dataclasses

    truth = load_profile("h100")
    truth = dataclasses.replace(truth, kernel=dataclasses.replace(
        truth.kernel, efficiency={"q128-kv64-w4-s2": 0.45}, partial_extra=0.3,
        q_tile_overhead_us=3.0, permute_ns_per_token=0.0, gather_extra=0.0))
    problem = Problem(1, 8, 8, 8192, 8192, 128, "bf16")
    rows = []
    for i, pattern in enumerate([sp.Blocked(block=1024), sp.Blocked(block=256),
                                 sp.Sliding(left=700, right=300), sp.Sliding(window=2000,
                                                                             causal=True)]):
        m = Measurement(f"r{i}", pattern, problem, (128,), (64,), 4, 2, ms=1.0)
        rows.append(dataclasses.replace(m, ms=predict_ms(m, truth)))
    base = dataclasses.replace(truth, kernel=dataclasses.replace(truth.kernel, host_us=0.0))
    result = fit(rows, base)
    k = result.coefficients
    assert k.efficiency["q128-kv64-w4-s2"] == pytest.approx(0.45, rel=0.02)
    assert k.partial_extra == pytest.approx(0.3, abs=0.05)
    assert k.q_tile_overhead_us == pytest.approx(3.0, abs=0.5)
    assert result.rms_log_error < 0.01
    assert set(k.fit["fitted"]) == {"partial_extra", "q_tile_overhead_us"}  # nothing permuted


def test_topk_fit_recovers_known_coefficients():
    """TopK rows timed by a profile with known list and ranking costs: fit_topk finds them."""
    import dataclasses

    from spcompile.sim.calibrate import TopKMeasurement, fit_topk

    base = load_profile("h100")
    truth = dataclasses.replace(base, kernel=dataclasses.replace(
        base.kernel, list_tile_us=0.8, rank_gsteps=500.0))
    rows = []
    for i, (pattern, s) in enumerate([(sp.TopK(block=64, k=16, sink=1, local=2), 32768),
                                      (sp.TopK(block=128, k=8, causal=True), 65536)]):
        m = TopKMeasurement(f"t{i}", pattern, Problem(1, 8, 8, s, s, 128, "bf16"), 4, 2, 1.0,
                            1.0, "synthetic")
        kernel, dynamic = m.predict(truth)
        rows.append(dataclasses.replace(m, kernel_ms=kernel, dynamic_ms=dynamic))
    start = dataclasses.replace(base, kernel=dataclasses.replace(
        base.kernel, list_tile_us=0.0, rank_gsteps=0.0))
    k, lines = fit_topk(rows, start, hold_out=["t1"])
    assert k.list_tile_us == pytest.approx(0.8, rel=0.02)
    assert k.rank_gsteps == pytest.approx(500.0, rel=0.02)
    assert len(lines) == 2 and lines[1].endswith("[held out]")


def test_topk_and_streaming_rows_predicted_within_15_percent():
    """topk64k (whose TopK coefficients were fitted to it), stream128k (held out of the fit)
    and the rows outside TARGETS.md (held out: causal TopK at 32k, TopK with 128-token blocks,
    mixed dense/streaming heads), measured on the H100 by ``benchmarks/run.py``: the predicted
    speedup (estimation included) within 15% of measured. The streaming rows were measured in
    session 5, on the Triton kernel at 4 warps, 2 stages; since session 9 the Gluon kernel
    runs them (128-token KV tiles, not measured yet), so they are costed at the launch that
    ran."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from suite import held_out, suite
    finally:
        sys.path.pop(0)
    rows = {r.id: r for r in suite() + held_out()}
    checked = []
    for name in ("2026-11-23-s5-h100-run-b.json", "2026-11-23-s5-h100-heldout.json"):
        for res in json.loads((DATA / name).read_text())["results"]:
            if res["id"] in ("topk64k", "stream128k", "topk32k_causal", "topk64k_b128",
                             "mixed32k"):
                row = rows[res["id"]]
                ran = (4, 2) if res["id"] in ("stream128k", "mixed32k") else None
                r = simulate(row.pattern, row.seq_len, heads=24, head_dim=128, device="h100",
                             launch=ran)
                checked.append((res["id"], round(r.predicted_speedup / res["speedup"] - 1, 3)))
    assert {i for i, _ in checked} == {"topk64k", "stream128k", "topk32k_causal",
                                       "topk64k_b128", "mixed32k"}
    assert all(abs(e) <= 0.15 for _, e in checked), checked


def test_load_results_explains_what_it_skips(tmp_path):
    rows = [
        {"id": "ok", "pattern": {"blocked": {"block": 1024}}, "tokens": 4096, "q_tile": [128],
         "kv_tile": [64], "warps": 4, "stages": 2, "ms": 0.5, "sdpa_ms": 2.0},
        {"id": "stale", "pattern": {"blocked": {"block": 1024}}, "tokens": 4096,
         "q_tile": [128], "kv_tile": [64], "warps": 4, "stages": 2, "ms": 0.5,
         "tile_bound": 3.0},
        {"id": "nolaunch", "pattern": {"blocked": {"block": 1024}}, "tokens": 4096,
         "q_tile": [128], "kv_tile": [64], "ms": 0.5},
        {"id": "broken", "error": "OOM"},
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": rows}))
    got, skipped = load_results([path])
    assert [m.id for m in got] == ["ok"] and got[0].measured_speedup == 4.0
    text = "\n".join(skipped)
    assert "different plan (tile bound 3.00 then, 4.00 now)" in text
    assert "no warps/stages recorded" in text and "the run failed" in text
    got, _ = load_results([f"{path}@default"])
    assert sorted(m.id for m in got) == ["nolaunch", "ok"]
    assert got[1].key == LaunchKey(128, 64, 4, 2)


def test_load_results_skips_other_kernels_and_reads_tile_text(tmp_path):
    """Rows of a non-default kernel variant (flags, or tune.py's variant names) are skipped;
    run.py's tiles recorded as text ("(8, 16)", "64") are read."""
    base = {"pattern": {"blocked": {"block": 1024}}, "tokens": 4096, "warps": 4, "stages": 2,
            "ms": 0.5, "sdpa_ms": 2.0}
    rows = [dict(base, id="old", q="(128,)", kv="64", variant="list-rank"),
            dict(base, id="flag", q=[128], kv=[64], head_major=False),
            dict(base, id="persist", q=[128], kv=[64], variant="persistent-2"),
            dict(base, id="new", q="(128,)", kv="64", variant="box-head-4w2s")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    got, skipped = load_results([path])
    assert [m.id for m in got] == ["new"] and got[0].key == LaunchKey(128, 64, 4, 2)
    text = "\n".join(skipped)
    assert "box_loops=False, head_major=False" in text and "persistent=True" in text
    assert "head_major=False, not the kernel that runs by default" in text


def test_load_results_reads_both_kernels(tmp_path):
    """A run.py row of the warp-specialized kernel gives two measurements (it, and the Triton
    kernel timed beside it); a tune.py --sm90 row keeps its recorded ring depth."""
    base = {"pattern": {"blocked": {"block": 1024}}, "tokens": 4096, "q": [128], "kv": [64],
            "sdpa_ms": 2.0, "sm90_persistent": True, "assignment": "balanced"}  # the default
    rows = [dict(base, id="run", kernel="sm90", ours_ms=0.2, triton_ms=0.25),
            dict(base, id="tune", kernel="sm90", stages=3, ms=0.21)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    got, skipped = load_results([path])
    assert not skipped
    assert [(m.id, m.specialized, m.ms) for m in got] == [
        ("run", True, 0.2), ("run", False, 0.25), ("tune", True, 0.21)]
    assert got[0].key == LaunchKey(128, 64, 12, 4, specialized=True)
    assert got[1].key == LaunchKey(128, 64, 4, 2)  # the Triton kernel's default launch
    assert got[2].key == LaunchKey(128, 64, 12, 3, specialized=True)
    # Since session 9 the Gluon kernel's 1-D plans hold 128-token KV tiles; the Triton kernel
    # beside it runs its own 64-token tiles, recorded or (older rows) its default plan's.
    for extra in ({}, {"triton_q_tile": "(128,)", "triton_kv_tile": "(64,)"}):
        path.write_text(json.dumps([dict(base, id="s9", kv=[128], kernel="sm90", ours_ms=0.2,
                                         triton_ms=0.25, **extra)]))
        got, skipped = load_results([path])
        assert not skipped
        assert [m.key for m in got] == [LaunchKey(128, 128, 12, 3, specialized=True),
                                        LaunchKey(128, 64, 4, 2)]



def test_load_results_keeps_the_default_gluon_launch(tmp_path):
    """Gluon rows are kept where they ran the default launch (``sm90.persistent_for``): one
    program per SM over ``plan.assign.assign_items``' lists where one head's K and V fit in the
    H100's L2, else one per item. run.py's rows record the launch, tune.py's name it ("-p");
    both record the assignment. Older rows ran a program per item or a fixed stride. The
    Triton kernel timed beside a skipped row still counts."""
    one_d = {"pattern": {"blocked": {"block": 1024}}, "tokens": 4096, "q": [128], "kv": [128]}
    n_d = {"pattern": {"neighborhood": {"shape": [64, 64], "window": 15}}, "tokens": 4096,
           "q": [8, 16], "kv": [8, 16]}
    long = {"pattern": {"blocked": {"block": 1024}}, "tokens": 131072, "q": [128],
            "kv": [128]}
    common = {"sdpa_ms": 2.0, "kernel": "sm90", "ms": 0.2}
    rows = [dict(one_d, **common, id="1d-old"),
            dict(n_d, **common, id="nd-stride", sm90_persistent=True, triton_ms=0.3),
            dict(one_d, **common, id="1d-run", sm90_persistent=True, assignment="balanced"),
            dict(n_d, **common, id="nd-tune-p", variant="sm90-kv128-s3-p", stages=3,
                 assignment="balanced"),
            dict(n_d, **common, id="nd-tune-ps", variant="sm90-kv128-s3-ps", stages=3,
                 assignment="stride"),
            dict(n_d, **common, id="nd-tune-1", variant="sm90-kv128-s3", stages=3,
                 assignment="balanced"),
            # 131072 tokens: one head's K and V take 64 MiB, more than the L2's 50
            dict(long, **common, id="long-run-1", sm90_persistent=False, assignment="balanced"),
            dict(long, **common, id="long-run-p", sm90_persistent=True, assignment="balanced")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    got, skipped = load_results([path])
    assert [(m.id, m.specialized) for m in got] == [
        ("nd-stride", False), ("1d-run", True), ("nd-tune-p", True), ("long-run-1", True)]
    assert len(skipped) == 5
    assert "1d-old: measured the Gluon kernel one program per item" in skipped[0]
    assert "nd-stride: measured the Gluon kernel persistent over a fixed stride" in skipped[1]
    assert "nd-tune-ps: measured the Gluon kernel persistent over a fixed stride" in skipped[2]
    assert "nd-tune-1: measured the Gluon kernel one program per item" in skipped[3]
    assert "long-run-p: measured the Gluon kernel persistent," in skipped[4]


# ---------------------------------------------------------------------------------------------
# Predicted vs measured on the H100


def _accuracy_rows() -> tuple[list[tuple[str, Measurement, float]], list[str]]:
    profile = load_profile("h100")
    files = [str(ROOT / f) for f in profile.kernel.fit["files"]] + [str(DATA / VALIDATION)]
    measurements, skipped = load_results(files, suite=SUITE)
    held = set(profile.kernel.fit["held_out"])
    out = []
    for m in measurements:
        kind = ("validation" if VALIDATION.split("@")[0] == m.source
                else "held out" if m.id in held else "fit")
        predicted = dense_sdpa_ms(m.problem, profile) / predict_ms(m, profile)
        out.append((kind, m, predicted))
    return out, skipped


def _is_default(m: Measurement) -> bool:
    """A launch that runs by default: the warp-specialized kernel (what in-scope calls run on
    the H100), or the Triton kernel at ``default_config`` (every other call, every other GPU)."""
    if m.specialized:
        return True
    config = default_config(m.plan())
    return ((m.key.q_tokens, m.key.kv_tokens) in DEFAULT_TOKENS[len(m.q_tile)]
            and (m.warps, m.stages) == (config.num_warps, config.num_stages))


def test_h100_predictions_match_measurements():
    rows, skipped = _accuracy_rows()
    host_ms = load_profile("h100").kernel.host_us * 1e-3
    lines = [f"{'set':10s} {'source':38s} {'row':36s} {'meas x':>7s} {'pred x':>7s} {'err':>7s}"]
    default_errors, other_errors = [], []
    for kind, m, predicted in rows:
        err = predicted / m.measured_speedup - 1
        host_bound = m.ms < HOST_BOUND * host_ms
        lines.append(f"{kind:10s} {m.source:38s} {m.label:36s} {m.measured_speedup:7.2f} "
                     f"{predicted:7.2f} {err:+7.1%}" + ("  host-bound" if host_bound else "")
                     + ("  default" if _is_default(m) else ""))
        if host_bound:
            continue  # do_bench timed the CPU building launches, not the kernel
        (default_errors if _is_default(m) else other_errors).append((abs(err), m.label))
    # Where a row and launch were measured more than once (separate runs), the prediction meets
    # the median of those measurements: single runs of one row differ by up to ~15% here.
    measured: dict[str, list[float]] = {}
    predicted_by: dict[str, float] = {}
    for _, m, predicted in rows:
        if _is_default(m) and m.ms >= HOST_BOUND * host_ms:
            measured.setdefault(m.label, []).append(m.measured_speedup)
            predicted_by[m.label] = predicted
    median_errors = [(abs(predicted_by[k] / statistics.median(v) - 1), k)
                     for k, v in measured.items()]
    table = "\n".join(lines + [f"skipped: {s}" for s in skipped])
    print(table)
    assert len(default_errors) >= 24, table
    assert max(default_errors)[0] <= 0.18, table
    worst = max(median_errors)
    assert worst[0] <= 0.15, f"default launch off by {worst[0]:.1%} ({worst[1]})\n{table}"
    assert statistics.median(e for e, _ in other_errors) <= 0.10, table
    assert max(other_errors)[0] <= 0.50, table
    validation = [k for k, m, _ in rows if k == "validation"]
    assert len(validation) == 8


# ---------------------------------------------------------------------------------------------
# Command line


SPEC = """\
version: 1
rules:
  - name: video
    match: "blocks.*.attn"
    grid: {T: "seq_len // 3840", H: 48, W: 80}
    pattern:
      neighborhood: {shape: [T, H, W], window: [7, 17, 33], stride: [1, 4, 8]}
  - name: local
    match: "*"
    pattern:
      sliding: {window: 1024, causal: true}
"""


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_simulate(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    code, out, _ = _run(capsys, "simulate", spec, "--shape", "16x48x80", "--heads", "24")
    assert code == 0
    assert out.count("FLOP bound") == 2 and "video: neighborhood on h100" in out
    assert "local: sliding on h100" in out and "block-sparse" in out
    code, out, _ = _run(capsys, "simulate", spec, "--seq-len", "61440", "--json",
                        "--device", "a100", "--rule", "video", "--recommend")
    data = json.loads(out)
    assert code == 0 and [d["rule"] for d in data] == ["video"]
    report = SimReport.from_dict(data[0]["report"])
    assert report.device == "a100" and not report.calibrated
    assert report.flop_bound == pytest.approx(simulate(
        sp.Neighborhood(shape=(16, 48, 80), window=(7, 17, 33), stride=(1, 4, 8)),
        device="a100").flop_bound)
    assert data[0]["recommendation"]["tiles"]
    code, out, _ = _run(capsys, "simulate", spec, "--seq-len", "4096", "--q-tile", "64",
                        "--kv-tile", "64", "--rule", "local")
    assert code == 0 and "q 64, kv 64" in out
    code, out, _ = _run(capsys, "simulate", spec, "--seq-len", "1000", "--rule", "video")
    assert "not applicable" in out
    code, out, err = _run(capsys, "simulate", spec, "--shape", "16x48x80", "--plot",
                          tmp_path / "tiles.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "--plot needs matplotlib" in err
    else:
        assert code == 0 and (tmp_path / "tiles-video.png").is_file()


def test_cli_calibrate_from_results(tmp_path, capsys):
    rows = [{"id": f"b{b}", "pattern": {"blocked": {"block": b}}, "tokens": 16384,
             "q_tile": [128], "kv_tile": [64], "warps": 4, "stages": 2, "ms": ms,
             "sdpa_ms": 5.20}
            for b, ms in ((1024, 0.48), (2048, 0.92), (4096, 1.80))]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": rows}))
    out_path = tmp_path / "mine.json"
    code, out, _ = _run(capsys, "calibrate", "--from-results", results, "--device", "h100",
                        "--name", "mine", "--out", out_path)
    assert code == 0 and "fitted on 3 rows" in out and f"wrote {out_path}" in out
    mine = load_profile(str(out_path))
    assert mine.name == "mine" and mine.calibrated
    assert set(mine.kernel.efficiency) == {"q128-kv64-w4-s2"}
    assert mine.kernel.sdpa_tflops["bf16"] == pytest.approx(
        4 * 24 * 16384**2 * 128 / 5.20e-3 / 1e12, rel=1e-3)
    # The launch the rows ran (the default would be the Hopper kernel, costed from the base).
    r = simulate(sp.Blocked(block=1024), 16384, device=str(out_path), q_tile=128, kv_tile=64,
                 launch=(4, 2))
    assert r.kernel_ms == pytest.approx(0.48, rel=0.05)
    assert math.isfinite(r.predicted_speedup)
