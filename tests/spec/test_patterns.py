"""Pattern classes: argument validation, the dict round trip, PerHead, and block layouts.

Masks themselves are checked against the oracle in test_masks.py; this file checks what a user
touches before any mask exists: constructors, error messages, spec trees, layouts and seeds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import oracle
import pytest
import sympy
import torch
import yaml

import spcompile as sp
from spcompile.spec.patterns import PATTERNS, parse_heads, pattern_from_dict

# ---------------------------------------------------------------------------------------------
# Argument validation: every case names the argument and the value that came


def _na(**kw):
    return lambda: sp.Neighborhood(**{"shape": (8,), "window": 3, **kw})


INVALID = [
    # Neighborhood
    (_na(window=5, dilation=2), ValueError,
     "expected window * dilation <= shape on every axis, got window=5, dilation=2, shape=8 "
     "on axis 0"),
    (lambda: sp.Neighborhood(shape=(8, 6), window=(3, 4), dilation=(1, 2)), ValueError,
     "got window=4, dilation=2, shape=6 on axis 1"),
    (_na(window=4, stride=5), ValueError,
     "expected stride <= window on every axis, got stride=5, window=4 on axis 0"),
    (_na(window=0), ValueError, "expected every window >= 1, got window=(0,)"),
    (_na(stride=(0,)), ValueError, "expected every stride >= 1, got stride=(0,)"),
    (_na(window=True), TypeError, "expected window to be an integer or 1 integers (one per "
                                  "axis), got window=True"),
    (_na(window=3.0), TypeError, "got window=3.0"),
    (_na(window=(3, 3)), TypeError, "got window=(3, 3)"),
    (_na(dilation=(1, True)), TypeError, "got dilation=(1, True)"),
    (_na(causal=1), TypeError, "expected causal to be true/false or 1 of them (one per axis), "
                               "got causal=1"),
    (_na(causal=(True, False)), TypeError, "got causal=(True, False)"),
    (_na(shape=()), TypeError, "expected shape to be 1 to 3 integers, got shape=()"),
    (_na(shape=(2, 2, 2, 2)), TypeError, "got shape=(2, 2, 2, 2)"),
    (_na(shape="8x8"), TypeError, "got shape='8x8'"),
    (_na(shape=(8, 0)), ValueError, "expected every shape >= 1, got shape=(8, 0)"),
    (_na(shape=(8, True)), TypeError, "got shape=(8, True)"),
    # Sliding
    (lambda: sp.Sliding(), ValueError, "expected window=W or left=/right=, got neither"),
    (lambda: sp.Sliding(window=4, left=1), ValueError,
     "expected either window or left/right, got window=4, left=1, right=None"),
    (lambda: sp.Sliding(window=0), ValueError, "expected window >= 1, got window=0"),
    (lambda: sp.Sliding(window=True), TypeError,
     "expected window to be an integer, got window=True"),
    (lambda: sp.Sliding(window=4.0), TypeError, "got window=4.0"),
    (lambda: sp.Sliding(left=-1), ValueError, "expected left >= 0, got left=-1"),
    (lambda: sp.Sliding(left=2, right="1"), TypeError, "got right='1'"),
    (lambda: sp.Sliding(left=2, right=1, causal=True), ValueError,
     "causal means right=0, got right=1 with causal=True"),
    (lambda: sp.Sliding(window=4, causal="yes"), TypeError,
     "expected causal to be true or false, got causal='yes'"),
    (lambda: sp.Sliding(window=4, causal=1), TypeError, "got causal=1"),
    # Strided
    (lambda: sp.Strided(variant="dilated"), ValueError,
     "expected variant to be one of 'strided', 'fixed', got variant='dilated'"),
    (lambda: sp.Strided(stride=0), ValueError, "expected stride >= 1, got stride=0"),
    (lambda: sp.Strided(local=-2), ValueError, "expected local >= 0, got local=-2"),
    (lambda: sp.Strided(local=True), TypeError, "got local=True"),
    (lambda: sp.Strided(variant="fixed", stride=4, summary=5), ValueError,
     "expected summary <= stride, got summary=5, stride=4"),
    (lambda: sp.Strided(summary=0), ValueError, "expected summary >= 1, got summary=0"),
    # Blocked
    (lambda: sp.Blocked(block=0), ValueError, "Blocked: expected block >= 1, got block=0"),
    (lambda: sp.Blocked(block=2.5), TypeError, "got block=2.5"),
    (lambda: sp.Blocked(block=4, causal=None), TypeError, "got causal=None"),
    # Global
    (lambda: sp.Global(), ValueError, "expected at least one of first, every, indices, got none"),
    (lambda: sp.Global(first=2, columns=False), ValueError,
     "expected columns or rows (or both) to be true"),
    (lambda: sp.Global(indices=[1, -1]), ValueError, "expected indices[] >= 0, got indices[]=-1"),
    (lambda: sp.Global(indices="12"), TypeError,
     "expected indices to be a list of integers, got indices='12'"),
    (lambda: sp.Global(indices=5), TypeError, "got indices=5"),
    (lambda: sp.Global(first=False, every=4), TypeError, "got first=False"),
    (lambda: sp.Global(every=-3), ValueError, "expected every >= 0, got every=-3"),
    (lambda: sp.Global(first=1, rows=1), TypeError, "got rows=1"),
    # BlockLayout
    (lambda: sp.BlockLayout(kind="star"), ValueError,
     "expected kind to be one of 'bigbird', 'longformer', 'fixed', 'variable', 'explicit', "
     "got kind='star'"),
    (lambda: sp.BlockLayout(kind="explicit"), ValueError,
     "kind 'explicit' needs layout"),
    (lambda: sp.BlockLayout(kind="explicit", layout=((1, 0), (1,))), ValueError,
     "non-empty rectangular 0/1 matrix, got 2 rows of lengths [1, 2]"),
    (lambda: sp.BlockLayout(layout=((1,),)), ValueError,
     "layout is only for kind 'explicit', got kind='bigbird'"),
    (lambda: sp.BlockLayout(kind="variable"), ValueError,
     "kind 'variable' needs local_windows"),
    (lambda: sp.BlockLayout(kind="variable", local_windows=(2, 0)), ValueError,
     "expected local_windows[] >= 1, got local_windows[]=0"),
    (lambda: sp.BlockLayout(kind="fixed", local=2, global_blocks=3), ValueError,
     "kind 'fixed' needs 1 <= global_blocks <= local, got local=2, global_blocks=3"),
    (lambda: sp.BlockLayout(random=-1), ValueError, "expected random >= 0, got random=-1"),
    (lambda: sp.BlockLayout(seed=1.5), TypeError, "expected seed to be an integer, got seed=1.5"),
    (lambda: sp.BlockLayout(block=True), TypeError, "got block=True"),
    (lambda: sp.BlockLayout(global_indices=(0, -1)), ValueError, "got global_indices[]=-1"),
    # TopK
    (lambda: sp.TopK(), ValueError, "expected exactly one of k or coverage, got k=None, "
                                    "coverage=None"),
    (lambda: sp.TopK(k=2, coverage=0.5), ValueError, "got k=2, coverage=0.5"),
    (lambda: sp.TopK(coverage=0.0), ValueError, "expected 0 < coverage <= 1, got coverage=0.0"),
    (lambda: sp.TopK(coverage=1.5), ValueError, "got coverage=1.5"),
    (lambda: sp.TopK(coverage=True), TypeError, "got coverage=True"),
    (lambda: sp.TopK(coverage="0.9"), TypeError, "got coverage='0.9'"),
    (lambda: sp.TopK(k=-1), ValueError, "expected k >= 0, got k=-1"),
    (lambda: sp.TopK(k=2, block=0), ValueError, "expected block >= 1, got block=0"),
    (lambda: sp.TopK(k=2, share_gqa="no"), TypeError, "got share_gqa='no'"),
    # Composition
    (lambda: sp.AnyOf(), ValueError, "AnyOf: expected at least one pattern"),
    (lambda: sp.AnyOf(sp.Dense(), "sliding"), TypeError, "AnyOf: expected patterns, got 'sliding'"),
    (lambda: sp.AnyOf(sp.Dense(), causal=1), TypeError, "got causal=1"),
    (lambda: sp.AnyOf(sp.TopK(k=1)), NotImplementedError, "a TopK cannot be a member of a union"),
    (lambda: sp.AnyOf(sp.PerHead({0: sp.Dense()})), NotImplementedError,
     "a PerHead cannot be a member"),
    (lambda: sp.PerHead({}), ValueError, "expected at least one (heads, pattern) entry"),
    (lambda: sp.PerHead({0: "dense"}), TypeError,
     "expected a (non-PerHead) pattern for heads 0, got 'dense'"),
    (lambda: sp.PerHead({0: sp.PerHead({0: sp.Dense()})}), TypeError, "non-PerHead"),
    (lambda: sp.PerHead({"x-y": sp.Dense()}), ValueError,
     "expected heads like '0-3', '4-' or '7', got 'x-y'"),
    (lambda: sp.PerHead({"3-1": sp.Dense()}), ValueError,
     "expected a range low-high with low <= high, got '3-1'"),
    (lambda: sp.PerHead({-1: sp.Dense()}), ValueError, "expected heads >= 0, got heads=-1"),
    (lambda: sp.PerHead({(0, True): sp.Dense()}), TypeError, "got heads[]=True"),
    # dense_mask
    (lambda: sp.dense_mask("dense", 4, 4), TypeError, "expected a Pattern, got 'dense'"),
    (lambda: sp.dense_mask(sp.Dense(), 0, 4), ValueError,
     "expected q_len, kv_len >= 1, got 0, 4"),
    (lambda: sp.dense_mask(sp.Dense(), 1 << 15, 1 << 14), ValueError,
     "a 1x32768x16384 mask is too large to build (limit 268435456 elements)"),
    (lambda: sp.dense_mask(sp.Neighborhood(shape=(4, 4), window=3), 15, 16), ValueError,
     "the grid 4x4 holds 16 tokens, but the site has q_len=15, kv_len=16"),
    (lambda: sp.dense_mask(sp.BlockLayout(kind="explicit", block=4,
                                          layout=((1, 0), (1, 1))), 12, 12), ValueError,
     "layout is 2x2 blocks, but kv_len=12 with block=4 needs 3x3"),
    (lambda: sp.TopK(k=1).allowed(torch.arange(4), torch.arange(4), 4, 4), NotImplementedError,
     "TopK has no position-only mask"),
]


@pytest.mark.parametrize("make,exc,message", INVALID,
                         ids=[f"{n}-{c[2][:40]}" for n, c in enumerate(INVALID)])
def test_invalid_arguments(make, exc, message):
    with pytest.raises(exc, match=re.escape(message)) as info:
        make()
    assert type(info.value) is exc  # e.g. not a TypeError where a ValueError belongs


PATTERN_ERRORS = [
    ({"nope": {}}, ValueError, "unknown pattern 'nope'; expected one of dense, sliding"),
    ({"sliding": {"window": 4, "size": 3}}, ValueError,
     "sliding: unknown key(s) ['size']; allowed: causal, left, right, window"),
    ({"block_layout": {"kind": "fixed", "windows": 3}}, ValueError,  # spelled as in spec files
     "unknown key(s) ['windows']; allowed: block, causal, global_blocks, global_indices, kind, "
     "layout, local"),
    ({"sliding": 4}, TypeError, "sliding: expected a mapping of arguments, got 4"),
    ({"sliding": {"window": 4}, "global": {"first": 1}}, TypeError,
     "a mapping with exactly one key out of"),
    (["dense"], TypeError, "expected a pattern: 'dense' or a mapping"),
    ({"any_of": []}, TypeError, "any_of: expected a non-empty list of patterns, got []"),
    ({"any_of": {"patterns": ["dense"], "x": 1}}, ValueError, "any_of: unknown keys ['x']"),
    ({"heads": []}, TypeError, "heads: expected a list of {heads: ..., pattern: ...} entries"),
    ({"heads": [{"heads": 0}]}, TypeError,
     "heads: expected entries with keys 'heads' and 'pattern', got {'heads': 0}"),
    ({"neighborhood": {"shape": [8], "window": [3, 3]}}, TypeError, "got window=(3, 3)"),
    ({"global": {"first": "4"}}, TypeError, "expected first to be an integer, got first='4'"),
]


@pytest.mark.parametrize("tree,exc,message", PATTERN_ERRORS, ids=lambda x: str(x)[:40])
def test_pattern_from_dict_errors(tree, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        pattern_from_dict(tree)


@pytest.mark.parametrize("value", [np.int64(4), np.int32(4), sympy.Integer(4), torch.tensor(4)],
                         ids=lambda v: type(v).__name__)
def test_integer_like_values_become_plain_ints(value):
    """as_int accepts numpy/sympy integers and 0-d int tensors; the pattern keeps a plain int."""
    for make, name in ((lambda v: sp.Sliding(window=v), "window"),
                       (lambda v: sp.Strided(local=v, stride=v), "stride"),
                       (lambda v: sp.Blocked(block=v), "block"),
                       (lambda v: sp.Global(first=v, every=v), "every"),
                       (lambda v: sp.BlockLayout(block=v, seed=v), "seed"),
                       (lambda v: sp.TopK(k=v, block=v), "k"),
                       (lambda v: sp.Neighborhood(shape=(8, 8), window=v), "window")):
        p, plain = make(value), make(4)
        got = getattr(p, name)
        got = got[0] if isinstance(got, tuple) else got
        assert type(got) is int, f"{type(p).__name__}.{name} kept {type(got).__name__}"
        assert p == plain and p.key == plain.key and hash(p) == hash(plain)
        json.dumps(p.to_dict())


# ---------------------------------------------------------------------------------------------
# to_dict / pattern_from_dict round trip, through JSON and YAML

ROUND_TRIP = [
    sp.Dense(),
    sp.Sliding(window=4096, causal=True),
    sp.Sliding(left=512, right=256),
    sp.Sliding(right=3),
    sp.Neighborhood(shape=(16, 48, 80), window=(7, 17, 33), stride=(1, 4, 8)),
    sp.Neighborhood(shape=(9, 10), window=3, dilation=(3, 2), causal=(True, False)),
    sp.Neighborhood(shape=12, window=12, stride=4, causal=True),
    sp.Strided(local=256, stride=64),
    sp.Strided(stride=64, variant="fixed", summary=8, causal=False),
    sp.Blocked(block=1024),
    sp.Blocked(block=7, causal=True),
    sp.BlockLayout(kind="bigbird", block=64, local=3, global_blocks=1, random=1, seed=7),
    sp.BlockLayout(kind="longformer", block=32, local=5, global_indices=(0, 9)),
    sp.BlockLayout(kind="fixed", block=16, local=4, global_blocks=2, rows=True),
    sp.BlockLayout(kind="variable", block=16, local_windows=(2, 4), global_indices=(0,),
                   causal=True),
    sp.BlockLayout(kind="explicit", block=8, layout=((1, 0, 0), (1, 1, 0), (0, 1, 1))),
    sp.TopK(block=64, k=16, sink=1, local=2),
    sp.TopK(block=32, coverage=0.9, causal=True, share_gqa=True),
    sp.Global(first=4),
    sp.Global(every=64, indices=(3, 1, 3), rows=True, columns=False, causal=True),
    sp.AnyOf(sp.Sliding(window=1024, causal=True), sp.Global(first=4)),
    sp.AnyOf(sp.AnyOf(sp.Blocked(block=8), sp.Global(every=3), causal=True),
             sp.Strided(local=4, stride=8)),
    sp.AnyOf(sp.Neighborhood(shape=(4, 6), window=(3, 3)), sp.Global(first=1), causal=True),
    sp.PerHead({range(0, 4): sp.Dense(), range(4, 32): sp.Sliding(window=1024, causal=True)}),
    sp.PerHead([("0-1", sp.TopK(block=16, k=2)), ((2, 5), sp.Global(first=1)),
                (3, sp.AnyOf(sp.Blocked(block=4), sp.Global(every=5), causal=True)),
                ("4", sp.Dense()), ("6-", sp.Neighborhood(shape=(4, 4), window=3))]),
]


def _same(a, b):
    if isinstance(a, sp.PerHead):  # selectors come back as strings: compare what they mean
        return a.key == b.key and a.resolve(32) == b.resolve(32)
    return a == b and a.key == b.key and hash(a) == hash(b)


@pytest.mark.parametrize("pattern", ROUND_TRIP, ids=lambda p: p.key[:60])
def test_round_trip(pattern):
    tree = pattern.to_dict()
    back = pattern_from_dict(tree)
    assert type(back) is type(pattern) and _same(back, pattern), (tree, back)
    via_json = pattern_from_dict(json.loads(json.dumps(tree)))
    assert _same(via_json, pattern), json.dumps(tree)
    text = yaml.safe_dump(tree)
    via_yaml = pattern_from_dict(yaml.safe_load(text))
    assert _same(via_yaml, pattern), text
    assert pattern.key == json.dumps(tree, sort_keys=True, separators=(",", ":"))


def test_round_trip_covers_every_kind():
    kinds = {next(iter(p.to_dict())) if isinstance(p.to_dict(), dict) else p.to_dict()
             for p in ROUND_TRIP}
    assert kinds == set(PATTERNS), set(PATTERNS) ^ kinds


def test_to_dict_is_compact():
    assert sp.Dense().to_dict() == "dense"
    assert pattern_from_dict({"dense": None}) == pattern_from_dict({"dense": {}}) == sp.Dense()
    assert sp.Sliding(window=8, causal=True).to_dict() == {"sliding": {"window": 8,
                                                                       "causal": True}}
    assert sp.Neighborhood(shape=(4, 6), window=(3, 3)).to_dict() == {
        "neighborhood": {"shape": [4, 6], "window": 3}}
    assert sp.Neighborhood(shape=(8, 8), window=3, stride=(1, 3)).to_dict() == {
        "neighborhood": {"shape": [8, 8], "window": 3, "stride": [1, 3]}}
    assert sp.BlockLayout(kind="fixed", local=4).to_dict() == {
        "block_layout": {"kind": "fixed", "local": 4}}
    assert sp.Global(indices=[9, 2, 9]).to_dict() == {"global": {"indices": [2, 9]}}
    union = sp.Sliding(window=4, causal=True) | sp.Global(first=4)
    assert union.to_dict() == {"any_of": [{"sliding": {"window": 4, "causal": True}},
                                          {"global": {"first": 4}}]}
    assert sp.AnyOf(sp.Dense(), causal=True).to_dict() == {
        "any_of": {"patterns": ["dense"], "causal": True}}
    assert sp.PerHead({range(0, 4): sp.Dense(), range(4, 8, 2): sp.Dense()}).to_dict() == {
        "heads": [{"heads": "0-3", "pattern": "dense"}, {"heads": [4, 6], "pattern": "dense"}]}


def test_equal_patterns_have_equal_keys():
    assert sp.Neighborhood(shape=8, window=3) == sp.Neighborhood(shape=(8,), window=(3,))
    assert sp.Neighborhood(shape=8, window=3).key == sp.Neighborhood(shape=(8,), window=(3,)).key
    assert sp.Global(indices=[5, 1]).key == sp.Global(indices=(1, 5, 1)).key
    assert sp.Sliding(window=4).key != sp.Sliding(window=4, causal=True).key


# ---------------------------------------------------------------------------------------------
# PerHead


def test_perhead_resolve():
    a, b, c = sp.Dense(), sp.Sliding(window=8, causal=True), sp.Global(first=1)
    p = sp.PerHead({range(0, 2): a, "2-3": b, 4: c, (5, 7): a, "6": b, "8-": c})
    assert p.resolve(10) == (a, a, b, b, c, a, b, a, c, c)
    assert p.pattern_for_head(6, 10) is b
    assert parse_heads("4-", 7) == (4, 5, 6)
    assert parse_heads(" 2 - 4 ") == (2, 3, 4)
    assert parse_heads(range(1, 7, 2)) == (1, 3, 5)


@pytest.mark.parametrize("groups,num_heads,message", [
    ({"0-2": sp.Dense()}, 4, "heads [3] have no pattern (of 4 heads)"),
    ({0: sp.Dense(), 2: sp.Dense()}, 4, "heads [1, 3] have no pattern (of 4 heads)"),
    ({"0-2": sp.Dense(), "2-3": sp.Dense()}, 4, "head 2 is given more than one pattern"),
    ({"0-": sp.Dense(), 3: sp.Dense()}, 4, "head 3 is given more than one pattern"),
    ({"0-7": sp.Dense()}, 4, "head 4 given, but the site has 4 heads"),
    ({(0, 1, 1): sp.Dense()}, 2, "head 1 is given more than one pattern"),
])
def test_perhead_coverage_errors(groups, num_heads, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sp.PerHead(groups).resolve(num_heads)


def test_perhead_open_range_needs_num_heads():
    p = sp.PerHead({"0": sp.Dense(), "1-": sp.Blocked(block=2)})  # accepted without num_heads
    with pytest.raises(ValueError, match=re.escape("open range '1-' needs the number of heads")):
        parse_heads("1-")
    assert len(p.resolve(3)) == 3
    with pytest.raises(ValueError, match=re.escape("heads [0, 1] have no pattern")):
        sp.PerHead({"2-": sp.Dense()}).resolve(4)


# ---------------------------------------------------------------------------------------------
# Block layouts: structure of every kind, seeded random blocks


def blocks(p, n):
    return p.block_mask(n).int().tolist()


def test_bigbird_structure():
    # local 3 -> |r - c| <= 1; block 0 global row and column; no random blocks
    assert blocks(sp.BlockLayout(block=4), 6) == oracle.parse_picture("""
        111111
        111000
        111100
        101110
        100111
        100011""")
    # even local 4 -> |r - c| <= 2 (DeepSpeed: local // 2 on each side); 2 global blocks
    assert blocks(sp.BlockLayout(local=4, global_blocks=2), 7) == oracle.parse_picture("""
        1111111
        1111111
        1111100
        1111110
        1111111
        1101111
        1100111""")


def test_longformer_structure():
    p = sp.BlockLayout(kind="longformer", local=1, global_indices=(2, 4, 9))
    assert blocks(p, 6) == oracle.parse_picture("""
        101010
        011010
        111111
        001110
        111111
        001011""")


def test_fixed_structure_including_a_short_last_window():
    # windows of 4 blocks: [0-3] [4-7] [8-9]; the last block of each is a global column, also
    # in the short window (DeepSpeed FixedSparsityConfig: block 9)
    p = sp.BlockLayout(kind="fixed", local=4, global_blocks=1)
    assert blocks(p, 10) == oracle.parse_picture("""
        1111000101
        1111000101
        1111000101
        1111000101
        0001111101
        0001111101
        0001111101
        0001111101
        0001000111
        0001000111""")
    # rows=True: the global blocks also see everything; a 1-block last window is all global
    p = sp.BlockLayout(kind="fixed", local=3, global_blocks=2, rows=True)
    assert blocks(p, 7) == oracle.parse_picture("""
        1110111
        1111111
        1111111
        0111111
        1111111
        1111111
        1111111""")


def test_variable_structure():
    # windows of 1, 2, then 3 blocks (the last size repeats); block 0 a global column
    p = sp.BlockLayout(kind="variable", local_windows=(1, 2, 3), global_indices=(0,))
    assert blocks(p, 9) == oracle.parse_picture("""
        100000000
        111000000
        111000000
        100111000
        100111000
        100111000
        100000111
        100000111
        100000111""")


def test_explicit_layout_drives_tokens():
    p = sp.BlockLayout(kind="explicit", block=3, layout=((1, 0, 1), (0, 1, 0), (1, 1, 0)))
    assert blocks(p, 3) == [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    oracle.assert_same(sp.dense_mask(p, 8, 8), oracle.parse_picture("""
        11100011
        11100011
        11100011
        00011100
        00011100
        00011100
        11111100
        11111100"""), "explicit, last block short")
    # bottom-right: 4 queries at positions 4..7
    oracle.assert_same(sp.dense_mask(p, 4, 8), oracle.parse_picture("""
        00011100
        00011100
        11111100
        11111100"""), "explicit, decode rows")


def test_block_layout_causal_is_token_level():
    p = sp.BlockLayout(kind="explicit", block=2, layout=((1, 1), (1, 1)), causal=True)
    assert torch.equal(sp.dense_mask(p, 4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


BIGBIRD = dict(kind="bigbird", block=4, local=1, global_blocks=0, random=3)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_random_blocks_per_row(causal):
    p = sp.BlockLayout(**BIGBIRD, seed=11, causal=causal)
    rnd = p._random_blocks(16)
    limit = torch.arange(16) + 1 if causal else torch.full((16,), 16)
    assert torch.equal(rnd.sum(1), torch.minimum(limit, torch.tensor(3))), rnd.sum(1)
    if causal:
        assert not rnd.triu(1).any(), "causal random blocks must not be in the future"
    assert torch.equal(p.block_mask(16), rnd | torch.eye(16, dtype=torch.bool))


def test_bigbird_random_blocks_are_reproducible():
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a = sp.BlockLayout(**BIGBIRD, seed=5).block_mask(16)
    assert torch.equal(torch.rand(3), expected_next), "the global RNG must stay untouched"
    b = sp.BlockLayout(**BIGBIRD, seed=5).block_mask(16)
    assert torch.equal(a, b)
    assert torch.equal(sp.dense_mask(sp.BlockLayout(**BIGBIRD, seed=5), 64, 64),
                       sp.dense_mask(sp.BlockLayout(**BIGBIRD, seed=5), 64, 64))
    others = [sp.BlockLayout(**BIGBIRD, seed=s).block_mask(16) for s in (6, 7)]
    assert not any(torch.equal(a, o) for o in others), "the seed must matter"


def test_bigbird_random_blocks_same_in_a_fresh_process():
    """Every rank (a separate process, another hash seed) draws the same layout."""
    seeds = (5, 1234)
    code = ("import json, spcompile as sp\n"
            f"print(json.dumps([sp.BlockLayout(**{BIGBIRD!r}, seed=s).block_mask(16).int()"
            f".tolist() for s in {seeds!r}]))\n")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout)
    for seed, theirs in zip(seeds, there, strict=True):
        here = sp.BlockLayout(**BIGBIRD, seed=seed).block_mask(16).int().tolist()
        assert theirs == here, f"seed {seed}: the subprocess drew another layout"


# ---------------------------------------------------------------------------------------------
# allowed() itself


def test_allowed_broadcasts():
    p = sp.Sliding(window=3, causal=True)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    full = p.allowed(i, j, 6, 6)
    assert full.shape == (6, 6)
    assert torch.equal(p.allowed(torch.tensor(4), j, 6, 6), full[4:5])
    assert sp.Dense().allowed(i, j, 6, 9).shape == (6, 6)
    na = sp.Neighborhood(shape=(2, 3), window=(1, 3))
    assert torch.equal(na.allowed(torch.tensor([4]), torch.arange(6), 6, 6),
                       torch.tensor([False, False, False, True, True, True]))
