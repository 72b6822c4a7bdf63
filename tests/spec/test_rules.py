"""Rule matching: globs, layers, sequence lengths, grids, first match wins, reasons."""

from __future__ import annotations

import pytest
import sympy

from spcompile.spec.errors import SpecError
from spcompile.spec.loading import load_spec
from spcompile.spec.patterns import AnyOf, Dense, Global, Neighborhood, Sliding
from spcompile.spec.rules import (
    MatchCondition,
    SiteKey,
    format_layers,
    layer_from_path,
    parse_layers,
)


def spec(*rules):
    return load_spec({"version": 1, "rules": list(rules)})


def site(path="model.layers.3.self_attn", seq_len=8192, **kw):
    return SiteKey(path, layer=kw.pop("layer", layer_from_path(path)), seq_len=seq_len, **kw)


LLM = spec(
    {"name": "short", "match": {"module": "model.layers.*.self_attn", "max_seq_len": 4096},
     "pattern": "dense"},
    {"name": "global-layers", "match": {"module": "model.layers.*.self_attn", "layers": "5,11"},
     "pattern": {"sliding": {"window": "seq_len // 4", "causal": True}}},
    {"name": "local", "match": "model.layers.*.self_attn",
     "pattern": {"any_of": [{"sliding": {"window": 1024, "causal": True}},
                            {"global": {"first": 4}}]}},
)


def test_first_match_wins():
    rule, pattern = LLM.match(site("model.layers.5.self_attn", seq_len=2048))
    assert rule.name == "short" and pattern == Dense()
    rule, pattern = LLM.match(site("model.layers.5.self_attn"))
    assert rule.name == "global-layers" and pattern == Sliding(window=2048, causal=True)
    rule, pattern = LLM.match(site("model.layers.6.self_attn"))
    assert rule.name == "local"
    assert pattern == AnyOf(Sliding(window=1024, causal=True), Global(first=4))


def test_unmatched_site_stays_dense_and_says_why():
    other = site("model.vision.blocks.0.attn")
    assert LLM.match(other) is None
    reasons = LLM.why_not(other)
    assert [r.name for r, _ in reasons] == ["short", "global-layers", "local"]
    assert all("does not match 'model.layers.*.self_attn'" in why for _, why in reasons)


def test_why_not_stops_at_the_matching_rule():
    reasons = LLM.why_not(site("model.layers.6.self_attn"))
    assert [r.name for r, _ in reasons] == ["short", "global-layers"]
    assert "does not satisfy max_seq_len = 4096" in reasons[0][1]
    assert "layer 6 is not in 5,11" in reasons[1][1]


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("*", "anything.at.all", True),
        ("blocks.*.attn", "blocks.0.attn", True),
        ("blocks.*.attn", "blocks.12.attn", True),
        ("blocks.*.attn", "blocks.0.attn2", False),
        ("blocks.*.attn", "model.blocks.0.attn", False),
        ("*.attn1", "transformer_blocks.3.attn1", True),
        ("blocks.?.attn", "blocks.10.attn", False),
        ("blocks.[0-3].attn", "blocks.2.attn", True),
        ("blocks.[!0-3].attn", "blocks.2.attn", False),
        ("Blocks.*", "blocks.1", False),  # case-sensitive, like module names
    ],
)
def test_globs(glob, path, matches):
    assert (MatchCondition(module=glob).mismatch(SiteKey(path)) is None) is matches


@pytest.mark.parametrize(
    ("text", "layers", "inside", "outside"),
    [
        ("0-11", ((0, 11),), [0, 5, 11], [12]),
        ("0-3,8,10-", ((0, 3), (8, 8), (10, None)), [0, 3, 8, 10, 99], [4, 7, 9]),
        (7, ((7, 7),), [7], [6, 8]),
        ([1, 3], ((1, 1), (3, 3)), [1, 3], [2]),
        (" 2 - 4 , 6", None, [], []),
    ],
)
def test_layers(text, layers, inside, outside):
    if layers is None:
        with pytest.raises(ValueError, match="expected layers"):
            parse_layers(text)
        return
    assert parse_layers(text) == layers
    cond = MatchCondition(layers=layers)
    for layer in inside:
        assert cond.mismatch(SiteKey("m", layer=layer)) is None
    for layer in outside:
        assert "is not in" in cond.mismatch(SiteKey("m", layer=layer))
    assert parse_layers(format_layers(layers)) == layers


def test_layers_need_a_layer_index():
    assert "has no layer" in MatchCondition(layers=((0, 3),)).mismatch(SiteKey("m"))


def test_layer_from_path():
    assert layer_from_path("model.layers.11.self_attn") == 11
    assert layer_from_path("blocks.0.attn") == 0
    assert layer_from_path("encoder.attn") is None


def test_seq_len_bounds_are_inclusive():
    cond = MatchCondition(min_seq_len=1024, max_seq_len=4096)
    assert cond.mismatch(SiteKey("m", seq_len=1024)) is None
    assert cond.mismatch(SiteKey("m", seq_len=4096)) is None
    assert "min_seq_len = 1024" in cond.mismatch(SiteKey("m", seq_len=1023))
    assert "max_seq_len = 4096" in cond.mismatch(SiteKey("m", seq_len=4097))
    assert "unknown" in cond.mismatch(SiteKey("m"))


def test_symbolic_seq_len_is_decided_when_sympy_can():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    assert MatchCondition(min_seq_len=1).mismatch(SiteKey("m", seq_len=s0)) is None
    why = MatchCondition(min_seq_len=1024).mismatch(SiteKey("m", seq_len=s0))
    assert "symbolic" in why


def test_grid_condition_matches_token_count_and_known_grid():
    s = spec({"match": {"module": "*", "grid": {"T": 4, "H": 6, "W": 8}},
              "pattern": {"neighborhood": {"shape": ["T", "H", "W"], "window": 3}}})
    pattern = s.match(SiteKey("blocks.0.attn", seq_len=192)).pattern
    assert pattern == Neighborhood(shape=(4, 6, 8), window=3)
    assert s.match(SiteKey("blocks.0.attn", seq_len=193)) is None
    assert s.match(SiteKey("b", seq_len=192, grid={"T": 4, "H": 6, "W": 8})) is not None
    assert s.match(SiteKey("b", seq_len=192, grid={"T": 8, "H": 6, "W": 4})) is None
    assert "grid" in s.why_not(SiteKey("b", seq_len=192, grid={"T": 8, "H": 6, "W": 4}))[0][1]


def test_rule_grid_expressions_follow_the_site():
    s = spec({"match": "*", "grid": {"T": "seq_len // 48", "H": 6, "W": 8},
              "pattern": {"neighborhood": {"shape": ["T", "H", "W"],
                                           "window": ["min(T, 3)", 3, 5]}}})
    assert s.match(site(seq_len=96)).pattern == Neighborhood(shape=(2, 6, 8), window=(2, 3, 5))
    assert s.match(site(seq_len=480)).pattern == Neighborhood(shape=(10, 6, 8),
                                                             window=(3, 3, 5))


def test_template_resolve_with_symbols():
    rule = LLM.rules[1]
    assert rule.static_pattern is None
    assert rule.resolve({"seq_len": 1000}) == Sliding(window=250, causal=True)
    assert LLM.rules[2].static_pattern is not None


def test_resolve_errors_name_the_rule_key_and_values():
    s = spec({"match": "*", "pattern": {"sliding": {"window": "seq_len // 3 - 100"}}})
    with pytest.raises(SpecError) as info:
        s.match(site(seq_len=12))
    (problem,) = info.value.problems
    assert problem.path == ("rules", 0, "pattern", "sliding", "window")
    assert "expected window >= 1, got window=-96" in problem.message
    assert "seq_len=12" in problem.message


def test_non_integer_expression_at_resolve_names_the_key():
    s = spec({"match": "*", "pattern": {"blocked": {"block": "seq_len / 3"}}})
    with pytest.raises(SpecError, match=r"rules\[0\]\.pattern\.blocked\.block: 'seq_len / 3' "
                                        r"gave 333\.333, expected an integer"):
        s.match(site(seq_len=1000))


def test_missing_site_symbol_at_resolve():
    s = spec({"match": "*", "pattern": {"sliding": {"window": "head_dim * 8"}}})
    with pytest.raises(SpecError, match="needs head_dim"):
        s.match(site())
    assert s.match(site(head_dim=64)).pattern == Sliding(window=512)


def test_pattern_that_does_not_fit_the_site_is_an_error():
    s = spec({"name": "video", "match": "*",
              "pattern": {"neighborhood": {"shape": [4, 6, 8], "window": 3}}})
    with pytest.raises(SpecError, match=r"rules\[0\]\.pattern: .*holds 192 tokens.*"
                                        r"narrow its match"):
        s.match(site("blocks.0.attn2", seq_len=192, kv_len=77))
    with pytest.raises(SpecError, match="holds 192 tokens"):
        s.match(site("blocks.0.attn", seq_len=sympy.Integer(100)))
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    assert s.match(site("blocks.0.attn", seq_len=s0)).pattern.shape == (4, 6, 8)


def test_kv_len_defaults_to_seq_len():
    assert SiteKey("m", seq_len=10).kv_len == 10
    assert SiteKey("m", seq_len=10, kv_len=3).kv_len == 3
    assert hash(SiteKey("m", seq_len=10, grid={"T": 2})) == hash(
        SiteKey("m", seq_len=10, grid={"T": 2}))


def test_unused_rules():
    matched = [LLM.match(site(p, seq_len=n)).rule
               for p, n in [("model.layers.5.self_attn", 8192), ("model.layers.1.self_attn", 8192)]]
    assert [r.name for r in LLM.unused_rules(matched)] == ["short"]
    assert LLM.unused_rules([]) == list(LLM.rules)


def test_unreachable_rules_after_catch_all():
    s = spec({"match": "blocks.*", "pattern": "dense"},
             {"name": "all", "match": "*", "pattern": "dense"},
             {"name": "never", "match": "x", "pattern": "dense"})
    assert [(r.label, e.label) for r, e in s.unreachable_rules()] == [("never", "all")]
    assert LLM.unreachable_rules() == []


def test_rule_lookup_by_name_or_position():
    assert LLM.rule("local") is LLM.rules[2]
    assert LLM.rule("rules[1]") is LLM.rules[1]
    with pytest.raises(KeyError, match="rules: short, global-layers, local"):
        LLM.rule("nope")
