"""How much attention TopK's selection keeps, against exact attention (issue 6).

    python benchmarks/topk_mass.py [--seq-len 65536] [--heads 4] [--device cpu]

For the topk64k pattern (block 64, k 16, 1 sink, 2 local: 19 of 1024 key blocks per query
block) on random inputs and on structured ones (local attention plus a few strong key columns,
``run.structured_qk``), over 64 sampled query rows of every head: the exact softmax mass inside
the selection, the mass the best blocks by exact mass would keep with the same budget (an
oracle no estimator can beat), and the relative error of the output against exact attention.
Speed is not measured here (benchmarks/run.py does that on a GPU); this runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import D, kept_mass, structured_qk
from suite import suite


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    row = next(r for r in suite() if r.id == "topk64k")
    row = type(row)(row.id, row.pattern, args.seq_len, row.goal)
    shape = (1, args.heads, args.seq_len, D)
    inputs = {
        "random": tuple(torch.randn(shape, device=args.device) for _ in range(2)),
        "structured": structured_qk(args.seq_len, args.heads, args.device, torch.float32),
    }
    v = torch.randn(shape, device=args.device)
    result = {"pattern": row.pattern.key, "seq_len": args.seq_len, "heads": args.heads,
              "device": args.device, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__}
    for name, (q, k) in inputs.items():
        result[name] = kept_mass(row, q, k, v)
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
