"""The persistent forward (grid-stride over the work items) against the one-item kernel and the
reference, with fewer programs than items so every program runs several.

The grid is pinned to 4 SMs (on a GPU too), so each case below has more work items than
programs: the loop really iterates, and programs end on different item counts. Under the
interpreter both variants run the same operations in the same order, so they must agree bit for
bit; compiled on a GPU, they may round differently and only need to agree closely.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention import CASES

import spcompile as sp
from spcompile.codegen import fwd
from spcompile.codegen.fwd import LaunchConfig, attn_fwd, default_config, fwd_grid, fwd_source
from spcompile.plan.tiles import build_plan
from spcompile.plan.topk import block_lists, estimate_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMS = 4
ROOT = Path(__file__).resolve().parents[2]

# (CASES name, programs per SM, query heads): 1-D causal sliding, decode-shaped odd lengths,
# 2-D and 3-D neighborhoods, gathered stripes (union), empty rows. Lengths are no multiple of
# the tiles; every case has more work items (Q tiles x heads) than programs.
STATIC = [("sliding-causal", 1, 2), ("sliding-decode", 1, 4), ("na2d-stride", 2, 2),
          ("na3d-causal-dil", 1, 2), ("stripes-gathered", 1, 2), ("empty-rows", 1, 2)]


@pytest.fixture(autouse=True)
def _four_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fwd, "num_sms", lambda device: SMS)


def _qkv(sq: int, skv: int, seed: int, h: int = 2, h_kv: int = 1, d: int = 16, dv: int = 24):
    """GQA (two query heads per key head) and a value head dim that is not a power of two."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    return make(1, h, sq, d), make(1, h_kv, skv, d), make(1, h_kv, skv, dv)


def _compare(plan, pattern, q, k, v, per_sm: int, lists=None) -> None:
    bh = q.shape[0] * q.shape[1]
    persistent = LaunchConfig(4, 2, persistent=True, programs_per_sm=per_sm)
    programs = fwd_grid(plan, bh, persistent, q.device)
    assert programs == SMS * per_sm < plan.num_q_tiles * bh, "every program must loop"
    out, lse = attn_fwd(q, k, v, plan, config=persistent, lists=lists)
    base, base_lse = attn_fwd(q, k, v, plan, config=LaunchConfig(4, 2), lists=lists)
    if DEVICE == "cpu":
        assert torch.equal(out, base) and torch.equal(lse, base_lse)
    else:
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    # A TopK reference selects on the inputs it gets: give it the kernel's (fp32) q and k.
    exact = (q, k, v) if lists is not None else (q.double(), k.double(), v.double())
    ref, ref_lse = sp.reference_attention(*exact, pattern, return_lse=True)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < 1e-4, f"rel err {err:.2e}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty].double(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("case", "per_sm", "heads"), STATIC)
def test_persistent_equals_default_and_reference(case: str, per_sm: int, heads: int) -> None:
    pattern, sq, skv, qt, kt = CASES[case]
    plan = build_plan(pattern, sq, skv, qt, kt)
    _compare(plan, pattern, *_qkv(sq, skv, seed=len(case), h=heads, h_kv=heads // 2), per_sm)


def test_persistent_topk_runtime_lists() -> None:
    """Run-time lists (per batch x head) are chosen inside the loop, per item."""
    pattern = sp.TopK(block=16, k=1, sink=1, local=1, causal=True)
    s = 57
    q, k, v = _qkv(s, s, seed=7, h=4, h_kv=2)
    plan = build_plan(pattern, s, s)
    lists = block_lists(pattern, estimate_blocks(pattern, q, k), s, q.shape[1])
    _compare(plan, pattern, q, k, v, 1, lists=lists)


@pytest.mark.parametrize("case", ["sliding-causal", "3d"])
def test_persistent_tma_under_interpreter(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Descriptor loads and stores inside the loop (the interpreter runs TensorDescriptors;
    the default CPU path never uses them, so this switches them on)."""
    if case == "3d":
        pattern, sq, qt, kt = sp.Neighborhood(shape=(3, 6, 4), window=(2, 3, 2)), 72, \
            (2, 2, 4), (2, 4, 2)
    else:
        pattern, sq, _, qt, kt = CASES[case]
    plan = build_plan(pattern, sq, sq, qt, kt)
    assert fwd.tma_eligible(plan)
    monkeypatch.setattr(fwd, "_tma_device", lambda q: True)
    _compare(plan, pattern, *_qkv(sq, sq, seed=3), 1)
    source = fwd_source(plan, tma=True, persistent=True)
    assert "QD.load(" in source and "KD.load(" in source
    assert "OD.store(" not in source, "O goes through pointers in the loop (see fwd_source)"


# H100: the most shared memory one program may take, and what an SM has for all of its programs.
SHARED_PER_PROGRAM, SHARED_PER_SM = 227 * 1024, 228 * 1024


def test_persistent_tma_compiles_for_sm90() -> None:
    """The loop with descriptor loads lowers for Hopper, and fits where the one-item kernel
    fits: at most 227 KiB per program at 128x128 tiles, two programs per SM at 128x64."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPCOMPILE_PERSISTENT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py"))],
                         env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip("no Triton NVIDIA backend")
    assert run.returncode == 0, run.stderr[-3000:]
    wide, square = json.loads(run.stdout.splitlines()[-1])
    assert wide["tma_ops"] > 0 and square["tma_ops"] > 0, "descriptor loads were lost"
    assert square["shared"] <= SHARED_PER_PROGRAM, square
    assert 2 * (wide["shared"] + 1024) <= SHARED_PER_SM, wide  # 1 KiB reserved per program


def test_one_body_two_variants() -> None:
    """The persistent kernel is the one-item kernel's body, one level deeper inside the loop."""
    pattern, sq, skv, qt, kt = CASES["stripes-gathered"]
    plan = build_plan(pattern, sq, skv, qt, kt)
    one, loop = fwd_source(plan), fwd_source(plan, persistent=True)
    body = one.split("    bh = pid % BH\n", 1)[1]
    assert "tl.num_programs(0)" in loop and "tl.num_programs(0)" not in one
    assert loop.endswith("\n".join("    " + x if x else x for x in body.split("\n")))


def test_grid_and_cache_names(monkeypatch: pytest.MonkeyPatch) -> None:
    pattern, sq, skv, qt, kt = CASES["sliding-causal"]
    plan = build_plan(pattern, sq, skv, qt, kt)  # 3 Q tiles
    cpu = torch.device("cpu")
    assert fwd_grid(plan, 8, LaunchConfig(4, 2), cpu) == 24
    assert fwd_grid(plan, 8, LaunchConfig(4, 2, persistent=True), cpu) == 8
    assert fwd_grid(plan, 1, LaunchConfig(4, 2, persistent=True), cpu) == 3  # never idle ones
    monkeypatch.undo()  # the real count: INTERPRET_SMS off CUDA
    if DEVICE == "cpu":
        assert fwd.num_sms(cpu) == fwd.INTERPRET_SMS
    names = {fwd._fwd_module(plan, False, p).__name__ for p in (False, True)}
    assert len(names) == 2 and any("persistent" in n for n in names)
    with pytest.raises(ValueError, match="programs_per_sm"):
        LaunchConfig(4, 2, persistent=True, programs_per_sm=0)


def test_env_turns_it_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = build_plan(sp.Sliding(window=7, causal=True), 40, 40, (16,), (16,))
    monkeypatch.delenv("SPCOMPILE_PERSISTENT", raising=False)
    assert not default_config(plan).persistent
    monkeypatch.setenv("SPCOMPILE_PERSISTENT", "1")
    assert default_config(plan).persistent
