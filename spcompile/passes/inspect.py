"""``spcompile inspect``: what the backend would do to a model, without computing anything.

The model and its inputs live on the ``meta`` device: dynamo traces them as usual, the backend
detects, matches and rewrites, and every kernel (ours included, through its fake
implementation) only propagates shapes.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .report import Report, last_report


def load_factory(target: str) -> Any:
    """``package.module:factory`` -> the callable."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mypkg.models:build), got {target!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None


def inspect_model(
    factory: Any, input_shapes: list[tuple[int, ...]], spec: Any, dtype: torch.dtype,
) -> Report:
    """Build the model on the meta device, compile it with the spec, and return the report.

    Inputs are float tensors of ``input_shapes`` (``dtype``), or int64 token ids when ``dtype``
    is an integer type (values do not matter on meta).
    """
    with torch.device("meta"):
        model = factory()
        inputs = [torch.empty(shape, dtype=dtype) for shape in input_shapes]
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spcompile",
                             options={"spec": spec, "inner": "eager", "report": False})
    with torch.no_grad():
        compiled(*inputs)
    report = last_report()
    if report is None:
        raise RuntimeError("the model produced no graph for the backend (nothing to inspect)")
    return report
