"""Generated kernel modules: written once under a readable name, imported from disk after that.

Triton compiles from source it can inspect, so each generated kernel lives in a real file:
``$SPCOMPILE_CACHE_DIR`` (default ``~/.cache/spcompile``) ``/kernels/<name>-<sha>.py``. The name
says what the kernel is for (``fwd-neighborhood-3d-q4x4x8-kv4x4x8``); the hash covers the whole
source, so a changed template or pattern never reuses a stale file. Triton's own cache then
keeps the compiled binaries, so a warm process start skips compilation too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from types import ModuleType

_LOADED: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("SPCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "spcompile"
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_source(name: str, source: str) -> ModuleType:
    """Import ``source`` as a module (written atomically to the cache dir if not there yet)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    key = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)[:120]}-{digest}"
    if key in _LOADED:
        return _LOADED[key]
    path = cache_dir() / f"{key}.py"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"spcompile_kernels.{key.replace('-', '_')}",
                                                  path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module
