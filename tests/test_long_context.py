"""128k tokens with nothing O(S^2): forward and backward of the CPU path, in a fresh process
whose peak memory is checked (an S x S bool mask alone would be 16 GiB, fp32 scores 64 GiB)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import resource, sys, time
    import torch
    import spcompile as sp

    s = 131072
    patterns = {
        "streaming": sp.AnyOf(sp.Sliding(window=1024, causal=True), sp.Global(first=4),
                              causal=True),
        "topk": sp.TopK(block=64, k=4, sink=1, local=2, causal=True),
    }
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, s, 16, requires_grad=True) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, p in patterns.items():
        t0 = time.time()
        out = sp.sparse_attention(q, k, v, p, impl="torch")
        out.sum().backward()
        rows = torch.tensor([0, 5000, s - 1])
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
        if name == "streaming":  # spot-check three rows against the definition
            for r in rows.tolist():
                keys = torch.tensor(sorted(set(range(max(0, r - 1023), r + 1)) | {0, 1, 2, 3}))
                keys = keys[keys <= r]
                w = (q[0, 0, r] @ k[0, 0, keys].T / 4).softmax(-1)
                want = w @ v[0, 0, keys]
                assert torch.allclose(out[0, 0, r], want, atol=1e-5), (name, r)
        q.grad = k.grad = v.grad = None
        print(name, f"{time.time() - t0:.1f}s", file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    print(peak // 1024)
''')


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_128k_tokens_forward_and_backward_stay_small():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mib = int(done.stdout.split()[-1])
    assert peak_mib < 4096, f"peak grew by {peak_mib} MiB"
