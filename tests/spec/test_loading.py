"""Spec files: the same tree in YAML, TOML and JSON, round trips, and every kind of error."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

import spcompile
from spcompile.spec.errors import SpecError
from spcompile.spec.loading import dump_spec, load_spec, loads_spec
from spcompile.spec.patterns import (
    PATTERNS,
    AnyOf,
    Dense,
    Global,
    Neighborhood,
    Sliding,
    pattern_from_dict,
)
from spcompile.spec.templates import PatternTemplate

EXAMPLES = Path(spcompile.__file__).parent / "examples"
FORMATS = ("yaml", "toml", "json")

DESIGN_YAML = """\
version: 1
rules:
  - name: video-blocks
    match: "blocks.*.attn"
    pattern:
      neighborhood: {shape: [16, 48, 80], window: [7, 17, 33], stride: [1, 4, 8]}
  - match: "layers.*.self_attn"
    pattern:
      any_of:
        - sliding: {window: 4096, causal: true}
        - global: {first: 4}
  - match: "*"
    pattern: dense
"""

DESIGN_TOML = """\
version = 1

[[rules]]
name = "video-blocks"
match = "blocks.*.attn"
[rules.pattern.neighborhood]
shape = [16, 48, 80]
window = [7, 17, 33]
stride = [1, 4, 8]

[[rules]]
match = "layers.*.self_attn"
[[rules.pattern.any_of]]
sliding = { window = 4096, causal = true }
[[rules.pattern.any_of]]
global = { first = 4 }

[[rules]]
match = "*"
pattern = "dense"
"""

#: One pattern tree per kind: the round-trip test must cover every kind there is.
PATTERN_TREES = {
    "dense": "dense",
    "sliding": {"sliding": {"left": 128, "right": 64}},
    "neighborhood": {"neighborhood": {"shape": [8, 12], "window": [3, 5], "stride": [1, 5],
                                      "dilation": [2, 1], "causal": [True, False]}},
    "strided": {"strided": {"stride": 16, "variant": "fixed", "summary": 4}},
    "blocked": {"blocked": {"block": 128, "causal": True}},
    "block_layout": {"block_layout": {"kind": "explicit", "block": 2,
                                      "layout": [[1, 0], [1, 1]]}},
    "topk": {"topk": {"block": 32, "coverage": 0.9, "sink": 1, "local": 2}},
    "global": {"global": {"indices": [0, 7, 31], "rows": True}},
    "any_of": {"any_of": {"patterns": [{"sliding": {"window": 64}}, {"global": {"every": 16}}],
                          "causal": True}},
    "heads": {"heads": [{"heads": "0-1", "pattern": "dense"},
                        {"heads": [2, 3], "pattern": {"blocked": {"block": 4}}},
                        {"heads": "4-", "pattern": {"sliding": {"window": 8, "causal": True}}}]},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path_or_tree):
    with pytest.raises(SpecError) as info:
        load_spec(path_or_tree)
    return info.value


# --------------------------------------------------------------------------------------------
# Formats and round trips


def test_design_example_is_equal_in_every_format(tmp_path):
    from_yaml = load_spec(write(tmp_path, "a.yaml", DESIGN_YAML))
    from_toml = load_spec(write(tmp_path, "a.toml", DESIGN_TOML))
    from_json = load_spec(write(tmp_path, "a.json", json.dumps(yaml.safe_load(DESIGN_YAML))))
    assert from_yaml == from_toml == from_json
    assert from_yaml.source.endswith("a.yaml") and from_toml.source.endswith("a.toml")
    first = from_yaml.rules[0]
    assert first.name == "video-blocks"
    assert first.static_pattern == Neighborhood(shape=(16, 48, 80), window=(7, 17, 33),
                                                stride=(1, 4, 8))
    assert from_yaml.rules[1].static_pattern == AnyOf(Sliding(window=4096, causal=True),
                                                      Global(first=4))
    assert from_yaml.rules[2].static_pattern == Dense()


def test_load_from_dict_and_path_object(tmp_path):
    tree = yaml.safe_load(DESIGN_YAML)
    assert load_spec(tree) == load_spec(str(write(tmp_path, "a.yml", DESIGN_YAML)))


def test_dict_may_carry_pattern_objects():
    s = load_spec({"version": 1, "rules": [{"match": "*", "pattern": Sliding(window=8)}]})
    assert s.rules[0].static_pattern == Sliding(window=8)


def test_every_pattern_kind_has_a_round_trip_case():
    assert set(PATTERN_TREES) == set(PATTERNS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", sorted(PATTERN_TREES))
def test_round_trip_every_pattern_kind(kind, fmt, tmp_path):
    tree = {"version": 1, "rules": [{"name": kind, "match": {"module": "m.*", "layers": "0-3,9-"},
                                     "pattern": PATTERN_TREES[kind]}]}
    spec = load_spec(tree)
    text = dump_spec(spec, fmt)
    again = load_spec(write(tmp_path, f"spec.{fmt}", text))
    assert again == spec
    assert again.rules[0].static_pattern == pattern_from_dict(PATTERN_TREES[kind])
    assert loads_spec(dump_spec(again, fmt), fmt) == spec


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_templates(fmt):
    tree = {"version": 1, "rules": [{
        "match": {"module": "*", "min_seq_len": 64, "max_seq_len": 1 << 20},
        "grid": {"T": "seq_len // 48", "H": 6, "W": 8},
        "pattern": {"any_of": [{"neighborhood": {"shape": ["T", "H", "W"],
                                                 "window": ["min(T, 3)", 3, "W // 2"]}},
                               {"global": {"first": "ceil(seq_len / 100)"}}]},
    }]}
    spec = load_spec(tree)
    assert isinstance(spec.rules[0].template, PatternTemplate)
    again = loads_spec(dump_spec(spec, fmt), fmt)
    assert again == spec
    assert again.rules[0].resolve({"seq_len": 480}) == spec.rules[0].resolve({"seq_len": 480})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_load(path):
    spec = load_spec(path)
    assert spec.rules
    for fmt in FORMATS:
        assert loads_spec(dump_spec(spec, fmt), fmt) == spec


def test_examples_cover_every_pattern_kind():
    used = set()

    def walk(tree):
        if isinstance(tree, dict):
            used.update(k for k in tree if k in PATTERNS)
            for v in tree.values():
                walk(v)
        elif isinstance(tree, list):
            for v in tree:
                walk(v)
        elif tree == "dense":
            used.add("dense")

    for path in EXAMPLES.glob("*.yaml"):
        for rule in yaml.safe_load(path.read_text())["rules"]:
            walk(rule["pattern"])
    assert used == set(PATTERNS)
    assert {"llm.yaml", "vit.yaml", "video.yaml"} <= {p.name for p in EXAMPLES.glob("*.yaml")}


# --------------------------------------------------------------------------------------------
# Errors: one per kind, each naming file, line, key path, value and what is allowed


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "s.yaml", "version: 1\nrule: []\nrules: []\n")
    error = problems(path)
    text = str(error)
    assert f"{path}:2: rule: unknown top-level key 'rule'; allowed: version, rules" in text


@pytest.mark.parametrize("version", ["2", "'1'", "1.0", "true"])
def test_wrong_version(version, tmp_path):
    path = write(tmp_path, "s.yaml", f"version: {version}\nrules: []\n")
    assert f"{path}:1: version: expected version: 1" in str(problems(path))
    assert f"got version={yaml.safe_load(version)!r}" in str(problems(path))


def test_missing_version_and_rules(tmp_path):
    path = write(tmp_path, "s.json", "{}")
    (first, second) = problems(path).problems
    assert "missing key 'version'" in first.message
    assert "missing key 'rules'" in second.message


@pytest.mark.parametrize("missing", ["match", "pattern"])
def test_missing_match_or_pattern(missing, tmp_path):
    rule = {"match": "*", "pattern": "dense"}
    del rule[missing]
    text = yaml.safe_dump({"version": 1, "rules": [{"match": "*", "pattern": "dense"}, rule]})
    path = write(tmp_path, "s.yaml", text)
    (problem,) = problems(path).problems
    assert problem.path == ("rules", 1)
    assert f"missing key {missing!r}" in problem.message and problem.line == 4


def test_unknown_pattern_kind(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - match: "*"
            pattern:
              slidng: {window: 128}
        """)
    (problem,) = problems(path).problems
    assert problem.format(str(path)) == (
        f"{path}:5: rules[0].pattern.slidng: unknown pattern 'slidng' (did you mean "
        "'sliding'?); expected one of dense, sliding, neighborhood, strided, blocked, "
        "block_layout, topk, global, any_of, heads")


def test_pattern_needing_arguments_and_bad_shapes():
    error = problems({"version": 1, "rules": [
        {"match": "*", "pattern": "sliding"},
        {"match": "*", "pattern": {"sliding": {"window": 1}, "global": {"first": 1}}},
        {"match": "*", "pattern": {"dense": {"x": 1}}},
        {"match": "*", "pattern": {"sliding": [1]}},
    ]})
    messages = [(p.path, p.message) for p in error.problems]
    assert messages[0] == (("rules", 0, "pattern"), "pattern 'sliding' needs arguments; write "
                           "it as a mapping, e.g. {sliding: {...}}")
    assert "exactly one key" in messages[1][1] and "['global', 'sliding']" in messages[1][1]
    assert messages[2][0] == ("rules", 2, "pattern", "dense")
    assert messages[3] == (("rules", 3, "pattern", "sliding"),
                           "expected a mapping of arguments, got [1]")


def test_unknown_argument(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - match: "*"
            pattern:
              neighborhood:
                shape: [16, 16]
                window: 3
                strid: 2
        """)
    (problem,) = problems(path).problems
    assert problem.line == 8
    assert problem.path == ("rules", 0, "pattern", "neighborhood", "strid")
    assert "unknown argument 'strid' (did you mean 'stride'?)" in problem.message
    assert "neighborhood takes shape, window, stride, dilation, causal" in problem.message


def test_bad_argument_value_names_the_key_and_line(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - match: "blocks.*"
            pattern:
              neighborhood:
                shape: [16, 48, 80]
                window: [7, 170, 33]
        """)
    (problem,) = problems(path).problems
    assert problem.format(str(path)) == (
        f"{path}:7: rules[0].pattern.neighborhood.window: expected window * dilation <= shape "
        "on every axis, got window=170, dilation=1, shape=48 on axis 1")


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ({"sliding": {"window": 0}}, "window", "expected window >= 1, got window=0"),
        ({"sliding": {"window": True}}, "window", "expected window to be an integer"),
        ({"sliding": {"causal": "yes", "window": 4}}, "causal",
         "expected causal to be true or false, got causal='yes'"),
        ({"strided": {"variant": "diagonal"}}, "variant",
         "expected variant to be one of 'strided', 'fixed', got variant='diagonal'"),
        ({"block_layout": {"kind": "bigbirb"}}, "kind", "expected kind to be one of"),
        ({"topk": {"block": 64, "coverage": 1.5}}, "coverage", "0 < coverage <= 1"),
        ({"global": {"first": -1}}, "first", "expected first >= 0, got first=-1"),
    ],
)
def test_bad_arguments_wrap_constructor_messages(pattern, key, expected):
    (problem,) = problems({"version": 1, "rules": [{"match": "*", "pattern": pattern}]}).problems
    kind = next(iter(pattern))
    assert problem.path == ("rules", 0, "pattern", kind, key)
    assert expected in problem.message


def test_composite_errors_name_the_composite():
    (problem,) = problems({"version": 1, "rules": [{"match": "*", "pattern": {
        "any_of": [{"sliding": {"window": 4}}, {"topk": {"k": 2}}]}}]}).problems
    assert problem.path == ("rules", 0, "pattern", "any_of")
    assert "TopK cannot be a member of a union" in problem.message


def test_heads_entries_are_checked():
    error = problems({"version": 1, "rules": [{"match": "*", "pattern": {"heads": [
        {"heads": "0-3"}, {"heads": "x", "pattern": "dense"},
        {"heads": 5, "pattern": {"sliding": {"window": 0}}}]}}]})
    paths = [p.path for p in error.problems]
    assert ("rules", 0, "pattern", "heads", 0) in paths
    assert ("rules", 0, "pattern", "heads", 2, "pattern", "sliding", "window") in paths


@pytest.mark.parametrize(
    ("glob", "why"),
    [
        ("blocks/*/attn", "module paths use dots, not slashes"),
        ("", "expected a glob over the module path"),
        ("blocks.[0-3.attn", "balanced [...]"),
        ("blocks.* attn", "allowed characters"),
        (12, "got 12"),
    ],
)
def test_bad_globs(glob, why, tmp_path):
    path = write(tmp_path, "s.yaml", yaml.safe_dump(
        {"version": 1, "rules": [{"match": {"module": glob}, "pattern": "dense"}]}))
    (problem,) = problems(path).problems
    assert problem.path == ("rules", 0, "match", "module")
    assert why in problem.message and repr(glob) in problem.message
    assert problem.line is not None


@pytest.mark.parametrize(
    ("layers", "why"),
    [
        ("5-2", "low <= high, got '5-2'"),
        ("a-b", "expected layers like '0-11', '0-3,8,10-'"),
        ("0-3,,5", "bad part ''"),
        (-1, "got -1"),
        (True, "got True"),
        ([], "got []"),
    ],
)
def test_bad_layer_ranges(layers, why):
    (problem,) = problems({"version": 1, "rules": [
        {"match": {"module": "*", "layers": layers}, "pattern": "dense"}]}).problems
    assert problem.path == ("rules", 0, "match", "layers")
    assert why in problem.message


def test_bad_match_keys_and_bounds():
    error = problems({"version": 1, "rules": [
        {"match": {"module": "*", "layer": 3}, "pattern": "dense"},
        {"match": {"min_seq_len": 4096, "max_seq_len": 1024}, "pattern": "dense"},
        {"match": {"min_seq_len": 0}, "pattern": "dense"},
        {"match": ["*"], "pattern": "dense"},
    ]})
    messages = {p.path: p.message for p in error.problems}
    assert "unknown key 'layer'; allowed: module, layers" in messages[("rules", 0, "match",
                                                                      "layer")]
    assert "min_seq_len <= max_seq_len" in messages[("rules", 1, "match", "max_seq_len")]
    assert "got min_seq_len=0" in messages[("rules", 2, "match", "min_seq_len")]
    assert "expected a glob string or a mapping" in messages[("rules", 3, "match")]


def test_bad_rules_and_rule_keys():
    error = problems({"version": 1, "rules": [
        "dense", {"match": "*", "pattern": "dense", "patern": 1},
        {"name": "a", "match": "*", "pattern": "dense"},
        {"name": "a", "match": "x", "pattern": "dense"}]})
    messages = {p.path: p.message for p in error.problems}
    assert "expected a rule mapping" in messages[("rules", 0)]
    assert "unknown rule key 'patern'" in messages[("rules", 1, "patern")]
    assert "duplicate rule name 'a' (also rules[2])" in messages[("rules", 3, "name")]
    assert "expected a list" in problems({"version": 1, "rules": {"a": 1}}).problems[0].message


def test_grid_errors():
    error = problems({"version": 1, "rules": [
        {"match": {"module": "*", "grid": {"T": 4}}, "grid": {"T": 4}, "pattern": "dense"},
        {"match": "*", "grid": {"seq_len": 4, "2x": 3, "H": 0}, "pattern": "dense"},
        {"match": "*", "grid": {"W": "T * 2"}, "pattern": "dense"},
        {"match": "*", "grid": {"A": 1, "B": 1, "C": 1, "D": 1}, "pattern": "dense"},
    ]})
    messages = {p.path: p.message for p in error.problems}
    assert "also given in match.grid" in messages[("rules", 0, "grid", "T")]
    assert "built-in name" in messages[("rules", 1, "grid", "seq_len")]
    assert "expected a grid axis name" in messages[("rules", 1, "grid", "2x")]
    assert "got H=0" in messages[("rules", 1, "grid", "H")]
    assert "unknown name 'T'" in messages[("rules", 2, "grid", "W")]
    assert "expected 1 to 3 axes" in messages[("rules", 3, "grid")]


def test_expression_errors_at_load_time(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - match: "*"
            pattern: {sliding: {window: "seq_len // 4 + T"}}
          - match: "*"
            pattern: {sliding: {window: "__import__('os').getcwd()"}}
          - match: "*"
            pattern: {neighborhood: {shape: [4, "seq_len.bit_length()"], window: 3}}
        """)
    (unknown, call, attribute) = problems(path).problems
    assert (unknown.line, unknown.path[-1]) == (4, "window")
    assert "unknown name 'T'" in unknown.message
    assert call.line == 6 and "not allowed" in call.message
    assert attribute.path == ("rules", 2, "pattern", "neighborhood", "shape", 1)
    assert "not allowed" in attribute.message


def test_every_error_is_reported_in_file_order(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 3
        rules:
          - match: "a/b"
            pattern: {sliding: {window: 0}}
          - match: {module: "*", layers: "9-1"}
            pattern: {neighborhood: {shape: [8], window: 9}}
          - pattern: dense
        extra: true
        """)
    error = problems(path)
    assert [p.line for p in error.problems] == [1, 3, 4, 5, 6, 7, 8]
    assert len(str(error).splitlines()) == 7


def test_duplicate_yaml_keys(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - match: "*"
            pattern: dense
            pattern: {sliding: {window: 4}}
        """)
    (problem,) = problems(path).problems
    assert problem.line == 5 and "duplicate key 'pattern' (first given on line 4)" in \
        problem.message


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("s.yaml", "version: 1\nrules:\n  - match: [\n", 4),
        ("s.json", '{"version": 1,\n "rules": [,]}', 2),
        ("s.toml", 'version = 1\n[[rules]]\nmatch = "*\n', 3),
    ],
)
def test_syntax_errors_name_the_line(name, text, line, tmp_path):
    path = write(tmp_path, name, text)
    (problem,) = problems(path).problems
    assert problem.line == line and problem.message.startswith("syntax error:")
    assert str(path) in str(problems(path))


def test_toml_semantic_errors_have_lines(tmp_path):
    path = write(tmp_path, "s.toml", """\
        version = 1

        [[rules]]
        match = "*"
        pattern = "dense"

        [[rules]]
        match = "blocks.*"
        [rules.pattern.sliding]
        causal = true
        window = 0
        """)
    (problem,) = problems(path).problems
    assert problem.format(str(path)) == (
        f"{path}:11: rules[1].pattern.sliding.window: expected window >= 1, got window=0")


def test_json_semantic_errors_have_paths(tmp_path):
    path = write(tmp_path, "s.json", json.dumps(
        {"version": 1, "rules": [{"match": "*", "pattern": {"blocked": {"block": 0}}}]}))
    (problem,) = problems(path).problems
    assert problem.format(str(path)) == (
        f"{path}: rules[0].pattern.blocked.block: expected block >= 1, got block=0")


def test_unreadable_files(tmp_path):
    assert "unknown spec file type '.txt'" in str(problems(write(tmp_path, "s.txt", "")))
    assert "cannot read the spec file" in str(problems(tmp_path / "missing.yaml"))
    assert "expected a mapping with keys version and rules" in str(
        problems(write(tmp_path, "e.yaml", "")))
