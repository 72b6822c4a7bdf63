"""``inspect_model`` reports sites without computing (meta device)."""

from __future__ import annotations

import torch

from spcompile.demos.vit import TinyViT, spec_for
from spcompile.passes.inspect import inspect_model, load_factory


def test_inspect_reports_without_running():
    report = inspect_model(lambda: TinyViT(grid=(16, 16), dim=64, heads=2),
                           [(1, 3, 64, 64)], spec_for((16, 16), 5), torch.float32)
    assert [s.module_path for s in report.rewritten] == ["blocks.0.attn", "blocks.1.attn"]


def test_inspect_reports_a_grid_mismatch():
    report = inspect_model(lambda: TinyViT(grid=(16, 16), dim=64, heads=2),
                           [(1, 3, 64, 64)], spec_for((8, 8), 5), torch.float32)
    assert not report.rewritten
    assert all("holds 64 tokens" in s.reason for s in report.sites)


def test_load_factory_errors():
    import pytest

    with pytest.raises(ValueError, match="MODULE:FACTORY"):
        load_factory("spcompile.demos.vit")
    assert load_factory("spcompile.demos.vit:TinyViT") is TinyViT
