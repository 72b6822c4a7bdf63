"""spcompile: sparse attention for unmodified PyTorch models, via torch.compile.

    model = torch.compile(model, backend="spcompile", options={"spec": "attn.yaml"})
"""

from .attention import sparse_attention
from .passes.report import last_report
from .reference import reference_attention
from .sim import simulate
from .spec.errors import SpecError
from .spec.loading import load_spec
from .spec.masks import dense_mask
from .spec.patterns import (
    AnyOf,
    Blocked,
    BlockLayout,
    Dense,
    Global,
    Neighborhood,
    Pattern,
    PerHead,
    Sliding,
    Strided,
    TopK,
)

__version__ = "0.1.0"

from .backend import register as _register_backend

_register_backend()

__all__ = [
    "AnyOf",
    "BlockLayout",
    "Blocked",
    "Dense",
    "Global",
    "Neighborhood",
    "Pattern",
    "PerHead",
    "Sliding",
    "SpecError",
    "Strided",
    "TopK",
    "dense_mask",
    "last_report",
    "load_spec",
    "reference_attention",
    "simulate",
    "sparse_attention",
]
