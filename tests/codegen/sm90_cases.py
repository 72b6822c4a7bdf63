"""What the Hopper kernels' tests share (``test_sm90.py``, ``test_sm90_bwd.py``): the GPU cases,
their random inputs, and the sm_90 lowering check that runs on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import spcompile as sp

ROOT = Path(__file__).resolve().parents[2]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

# name: (pattern, q_len, kv_len, heads, kv_heads, head dim). Sizes are no multiple of the tiles:
# 1-D sliding (causal, decode-shaped with Sq < Skv), blocked, 2-D and 3-D neighborhoods on odd
# grids (strided, causal), GQA down to one KV head, head dims 32 to 128.
CASES: dict[str, tuple[sp.Pattern, int, int, int, int, int]] = {
    "sliding-odd-gqa": (sp.Sliding(left=300, right=200), 1000, 1000, 4, 2, 128),
    "sliding-causal": (sp.Sliding(window=700, causal=True), 2100, 2100, 2, 1, 64),
    "sliding-decode": (sp.Sliding(left=500, right=0), 200, 1300, 2, 2, 72),
    "blocked": (sp.Blocked(block=512), 3000, 3000, 2, 2, 128),
    "na2d-17x23": (sp.Neighborhood(shape=(17, 23), window=7), 391, 391, 2, 1, 128),
    "na2d-stride": (sp.Neighborhood(shape=(40, 50), window=(9, 13), stride=(2, 4)), 2000, 2000,
                    3, 3, 32),
    "na3d-odd": (sp.Neighborhood(shape=(5, 17, 23), window=(3, 5, 7)), 1955, 1955, 2, 2, 128),
    "na3d-causal": (sp.Neighborhood(shape=(6, 16, 16), window=(3, 5, 5), causal=(True, False,
                                                                                False)),
                    1536, 1536, 2, 1, 96),
}


def random_inputs(case: tuple[sp.Pattern, int, int, int, int, int], dtype: torch.dtype,
                  with_do: bool = False) -> tuple[Any, ...]:
    """(pattern, q, k, v[, dO]) for a case, batch 2, from a fresh seed on every run."""
    pattern, sq, skv, h, hk, d = case
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    make = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=dtype)
    tensors = [make(2, h, sq, d), make(2, hk, skv, d), make(2, hk, skv, d)]
    if with_do:
        tensors.append(make(2, h, sq, d))
    return (pattern, *tensors)


def strided_inputs(case: tuple[sp.Pattern, int, int, int, int, int], count: int
                   ) -> list[torch.Tensor]:
    """q, k, v (and dO for ``count`` 4) in bf16 as [B, S, H, D] tensors seen as [B, H, S, D],
    what a model's projections give: not contiguous."""
    _, _, _, h, hk, d = case
    seq = (case[1], case[2], case[2], case[1])
    heads = (h, hk, hk, h)
    return [torch.randn(2, seq[i], heads[i], d, device="cuda", dtype=torch.bfloat16)
            .transpose(1, 2) for i in range(count)]


def gluon_builds(flag: str) -> list[dict[str, Any]]:
    """What ``sm90_compile.py FLAG`` reports of the kernels it compiles for sm_90 (any machine:
    Triton's bundled ptxas); skips where Triton has no NVIDIA backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py")), flag],
                         env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip("no Triton NVIDIA backend")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])
