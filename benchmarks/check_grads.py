"""Gradients at benchmark sizes, with the default tiles users get, against a dense-masked fp32
reference on fresh random bf16 inputs (the unit tests check small shapes in float64).

    python benchmarks/check_grads.py          # on a GPU; prints one line per case
"""

from __future__ import annotations

import torch

import spcompile as sp


def reference(q, k, v, pattern):
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = sp.dense_mask(pattern, s_q, s_kv).to(q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v.float()


def main() -> None:
    cases = {
        "na2d31": sp.Neighborhood(shape=(128, 128), window=31),
        "gna3d": sp.Neighborhood(shape=(16, 24, 40), window=(7, 9, 9), stride=(2, 4, 4)),
    }
    for name, pattern in cases.items():
        s = 1
        for n in pattern.shape:
            s *= n
        q, k, v, do = (torch.randn(1, 2, s, 128, device="cuda", dtype=torch.bfloat16)
                       for _ in range(4))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = sp.sparse_attention(*leaves, pattern)
        got = torch.autograd.grad(out, leaves, do)
        ref_leaves = [x.clone().float().requires_grad_() for x in (q, k, v)]
        ref = reference(*ref_leaves, pattern)
        want = torch.autograd.grad(ref, ref_leaves, do.float())
        errs = [float((a.detach().float() - b.detach()).norm() / b.detach().norm())
                for a, b in zip((out, *got), (ref, *want), strict=True)]
        ok = max(errs) < 2e-2
        print(f"{name:8s} out/dq/dk/dv rel err " + " ".join(f"{e:.1e}" for e in errs)
              + ("  ok" if ok else "  FAIL"), flush=True)


if __name__ == "__main__":
    main()
