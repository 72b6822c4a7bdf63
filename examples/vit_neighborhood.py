"""A vision transformer with 2-D neighborhood attention: the README's main job.

    python examples/vit_neighborhood.py        # the same as `spcompile demo`

The model (``spcompile.demos.vit.TinyViT``) is plain PyTorch: patch embedding, blocks of
``F.scaled_dot_product_attention`` over the patch grid. The spec gives every block's attention a
2-D neighborhood window on that grid; the backend finds the sites, rewrites them, and the run
checks the compiled model against the same model with the window given to SDPA as a dense mask,
then prints the simulator's prediction (and, on a GPU, the measured speedup of the whole model).
"""

from __future__ import annotations

import sys

from spcompile.demos.run import run


def main() -> bool:
    """True when the compiled model agrees with the dense-masked one."""
    return run() == 0


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
