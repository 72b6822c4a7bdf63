"""The ``spcompile`` torch.compile backend.

    torch.compile(model, backend="spcompile", options={"spec": "attn.yaml"})

Registered under the ``torch_dynamo_backends`` entry point, so the name resolves without an
import. Options:

- ``spec``: a path (YAML/TOML/JSON), a dict, or a Spec; default ``$SPCOMPILE_SPEC``.
- ``inner``: ``"inductor"`` (default) compiles the rewritten graph with Inductor, ``"eager"``
  runs it as it is.
- ``strict``: turn "site left dense" into an error.
- ``report``: log the report table once per compile (default true).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .spec.loading import load_spec
from .spec.rules import Spec

INNER = ("inductor", "eager")
OPTION_KEYS = ("spec", "inner", "strict", "report")


@dataclass(frozen=True)
class BackendOptions:
    spec: Spec | None
    inner: str = "inductor"
    strict: bool = False
    report: bool = True


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate the options dict; errors name the key and what is allowed."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"spcompile backend: unknown option(s) {unknown}; "
                         f"allowed: {', '.join(OPTION_KEYS)}")
    spec_arg = options.get("spec", os.environ.get("SPCOMPILE_SPEC") or None)
    spec = load_spec(spec_arg) if spec_arg is not None else None
    inner = options.get("inner", "inductor")
    if inner not in INNER:
        raise ValueError(f"spcompile backend: expected options['inner'] to be one of {INNER}, "
                         f"got {inner!r}")
    for key in ("strict", "report"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"spcompile backend: expected options[{key!r}] to be true or false, "
                            f"got {options[key]!r}")
    return BackendOptions(spec, inner, bool(options.get("strict", False)),
                          bool(options.get("report", True)))


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: list, inner: str) -> Callable:
    if inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def spcompile_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None
) -> Callable:
    """Rewrite the attention sites of ``gm`` per the spec, then compile the rest."""
    opts = parse_options(options)
    from .passes.rewrite import rewrite_attention

    rewrite_attention(gm, opts)
    return _inner_compile(gm, example_inputs, opts.inner)


def register() -> None:
    """Make ``backend="spcompile"`` resolve even where the package's entry point is not
    installed (a source checkout on PYTHONPATH); harmless where it is."""
    from torch._dynamo.backends import registry

    if "spcompile" not in getattr(registry, "_COMPILER_FNS", {}):
        registry.register_backend(spcompile_backend, name="spcompile")
