"""``spcompile demo``: the main job end to end on a built-in model.

1. compile a small ViT with ``backend="spcompile"`` and a 2-D neighborhood spec;
2. report the attention sites found and what each became;
3. run it (Triton on a GPU, the plan-driven PyTorch path on a CPU) and check the output against
   the same model with the pattern given to SDPA as a dense boolean mask;
4. print the simulator's prediction for the pattern on the target GPU;
5. on a GPU, time the compiled model against the dense one at a larger grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..backend import spcompile_backend  # noqa: F401  (the entry point must import cleanly)
from ..passes.report import last_report
from ..spec.masks import dense_mask
from ..spec.patterns import Neighborhood
from .vit import TinyViT, spec_for

Print = Callable[[str], None]


def _compile(model: torch.nn.Module, spec: dict, inner: str) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="spcompile",
                         options={"spec": spec, "inner": inner, "report": False})


def check(device: torch.device, say: Print, grid: tuple[int, int] = (24, 24),
          window: int = 7) -> bool:
    """Steps 1-3 on a small model in float32; True when the outputs agree."""
    torch.manual_seed(0)
    model = TinyViT(grid=grid, dim=128, heads=4, depth=2).to(device).eval()
    images = torch.randn(2, 3, *model.image_size, device=device)
    inner = "inductor" if device.type == "cuda" else "eager"
    compiled = _compile(model, spec_for(grid, window), inner)
    with torch.no_grad():
        out = compiled(images)
    report = last_report()
    say(report.render() if report is not None else "no report: the backend did not run")
    pattern = Neighborhood(shape=grid, window=window)
    n = grid[0] * grid[1]
    model.set_reference_mask(dense_mask(pattern, n, n).to(device))
    with torch.no_grad():
        ref = model(images)
    model.set_reference_mask(None)
    err = float((out - ref).abs().max() / ref.abs().max())
    rewritten = report is not None and len(report.rewritten) == len(model.blocks)
    ok = rewritten and err < 1e-4
    say(f"\ncheck: {len(report.rewritten) if report else 0} of {len(model.blocks)} attention "
        f"sites rewritten; max |compiled - dense-masked reference| / max |reference| = "
        f"{err:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok


def predict(say: Print, device_name: str, grid: tuple[int, int], window: int, heads: int,
            head_dim: int) -> float:
    from ..sim import simulate

    pattern = Neighborhood(shape=grid, window=window)
    report = simulate(pattern, heads=heads, head_dim=head_dim, device=device_name)
    say("\nsimulator:\n" + report.render())
    return report.predicted_speedup


def measure(say: Print, grid: tuple[int, int], window: int) -> None:
    """Step 5, bf16 at a grid where attention matters: attention alone (SDPA vs our op on the
    same q, k, v), then the whole compiled model against the dense compiled model."""
    from ..attention import sparse_attention
    from ..timing import median_ms

    torch.manual_seed(0)
    n, heads, head_dim = grid[0] * grid[1], 12, 64
    q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    pattern = Neighborhood(shape=grid, window=window)
    t_sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    t_ours = median_ms(lambda: sparse_attention(q, k, v, pattern))
    say(f"\nmeasured on {torch.cuda.get_device_name()}, attention alone ({heads} heads, "
        f"{n} tokens, head dim {head_dim}): SDPA {t_sdpa:.3f} ms, spcompile {t_ours:.3f} ms "
        f"-> {t_sdpa / t_ours:.2f}x")
    model = TinyViT(grid=grid, patch=4, dim=heads * head_dim, heads=heads, depth=2)
    model = model.cuda().eval().bfloat16()
    images = torch.randn(1, 3, *model.image_size, device="cuda", dtype=torch.bfloat16)
    dense = torch.compile(model)
    sparse = _compile(model, spec_for(grid, window), "inductor")
    with torch.no_grad():
        dense(images)
        sparse(images)
        t_dense = median_ms(lambda: dense(images))
        t_sparse = median_ms(lambda: sparse(images))
    say(f"whole ViT (2 blocks, MLPs included): dense {t_dense:.2f} ms, spcompile "
        f"{t_sparse:.2f} ms -> {t_dense / t_sparse:.2f}x")


def run(say: Print = print) -> int:
    """The demo; returns the process exit code."""
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say(f"spcompile demo on {device.type}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "") + "\n")
    ok = check(device, say)
    big_grid, window = (128, 128), 31
    predict(say, "h100" if device.type == "cpu" else "current", big_grid, window, 12, 64)
    if device.type == "cuda":
        measure(say, big_grid, window)
    say(f"\ndone in {time.time() - start:.1f} s")
    return 0 if ok else 1
