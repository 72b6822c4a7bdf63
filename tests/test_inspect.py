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


def test_inspect_command(tmp_path, capsys):
    from spcompile.cli import main

    spec = tmp_path / "vit.yaml"
    spec.write_text("version: 1\nrules:\n  - match: 'blocks.*.attn'\n    pattern:\n"
                    "      neighborhood: {shape: [24, 24], window: 7}\n")
    code = main(["inspect", "spcompile.demos.vit:TinyViT", "--spec", str(spec),
                 "--input-shape", "1x3x96x96", "--json"])
    assert code == 0
    assert '"module_path": "blocks.1.attn"' in capsys.readouterr().out
