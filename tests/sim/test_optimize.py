"""Recommendations: tile shapes ranked by predicted time, strides that make a neighborhood
perfectly block-sparse, and what they change."""

from __future__ import annotations

import json

import pytest

import spcompile as sp
from spcompile.sim import load_profile, recommend, simulate
from spcompile.sim.hardware import LaunchKey
from spcompile.sim.verdict import neighborhood_axis_block_sparse


def test_flux_gets_stride_16x16():
    """FLUX-like 256x256 grid, window 80: GNA's stride 16x16 makes it block-sparse with the
    FLOP bound unchanged (NATTEN: 6.0x -> 12.3x on H100 with CUTLASS)."""
    pattern = sp.Neighborhood(shape=(256, 256), window=80)
    rec = recommend(pattern)
    best = rec.strides[0]
    assert best.stride == (16, 16) and best.window == (80, 80)
    assert best.flop_bound[0] == pytest.approx(10.24) == pytest.approx(best.flop_bound[1])
    assert best.tile_bound[1] == pytest.approx(10.24) and best.tile_bound[0] < 9
    assert best.predicted_speedup[1] > best.predicted_speedup[0]
    assert "stride 16x16 groups queries into 16x16 blocks that share one window" in \
        best.semantics
    assert "FLOP bound unchanged (10.24)" in best.semantics
    assert f"tile bound {best.tile_bound[0]:.2f} -> 10.24" in best.semantics
    after = simulate(best.pattern, q_tile=best.q_tile, kv_tile=best.kv_tile)
    assert after.block_sparse
    text = rec.render()
    assert "stride 16x16" in text and "(default)" in text
    json.dumps(rec.to_dict())


def test_tiles_are_ranked_by_predicted_time():
    pattern = sp.Neighborhood(shape=(128, 128), window=31)
    rec = recommend(pattern)
    times = [t.predicted_ms for t in rec.tiles]
    assert times == sorted(times)
    assert sum(t.default for t in rec.tiles) == 1
    default = next(t for t in rec.tiles if t.default)
    assert (default.q_tile, default.kv_tile) == (rec.current.q_tile, rec.current.kv_tile)
    assert rec.best is rec.tiles[0]
    for t in rec.tiles:
        r = simulate(pattern, q_tile=t.q_tile, kv_tile=t.kv_tile)
        assert r.predicted_ms == pytest.approx(t.predicted_ms)


def test_window_change_is_stated_when_no_stride_suffices():
    """Window 31 is not a multiple of any tile side: the window moves to 32 and says so."""
    rec = recommend(sp.Neighborhood(shape=(128, 128), window=31))
    option = rec.strides[0]
    assert option.window == (32, 32)
    assert "window 31x31 -> 32x32: each query sees 1024 instead of 961 keys" in option.semantics
    assert "FLOP bound 17.05 -> 16.00" in option.semantics
    for a in range(2):
        assert option.stride[a] % option.q_tile[a] == 0
        assert option.window[a] % option.kv_tile[a] == 0
        assert neighborhood_axis_block_sparse(128, 32, option.stride[a], 1, False,
                                              option.q_tile[a], option.kv_tile[a])


def test_one_dimensional_and_other_patterns():
    rec = recommend(sp.Sliding(left=1024, right=1024), 32768)
    # Candidates are the tile volumes the profile has measured, nothing it has not.
    measured = {(LaunchKey.parse(k).q_tokens,) for k in load_profile("h100").kernel.efficiency}
    assert {t.q_tile for t in rec.tiles} == measured and not rec.strides
    assert rec.tiles[0].predicted_ms <= rec.tiles[-1].predicted_ms
    topk = recommend(sp.TopK(block=64, k=8), 8192)
    assert not topk.tiles and "block size" in topk.notes[0]
    causal = recommend(sp.Neighborhood(shape=(16, 64), window=(5, 16), causal=(True, False)))
    assert any("causal axis" in n for n in causal.notes)
    for option in causal.strides:
        assert option.q_tile[0] == 1  # only a q tile side of 1 makes a causal axis block-sparse
