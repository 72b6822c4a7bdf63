"""The command line, driven through ``spcompile.cli.main(argv)``."""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

import spcompile
from spcompile.cli import COMMANDS, main
from spcompile.spec.masks import dense_mask
from spcompile.spec.patterns import AnyOf, Global, Sliding

EXAMPLES = sorted((Path(spcompile.__file__).parent / "examples").glob("*.yaml"))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

STREAMING = """\
version: 1
rules:
  - name: streaming
    match: "layers.*.attn"
    pattern:
      any_of:
        - sliding: {window: "seq_len // 4", causal: true}
        - global: {first: 4}
  - name: video
    match: {module: "blocks.*", grid: {T: 4, H: 6, W: 8}}
    pattern: {neighborhood: {shape: [T, H, W], window: 3}}
  - match: "*"
    pattern: dense
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def field(out: str, name: str) -> str:
    m = re.search(rf"^\s+{re.escape(name)}\s+(.*)$", out, re.M)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1)


def test_commands_table():
    names = [c.name for c in COMMANDS]
    assert names[:3] == ["validate", "explain", "schema"] and "demo" in names
    assert len(set(names)) == len(names), "duplicate command names"
    assert all(c.help for c in COMMANDS)


def test_no_command_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "validate" in err and "explain" in err


def test_validate_ok(capsys):
    code, out, err = run(capsys, "validate", *EXAMPLES)
    assert code == 0 and err == ""
    assert len(out.splitlines()) == len(EXAMPLES)
    assert all(line.endswith(("rule)", "rules)")) and ": OK (" in line
               for line in out.splitlines())


def test_validate_reports_every_error_and_fails(capsys, tmp_path):
    good = write(tmp_path, "good.toml", 'version = 1\n[[rules]]\nmatch = "*"\npattern = "dense"\n')
    bad = write(tmp_path, "bad.yaml", """\
        version: 1
        rules:
          - match: "a/b"
            pattern: {sliding: {window: 0}}
          - match: "*"
            pattern: {neighborhod: {shape: [4]}}
        """)
    code, out, _ = run(capsys, "validate", good, bad)
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"{good}: OK (1 rule)"
    assert lines[1].startswith(f"{bad}:3: rules[0].match: expected a glob")
    assert lines[2] == (f"{bad}:4: rules[0].pattern.sliding.window: expected window >= 1, "
                        "got window=0")
    assert lines[3].startswith(f"{bad}:6: rules[1].pattern.neighborhod: unknown pattern")
    assert len(lines) == 4


def test_validate_warns_about_unreachable_rules(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - {match: "*", pattern: dense}
          - {name: late, match: "blocks.*", pattern: {sliding: {window: 4}}}
        """)
    code, out, _ = run(capsys, "validate", path)
    assert code == 0
    assert "warning: late can never match: rules[0] before it matches every site" in out


def test_validate_missing_file_is_not_a_traceback(capsys, tmp_path):
    code, out, _ = run(capsys, "validate", tmp_path / "nope.yaml")
    assert code == 1 and "cannot read the spec file" in out


def test_explain_exact_figures_match_dense_mask(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    code, out, err = run(capsys, "explain", path, "--seq-len", 256, "--rule", "streaming")
    assert code == 0, err
    mask = dense_mask(AnyOf(Sliding(window=64, causal=True), Global(first=4)), 256, 256)
    counts = mask.sum(1)
    density = counts.sum().item() / 256**2
    assert field(out, "pattern") == ("{any_of: [{sliding: {window: 64, causal: true}}, "
                                     "{global: {first: 4}}]}")
    assert field(out, "density") == f"{density:.2%} (exact)"
    assert field(out, "keys/query") == (f"min {counts.min().item()}  mean "
                                        f"{counts.float().mean().item():.1f}  "
                                        f"max {counts.max().item()}")
    assert field(out, "FLOP bound") == f"{1 / density:.2f}x (S^2 / allowed pairs)"
    picture = [line for line in out.splitlines() if line.startswith("  |")]
    assert len(picture) == 32 and all(len(line) == 64 + 4 for line in picture)
    assert picture[0][3] != " " and picture[0][-2] == " "  # the diagonal, nothing above it
    assert "video" not in out


def test_explain_large_sizes_sample_rows(capsys, tmp_path, monkeypatch):
    """Above 4096 tokens no full mask may be built; figures come from sampled rows."""
    path = write(tmp_path, "s.yaml", STREAMING)

    def refuse(*args, **kwargs):
        raise AssertionError("dense_mask must not be used at this size")

    monkeypatch.setattr("spcompile.spec.preview.dense_mask", refuse)
    code, out, _ = run(capsys, "explain", path, "--seq-len", 65536, "--rule", "streaming")
    assert code == 0
    assert "estimated from 256 sampled query rows" in field(out, "density")
    window = 65536 // 4  # each query: its causal window plus the sinks left of the window
    exact_mean = sum(min(i + 1, window) + min(4, max(0, i - window + 1))
                     for i in range(65536)) / 65536
    mean = float(re.search(r"mean ([\d.]+)", field(out, "keys/query")).group(1))
    assert abs(mean - exact_mean) / exact_mean < 0.02


def test_explain_shape_and_per_rule_notes(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    code, out, _ = run(capsys, "explain", path, "--shape", "4x6x8")
    assert code == 0
    assert "{neighborhood: {shape: [4, 6, 8], window: 3}}" in out
    assert field(out, "size").startswith("q_len=192 kv_len=192")
    code, out, _ = run(capsys, "explain", path, "--seq-len", 100, "--rule", "video")
    assert "a site of this size would not match" in field(out, "note")
    assert "holds 192 tokens" in field(out, "not applicable")


def test_explain_per_head_needs_heads(capsys, tmp_path):
    heads = next(p for p in EXAMPLES if p.name == "heads.yaml")
    code, out, _ = run(capsys, "explain", heads, "--seq-len", 512)
    assert code == 0 and "--heads" in field(out, "not applicable")
    code, out, _ = run(capsys, "explain", heads, "--seq-len", 512, "--heads", 8)
    low, high = (int(x) for x in re.search(r"min (\d+) .* max (\d+)",
                                           field(out, "keys/query")).groups())
    assert (low, high) == (1, 512)


def test_explain_topk_gives_a_bound(capsys):
    topk = next(p for p in EXAMPLES if p.name == "topk.yaml")
    code, out, _ = run(capsys, "explain", topk, "--seq-len", 4096)
    assert code == 0
    assert "data-dependent" in field(out, "density")
    assert field(out, "keys/query") == "at most 1216 (19 blocks of 64)"


def test_explain_unknown_rule(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    code, _, err = run(capsys, "explain", path, "--seq-len", 64, "--rule", "nope")
    assert code == 2 and "rules: streaming, video, rules[2]" in err


def test_explain_bad_spec_is_an_error_not_a_traceback(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", "version: 1\nrules: [{match: '*'}]\n")
    code, _, err = run(capsys, "explain", path, "--seq-len", 64)
    assert code == 1 and f"error: {path}:2: rules[0]: missing key 'pattern'" in err


@pytest.mark.parametrize("argv", [["--shape", "16x0"], ["--shape", "a"], ["--seq-len", "0"],
                                  [], ["--seq-len", "8", "--shape", "2x4"]])
def test_explain_bad_arguments_exit_2(argv, capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    with pytest.raises(SystemExit) as info:
        main(["explain", str(path), *argv])
    assert info.value.code == 2


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="checks the message shown without matplotlib")
def test_explain_png_without_matplotlib(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    code, _, err = run(capsys, "explain", path, "--seq-len", 64, "--png", tmp_path / "m.png")
    assert code == 2 and "pip install matplotlib" in err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_explain_png(capsys, tmp_path):
    path = write(tmp_path, "s.yaml", STREAMING)
    png = tmp_path / "m.png"
    code, out, _ = run(capsys, "explain", path, "--seq-len", 192, "--png", png)
    assert code == 0 and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rich_output_on_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    path = write(tmp_path, "s.yaml", STREAMING)
    code, out, _ = run(capsys, "explain", path, "--seq-len", 64, "--rule", "streaming")
    assert code == 0
    assert "\x1b[" in out and "density" in out and "FLOP bound" in out


def test_schema_is_valid_and_accepts_every_example(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in EXAMPLES:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, f"{path.name}: {errors[0].message}"
    bad = {"version": 1, "rules": [{"match": "*", "pattern": {"sliding": {"windw": 4}}}]}
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors({"version": 2, "rules": []}))
    assert not list(validator.iter_errors(
        {"version": 1, "rules": [{"match": "*", "pattern": {"blocked": {"block": 4}}}]}))


def test_main_is_the_console_script():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("spcompile") == "spcompile.cli:main"
