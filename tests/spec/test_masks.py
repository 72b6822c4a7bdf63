"""dense_mask against the independent oracle (tests/oracle.py), properties, and literal masks.

Three kinds of evidence that the masks follow DESIGN.md to the letter:

1. seeded sweeps: 200 random configurations per pattern kind (odd sizes, q_len != kv_len,
   per-axis flags), dense_mask == the per-element oracle written from DESIGN.md;
2. properties that hold whatever the implementation (row counts, symmetries, the special cases
   DESIGN.md names: s = 1 is standard NA, s = w is blocked, w = L is full);
3. small masks written out by hand, 1 = allowed.

Also here: PerHead masks (stacked per head) and TopK's block selection against a naive oracle.
"""

from __future__ import annotations

import math
import random

import oracle
import pytest
import torch

import spcompile as sp
from spcompile.spec.topk import select_blocks

CASES = 200


def check(pattern, q_len, kv_len, what=""):
    got = sp.dense_mask(pattern, q_len, kv_len)
    assert got.dtype == torch.bool and got.shape == (q_len, kv_len), (got.dtype, got.shape)
    oracle.assert_same(got, oracle.mask(pattern, q_len, kv_len),
                       f"{what}{pattern!r} q_len={q_len} kv_len={kv_len}")


def sweep(make, seed, cases=CASES):
    """Run `make(rng) -> (pattern, q_len, kv_len)` `cases` times; report every disagreement."""
    rng = random.Random(seed)
    failures = []
    for n in range(cases):
        pattern, q_len, kv_len = make(rng)
        got = sp.dense_mask(pattern, q_len, kv_len)
        msg = oracle.describe_diff(got, oracle.mask(pattern, q_len, kv_len),
                                   f"case {n}: {pattern!r} q_len={q_len} kv_len={kv_len}")
        if msg:
            failures.append(msg)
    assert not failures, f"{len(failures)} of {cases} cases differ; first ones:\n" + \
        "\n".join(failures[:3])


def lengths(rng, hi=40):
    q_len = rng.randint(1, hi)
    kv_len = q_len if rng.random() < 0.35 else rng.randint(1, hi)
    return q_len, kv_len


# ---------------------------------------------------------------------------------------------
# Random pattern makers


def make_neighborhood(rng, budget=150):
    ndim = rng.choice([1, 1, 2, 2, 3])
    caps = {1: 30, 2: 13, 3: 6}
    shape = []
    for _ in range(ndim):
        cap = max(1, min(caps[ndim], budget // max(1, math.prod(shape))))
        shape.append(rng.randint(1, cap))
    window, stride, dilation, causal = [], [], [], []
    for L in shape:
        d = rng.choice([1, 1, rng.randint(1, L)])
        w = rng.randint(1, L // d)
        s = rng.choice([1, w, rng.randint(1, w)])
        window.append(w)
        stride.append(s)
        dilation.append(d)
        causal.append(rng.random() < 0.3)
    pattern = sp.Neighborhood(shape=tuple(shape), window=tuple(window), stride=tuple(stride),
                              dilation=tuple(dilation), causal=tuple(causal))
    return pattern, pattern.num_tokens, pattern.num_tokens


def make_sliding(rng):
    causal = rng.random() < 0.5
    form = rng.choice(["window", "window", "left", "right", "both"])
    if form == "window":
        pattern = sp.Sliding(window=rng.randint(1, 12), causal=causal)
    elif form == "left":
        pattern = sp.Sliding(left=rng.randint(0, 10), causal=causal)
    elif form == "right":
        pattern = sp.Sliding(right=0 if causal else rng.randint(0, 10), causal=causal)
    else:
        pattern = sp.Sliding(left=rng.randint(0, 10),
                             right=0 if causal else rng.randint(0, 10), causal=causal)
    return (pattern, *lengths(rng))


def make_strided(rng):
    stride = rng.randint(1, 9)
    pattern = sp.Strided(local=rng.randint(0, 10), stride=stride,
                         variant=rng.choice(["strided", "fixed"]),
                         summary=rng.randint(1, stride), causal=rng.random() < 0.6)
    return (pattern, *lengths(rng))


def make_blocked(rng):
    return (sp.Blocked(block=rng.randint(1, 12), causal=rng.random() < 0.5), *lengths(rng))


def make_global(rng):
    kw = {}
    while not kw:
        if rng.random() < 0.5:
            kw["first"] = rng.randint(1, 5)
        if rng.random() < 0.4:
            kw["every"] = rng.randint(1, 9)
        if rng.random() < 0.4:
            kw["indices"] = rng.sample(range(45), rng.randint(1, 4))
    columns, rows = rng.choice([(True, False), (False, True), (True, True)])
    pattern = sp.Global(**kw, columns=columns, rows=rows, causal=rng.random() < 0.5)
    return (pattern, *lengths(rng))


def make_block_layout(rng):
    q_len, kv_len = lengths(rng)
    block = rng.randint(1, 6)
    n = -(-kv_len // block)
    kind = rng.choice(["bigbird", "longformer", "fixed", "variable", "explicit"])
    kw = dict(kind=kind, block=block, causal=rng.random() < 0.4)
    if kind in ("bigbird", "longformer"):
        kw.update(local=rng.randint(0, 5), global_blocks=rng.randint(0, 2))
        if kind == "longformer" and rng.random() < 0.6:
            kw["global_indices"] = tuple(rng.sample(range(n + 2), rng.randint(1, 3)))
    elif kind == "fixed":
        local = rng.randint(1, 5)
        kw.update(local=local, global_blocks=rng.randint(1, local), rows=rng.random() < 0.4)
    elif kind == "variable":
        kw.update(local_windows=tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3))),
                  global_indices=tuple(rng.sample(range(n + 2), rng.randint(0, 2))),
                  rows=rng.random() < 0.4)
    else:
        kw["layout"] = tuple(tuple(int(rng.random() < 0.4) for _ in range(n)) for _ in range(n))
    return sp.BlockLayout(**kw), q_len, kv_len


ONE_D = [make_sliding, make_strided, make_blocked, make_global, make_block_layout]


def make_union(rng):
    q_len, kv_len = lengths(rng)
    members = []
    for _ in range(rng.randint(2, 3)):
        member = rng.choice(ONE_D)(rng)[0]
        if isinstance(member, sp.BlockLayout):  # sized to this kv_len
            member = sp.Blocked(block=rng.randint(1, 8))
        members.append(member)
    if rng.random() < 0.3:  # a causal union nested in a union: not flattened
        members[:2] = [sp.AnyOf(*members[:2], causal=True)]
    return sp.AnyOf(*members, causal=rng.random() < 0.4), q_len, kv_len


# ---------------------------------------------------------------------------------------------
# 1. Seeded sweeps: dense_mask == oracle


@pytest.mark.parametrize("make", [make_neighborhood, *ONE_D, make_union],
                         ids=lambda f: f.__name__.removeprefix("make_"))
def test_sweep_matches_oracle(make):
    sweep(make, seed=sum(map(ord, make.__name__)))  # stable across runs and processes


@pytest.mark.parametrize("pattern", [
    sp.Neighborhood(shape=(17, 23), window=(5, 7), stride=(2, 3), dilation=(2, 1)),
    sp.Neighborhood(shape=(17, 23), window=(4, 6), stride=(4, 5), dilation=(1, 3),
                    causal=(True, False)),
    sp.Neighborhood(shape=(5, 7, 3), window=(3, 3, 2), stride=(1, 2, 2), dilation=(1, 2, 1),
                    causal=(True, False, False)),
    sp.Neighborhood(shape=(5, 7, 3), window=(2, 7, 3), stride=(2, 1, 3), causal=(False, True,
                                                                                   True)),
    sp.Neighborhood(shape=(31,), window=6, stride=4, dilation=5),
], ids=repr)
def test_odd_grids_match_oracle(pattern):
    check(pattern, pattern.num_tokens, pattern.num_tokens)


def test_union_with_grid_pattern_matches_oracle():
    na = sp.Neighborhood(shape=(6, 7), window=(3, 3), stride=(1, 2))
    union = sp.AnyOf(na, sp.Global(first=2), sp.Strided(stride=5, local=2, causal=False),
                     causal=True)
    check(union, 42, 42)


def test_oracle_can_fail():
    """The comparison detects a one-entry difference and says where."""
    want = oracle.mask(sp.Sliding(window=3, causal=True), 6, 6)
    got = sp.dense_mask(sp.Sliding(window=3, causal=True), 6, 6).clone()
    got[4, 0] = True
    msg = oracle.describe_diff(got, want, "sliding")
    assert "1 of 36 entries differ" in msg and "i=4 j=0: got 1, want 0" in msg, msg


# ---------------------------------------------------------------------------------------------
# 2. Properties


def test_na_noncausal_every_query_sees_prod_window_keys():
    rng = random.Random(11)
    for _ in range(CASES):
        pattern, n, _ = make_neighborhood(rng)
        if any(pattern.causal):
            pattern = sp.Neighborhood(shape=pattern.shape, window=pattern.window,
                                      stride=pattern.stride, dilation=pattern.dilation)
        counts = sp.dense_mask(pattern, n, n).sum(1)
        want = math.prod(pattern.window)
        bad = (counts != want).nonzero().flatten().tolist()
        assert not bad, f"{pattern!r}: queries {bad[:8]} see {counts[bad[:8]].tolist()} keys, " \
                        f"want {want}"


@pytest.mark.parametrize("L,w,d", [(9, 3, 1), (16, 4, 2), (17, 5, 3), (7, 7, 1), (12, 1, 4)])
def test_na_causal_1d_row_counts(L, w, d):
    # stride 1: query i sees the min(w, i_g + 1) latest keys of its dilation group, i_g = i // d
    counts = sp.dense_mask(sp.Neighborhood(shape=L, window=w, dilation=d, causal=True), L, L)
    want = torch.tensor([min(w, i // d + 1) for i in range(L)])
    assert torch.equal(counts.sum(1), want), (counts.sum(1).tolist(), want.tolist())


def test_na_causal_with_stride_row_counts():
    # leader = last query of the stride group; keys j <= i with j > leader - w
    L, w, s = 13, 5, 3
    counts = sp.dense_mask(sp.Neighborhood(shape=L, window=w, stride=s, causal=True), L, L)
    want = []
    for i in range(L):
        leader = min(i // s * s + s - 1, L - 1)
        want.append(i - max(0, leader - w + 1) + 1)
    assert counts.sum(1).tolist() == want


def test_na_mirror_symmetry_odd_window():
    # Odd windows and odd strides that tile the group are symmetric under reversing every axis.
    for shape, w, s, d in [((11,), 5, 1, 1), ((15,), 3, 3, 1), ((12,), 3, 1, 2),
                           ((9, 10), (3, 5), (3, 1), (1, 2)), ((5, 6, 3), (3, 3, 1), 1, (1, 2, 3))]:
        p = sp.Neighborhood(shape=shape, window=w, stride=s, dilation=d)
        m = sp.dense_mask(p, p.num_tokens, p.num_tokens)
        oracle.assert_same(m.flip(0, 1), m, f"mirror of {p!r}")
    # ... and an even window is not (more keys on the left: wl = w // 2, wr = w // 2 - 1)
    m = sp.dense_mask(sp.Neighborhood(shape=8, window=4), 8, 8)
    assert not torch.equal(m.flip(0, 1), m)


def test_na_transposed_grid_is_the_transposed_pattern():
    X, Y = 7, 5
    a = sp.Neighborhood(shape=(X, Y), window=(4, 3), stride=(2, 1), dilation=(1, 1),
                        causal=(True, False))
    b = sp.Neighborhood(shape=(Y, X), window=(3, 4), stride=(1, 2), causal=(False, True))
    perm = torch.tensor([y * X + x for x in range(X) for y in range(Y)])  # (x, y) -> b's index
    ma, mb = sp.dense_mask(a, X * Y, X * Y), sp.dense_mask(b, X * Y, X * Y)
    oracle.assert_same(mb[perm][:, perm], ma, "transposed grid")


@pytest.mark.parametrize("L,w,d", [(9, 3, 1), (10, 4, 1), (13, 5, 2), (21, 7, 3), (6, 1, 1)])
def test_na_stride_one_is_standard_na(L, w, d):
    """s = 1 is NATTEN's original neighborhood attention (cross-check with the old formula)."""
    m = sp.dense_mask(sp.Neighborhood(shape=L, window=w, dilation=d), L, L)
    if w % 2:
        legacy = [[int(oracle.na_axis_legacy(i, j, L, w, d)) for j in range(L)] for i in range(L)]
        oracle.assert_same(m, legacy, "legacy NATTEN start formula")
    # interior queries: the window is centred, wl = w // 2 keys left, w - 1 - wl right
    wl, wr = w // 2, w - 1 - w // 2
    for i in range(wl * d, L - wr * d):
        keys = m[i].nonzero().flatten().tolist()
        assert keys == list(range(i - wl * d, i + wr * d + 1, d)), (i, keys)


@pytest.mark.parametrize("L,w", [(12, 3), (12, 4), (15, 5), (8, 8), (7, 1)])
def test_na_stride_equals_window_is_blocked(L, w):
    na = sp.Neighborhood(shape=L, window=w, stride=w)
    oracle.assert_same(sp.dense_mask(na, L, L), sp.dense_mask(sp.Blocked(block=w), L, L),
                       "s = w non-causal")
    na_c = sp.Neighborhood(shape=L, window=w, stride=w, causal=True)
    oracle.assert_same(sp.dense_mask(na_c, L, L),
                       sp.dense_mask(sp.Blocked(block=w, causal=True), L, L), "s = w causal")


def test_na_stride_equals_window_2d_is_tiles():
    X, Y, a, b = 6, 9, 2, 3
    m = sp.dense_mask(sp.Neighborhood(shape=(X, Y), window=(a, b), stride=(a, b)), X * Y, X * Y)
    want = [[int(qi // Y // a == kj // Y // a and qi % Y // b == kj % Y // b)
             for kj in range(X * Y)] for qi in range(X * Y)]
    oracle.assert_same(m, want, "2-D s = w")


def test_na_full_window_is_full_attention():
    p = sp.Neighborhood(shape=(5, 7, 3), window=(5, 7, 3))
    assert sp.dense_mask(p, 105, 105).all()
    p = sp.Neighborhood(shape=(5, 7), window=(5, 7), stride=(2, 7))  # stride changes nothing
    assert sp.dense_mask(p, 35, 35).all()
    # causal on the first axis only: frame-causal video attention
    p = sp.Neighborhood(shape=(4, 6), window=(4, 6), causal=(True, False))
    m = sp.dense_mask(p, 24, 24)
    want = [[int(kj // 6 <= qi // 6) for kj in range(24)] for qi in range(24)]
    oracle.assert_same(m, want, "frame-causal full window")


def test_na_causal_equals_causal_sliding_1d():
    for L, w in [(10, 3), (9, 9), (5, 1)]:
        oracle.assert_same(sp.dense_mask(sp.Neighborhood(shape=L, window=w, causal=True), L, L),
                           sp.dense_mask(sp.Sliding(window=w, causal=True), L, L), f"L={L} w={w}")


def test_sliding_truncates_where_na_shifts():
    """FlashAttention truncates the window at the ends; NATTEN shifts it (same interior)."""
    L, W = 12, 5
    sl = sp.dense_mask(sp.Sliding(window=W), L, L)
    na = sp.dense_mask(sp.Neighborhood(shape=L, window=W), L, L)
    assert torch.equal(sl[2:10], na[2:10])
    assert sl.sum(1).tolist() == [3, 4, 5, 5, 5, 5, 5, 5, 5, 5, 4, 3]
    assert (na.sum(1) == W).all()


@pytest.mark.parametrize("q_len,kv_len", [(20, 20), (7, 20), (1, 20), (20, 7)])
@pytest.mark.parametrize("W", [1, 4, 9, 30])
def test_sliding_causal_window_counts(W, q_len, kv_len):
    # Sliding(window=W, causal=True): query at position p sees min(W, p + 1) keys (0 if p < 0)
    counts = sp.dense_mask(sp.Sliding(window=W, causal=True), q_len, kv_len).sum(1).tolist()
    want = [max(0, min(W, i + kv_len - q_len + 1)) for i in range(q_len)]
    assert counts == want


def test_sliding_decode_sees_last_keys():
    m = sp.dense_mask(sp.Sliding(window=4, causal=True), 1, 10)
    assert m[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    m = sp.dense_mask(sp.Sliding(left=2, right=3), 2, 10)
    assert m[1].nonzero().flatten().tolist() == [7, 8, 9]  # position 9, right side truncated


def test_sliding_window_split_and_symmetry():
    # window W without causal: W // 2 keys left, W - 1 - W // 2 right (NATTEN's split)
    for W in (1, 2, 5, 6):
        m = sp.dense_mask(sp.Sliding(window=W), 30, 30)
        left, right = W // 2, W - 1 - W // 2
        assert m[15].nonzero().flatten().tolist() == list(range(15 - left, 16 + right)), W
    m = sp.dense_mask(sp.Sliding(left=3, right=3), 17, 17)
    assert torch.equal(m, m.T)
    m = sp.dense_mask(sp.Sliding(left=3, right=2), 17, 17)
    assert not torch.equal(m, m.T)


def test_symmetric_patterns():
    for p in (sp.Blocked(block=5), sp.Strided(local=3, stride=4, causal=False),
              sp.Global(first=2, every=7, rows=True), sp.Neighborhood(shape=13, window=13)):
        m = sp.dense_mask(p, 13, 13)
        oracle.assert_same(m, m.T, f"symmetry of {p!r}")
    rows = sp.dense_mask(sp.Global(indices=[3, 8], rows=True, columns=False), 11, 11)
    cols = sp.dense_mask(sp.Global(indices=[3, 8]), 11, 11)
    assert torch.equal(rows, cols.T)


def test_causal_is_noncausal_and_lower_triangle():
    tril = torch.ones(14, 19, dtype=torch.bool).tril(19 - 14)  # bottom-right aligned
    for make in (lambda c: sp.Strided(local=3, stride=4, causal=c),
                 lambda c: sp.Strided(stride=4, summary=2, variant="fixed", causal=c),
                 lambda c: sp.Blocked(block=4, causal=c),
                 lambda c: sp.Global(every=3, rows=True, causal=c),
                 lambda c: sp.AnyOf(sp.Sliding(left=2, right=2), sp.Global(first=1), causal=c)):
        causal, free = sp.dense_mask(make(True), 14, 19), sp.dense_mask(make(False), 14, 19)
        oracle.assert_same(causal, free & tril, repr(make(True)))


def test_union_is_elementwise_or():
    a, b, c = sp.Sliding(window=3, causal=True), sp.Global(first=2), sp.Blocked(block=6)
    ma, mb, mc = (sp.dense_mask(p, 15, 20) for p in (a, b, c))
    assert torch.equal(sp.dense_mask(a | b | c, 15, 20), ma | mb | mc)
    assert (a | b | c).patterns == (a, b, c)  # nested non-causal unions flatten
    nested = sp.AnyOf(sp.AnyOf(a, c, causal=True), b)
    assert len(nested.patterns) == 2
    tril = torch.ones(15, 20, dtype=torch.bool).tril(5)
    assert torch.equal(sp.dense_mask(nested, 15, 20), ((ma | mc) & tril) | mb)


def test_streaming_llm_sink_plus_window():
    m = sp.dense_mask(sp.Sliding(window=3, causal=True) | sp.Global(first=2), 8, 8)
    for i in range(8):
        want = sorted({0, 1} | set(range(max(0, i - 2), i + 1)))
        # a sink is a column every query sees, even a query before it (non-causal Global)
        assert m[i].nonzero().flatten().tolist() == want, i


# ---------------------------------------------------------------------------------------------
# 3. Literal masks


def literal(pattern, text, q_len=None, kv_len=None):
    want = oracle.parse_picture(text)
    q_len, kv_len = q_len or len(want), kv_len or len(want[0])
    oracle.assert_same(sp.dense_mask(pattern, q_len, kv_len), want, repr(pattern))
    oracle.assert_same(oracle.mask(pattern, q_len, kv_len), want, f"oracle {pattern!r}")


def test_literal_na_window3_length8():
    literal(sp.Neighborhood(shape=8, window=3), """
        11100000
        11100000
        01110000
        00111000
        00011100
        00001110
        00000111
        00000111""")


def test_literal_na_window4_stride2():
    # wl = 2, wr = 1; leaders 1, 3, 5, 7 -> centres clamp(leader, 2, 6) = 2, 3, 5, 6
    literal(sp.Neighborhood(shape=8, window=4, stride=2), """
        11110000
        11110000
        01111000
        01111000
        00011110
        00011110
        00001111
        00001111""")


def test_literal_na_causal():
    literal(sp.Neighborhood(shape=6, window=3, causal=True), """
        100000
        110000
        111000
        011100
        001110
        000111""")
    # stride 2: leaders 1, 3, 5 (last of each pair); keys j <= i and leader - j < 3
    literal(sp.Neighborhood(shape=6, window=3, stride=2, causal=True), """
        100000
        110000
        011000
        011100
        000110
        000111""")


def test_literal_na_dilation2():
    literal(sp.Neighborhood(shape=8, window=3, dilation=2), """
        10101000
        01010100
        10101000
        01010100
        00101010
        00010101
        00101010
        00010101""")
    # odd length: the even group has L_g = 4, the odd group L_g = 3 (all of it)
    literal(sp.Neighborhood(shape=7, window=3, dilation=2), """
        1010100
        0101010
        1010100
        0101010
        0010101
        0101010
        0010101""")


def test_literal_na_2d():
    # 3x4 grid, window (1, 3): each token sees its row neighbours only (columns clamp)
    literal(sp.Neighborhood(shape=(3, 4), window=(1, 3)), """
        111000000000
        111000000000
        011100000000
        011100000000
        000011100000
        000011100000
        000001110000
        000001110000
        000000001110
        000000001110
        000000000111
        000000000111""")


def test_literal_strided():
    # causal, local 2, stride 3: d = i - j in {0, 1} or d % 3 == 0
    literal(sp.Strided(local=2, stride=3), """
        10000000
        11000000
        01100000
        10110000
        01011000
        00101100
        10010110
        01001011""")


def test_literal_fixed():
    literal(sp.Strided(stride=4, variant="fixed"), """
        10000000
        11000000
        11100000
        11110000
        00011000
        00011100
        00011110
        00011111""")
    literal(sp.Strided(stride=4, variant="fixed", summary=2, causal=False), """
        11110011
        11110011
        11110011
        11110011
        00111111
        00111111
        00111111
        00111111""")


def test_literal_global_rows():
    literal(sp.Global(indices=[2], rows=True), """
        001000
        001000
        111111
        001000
        001000
        001000""")
    # G = {0, 3, 6} (first=1, every=3), causal
    literal(sp.Global(first=1, every=3, rows=True, causal=True), """
        1000000
        1000000
        1000000
        1111000
        1001000
        1001000
        1111111""")
    # 4 queries, 5 keys: bottom-right alignment puts query i at position i + 1, so only
    # query 0 (position 1) is a global row
    literal(sp.Global(first=2, rows=True, columns=False), """
        11111
        00000
        00000
        00000""")


def test_literal_sliding_bottom_right():
    literal(sp.Sliding(left=2, right=1), """
        0111100
        0011110
        0001111
        0000111""")
    # more queries than keys: the first rows sit before key 0 and see nothing
    literal(sp.Sliding(window=3, causal=True), """
        000
        000
        100
        110
        111""")


def test_literal_bigbird_seeded():
    # block 2, 6 blocks: local 3 (|r - c| <= 1), block 0 global (row and column), 1 random
    # block per row from seed 0. The random blocks are pinned here on purpose: a change in the
    # draw changes every saved BigBird layout.
    p = sp.BlockLayout(kind="bigbird", block=2, local=3, global_blocks=1, random=1, seed=0)
    static = oracle.parse_picture("""
        111111
        111000
        111100
        101110
        100111
        100011""")
    blocks = p.block_mask(6).int().tolist()
    extra = [[b - s for b, s in zip(br, sr, strict=True)] for br, sr in zip(blocks, static,
                                                                           strict=True)]
    assert all(x in (0, 1) for row in extra for x in row), f"static part missing:\n{blocks}"
    assert blocks == oracle.parse_picture(BIGBIRD_SEED0), f"random draw changed: {blocks}"
    want = [[blocks[i // 2][j // 2] for j in range(12)] for i in range(12)]
    oracle.assert_same(sp.dense_mask(p, 12, 12), want, "bigbird tokens")


BIGBIRD_SEED0 = """
    111111
    111100
    111101
    101110
    101111
    100011"""


# ---------------------------------------------------------------------------------------------
# PerHead through dense_mask


def test_perhead_dense_mask_stacks_members():
    a, b = sp.Dense(), sp.Sliding(window=3, causal=True)
    c = sp.Neighborhood(shape=(3, 4), window=(3, 3), causal=(True, False))
    p = sp.PerHead({range(0, 2): a, "2": b, "3-": c})
    m = sp.dense_mask(p, 12, 12, num_heads=5)
    assert m.shape == (5, 12, 12)
    for h, member in enumerate((a, a, b, c, c)):
        oracle.assert_same(m[h], oracle.mask(member, 12, 12), f"head {h}")
    with pytest.raises(ValueError, match="PerHead pattern needs num_heads"):
        sp.dense_mask(p, 12, 12)
    with pytest.raises(ValueError, match=r"heads \[1\] have no pattern \(of 2 heads\)"):
        sp.dense_mask(sp.PerHead({0: a}), 12, 12, num_heads=2)


# ---------------------------------------------------------------------------------------------
# 5. TopK: select_blocks


def topk_inputs(seed, b=1, h=4, h_kv=2, s=37, d=8, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) * magnitude
    k = torch.randn(b, h_kv, s, d, generator=gen, dtype=torch.float64) * magnitude
    return q, k


def test_topk_matches_naive_oracle():
    rng = random.Random(5)
    failures = []
    for n in range(40):
        h_kv = rng.choice([1, 2])
        h = h_kv * rng.choice([1, 2])
        s, block = rng.randint(3, 40), rng.randint(2, 8)
        kw = dict(block=block, sink=rng.randint(0, 2), local=rng.randint(0, 3),
                  causal=rng.random() < 0.5, share_gqa=rng.random() < 0.5)
        if rng.random() < 0.5:
            kw["k"] = rng.randint(0, 4)
        else:
            kw["coverage"] = rng.choice([0.3, 0.5, 0.8, 0.95, 1.0])
        p = sp.TopK(**kw)
        q, k = topk_inputs(n, b=rng.randint(1, 2), h=h, h_kv=h_kv, s=s, d=rng.choice([4, 8]),
                           magnitude=rng.choice([0.5, 1.0, 3.0]))
        got = select_blocks(p, q, k).int().tolist()
        want = oracle.select_blocks(p, q, k)
        if got != want:
            failures.append(f"case {n}: {p!r} s={s} h={h} h_kv={h_kv}\n got {got}\nwant {want}")
    assert not failures, f"{len(failures)} of 40 differ:\n" + "\n".join(failures[:2])


@pytest.mark.parametrize("causal", [False, True])
def test_topk_k_covering_every_block_is_dense(causal):
    q, k = topk_inputs(0, s=45)
    p = sp.TopK(block=8, k=6, sink=0, local=0, causal=causal)  # 6 blocks
    m = sp.dense_mask(p, 45, 45, q=q, k=k)
    assert m.shape == (1, 4, 45, 45)
    want = torch.ones(45, 45, dtype=torch.bool)
    want = want.tril() if causal else want
    assert torch.equal(m, want.expand_as(m)), (~m).sum()
    assert torch.equal(sp.reference_attention(q, k, k, p), sp.reference_attention(
        q, k, k, sp.Sliding(window=45, causal=True) if causal else sp.Dense()))


def test_topk_sink_and_local_always_kept():
    q, k = topk_inputs(1, s=64)
    u = torch.zeros(8, dtype=torch.float64)
    u[0] = 1.0
    q += 5 * u
    k[:, :, :16] -= 10 * u  # blocks 0, 1 score lowest for every query block
    free = select_blocks(sp.TopK(block=8, k=1, sink=0, local=0), q, k)
    assert not free[..., :2].any(), "blocks 0, 1 must lose on score alone"
    for causal in (False, True):
        p = sp.TopK(block=8, k=1, sink=2, local=2, causal=causal)
        blocks = select_blocks(p, q, k)
        r = torch.arange(8)[:, None]
        c = torch.arange(8)[None, :]
        forced = ((c < 2) | ((c <= r) & (c > r - 2))) & ((c <= r) | (not causal))
        assert (blocks | ~forced).all(), "a forced block was dropped"
        # k counts blocks beyond the forced ones
        eligible = (c <= r) if causal else torch.ones(8, 8, dtype=torch.bool)
        want = torch.minimum(forced.sum(1) + 1, eligible.sum(1))
        assert torch.equal(blocks.sum(-1), want.expand(1, 4, 8)), blocks.sum(-1)


def test_topk_k_zero_keeps_only_forced_blocks():
    q, k = topk_inputs(2, s=40)
    blocks = select_blocks(sp.TopK(block=8, k=0, sink=1, local=1), q, k)
    want = torch.eye(5, dtype=torch.bool)
    want[:, 0] = True
    assert torch.equal(blocks, want.expand_as(blocks))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 30.0])
def test_topk_full_coverage_keeps_every_eligible_block(causal, magnitude):
    # magnitude 30 makes most probabilities ~1e-30 or underflow to 0: coverage 1.0 still means
    # "all of the mass", i.e. every eligible block.
    q, k = topk_inputs(3, s=50, magnitude=magnitude)
    blocks = select_blocks(sp.TopK(block=5, coverage=1.0, local=0, causal=causal), q, k)
    eligible = torch.ones(10, 10, dtype=torch.bool)
    eligible = eligible.tril() if causal else eligible
    assert torch.equal(blocks, eligible.expand_as(blocks)), (blocks != eligible).sum()


def test_topk_coverage_is_smallest_set_reaching_mass():
    q, k = topk_inputs(4, s=48, magnitude=2.0)
    p = sp.TopK(block=4, coverage=0.7, local=0, sink=0)
    blocks = select_blocks(p, q, k)
    qp = q.view(1, 4, 12, 4, 8).mean(3)
    kp = k.view(1, 2, 12, 4, 8).mean(3).repeat_interleave(2, 1)
    probs = (qp @ kp.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    kept = (probs * blocks).sum(-1)
    assert (kept >= 0.7).all(), kept.min()
    # dropping the least probable kept block falls short of the coverage
    least = probs.masked_fill(~blocks, 2.0).min(-1).values
    assert (kept - least < 0.7).all(), (kept - least).max()


@pytest.mark.parametrize("coverage,n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)])
def test_topk_coverage_stops_when_the_mass_is_reached_exactly(coverage, n_kept):
    # identical key blocks: every probability is exactly 1/4, so sums are exact in binary
    q, k = topk_inputs(8, h=2, h_kv=1, s=32)
    k = k[:, :, :8].repeat(1, 1, 4, 1)
    blocks = select_blocks(sp.TopK(block=8, coverage=coverage, local=0), q, k)
    assert (blocks.sum(-1) == n_kept).all(), blocks.sum(-1)
    assert blocks[..., :n_kept].all(), "equal scores: ties go to the lower index"


def test_topk_causal_never_selects_future_blocks():
    for seed in range(3):
        q, k = topk_inputs(seed, s=61)
        for kw in (dict(k=3), dict(coverage=0.9)):
            blocks = select_blocks(sp.TopK(block=6, sink=1, local=2, causal=True, **kw), q, k)
            future = torch.ones(11, 11, dtype=torch.bool).triu(1)
            assert not (blocks & future).any(), (blocks & future).nonzero()[:5]
            m = sp.dense_mask(sp.TopK(block=6, causal=True, **kw), 61, 61, q=q, k=k)
            assert not (m & torch.ones(61, 61, dtype=torch.bool).triu(1)).any()


def test_topk_share_gqa_identical_within_group():
    q, k = topk_inputs(6, h=8, h_kv=2, s=80, magnitude=2.0)
    for kw in (dict(k=2), dict(coverage=0.6)):
        shared = select_blocks(sp.TopK(block=8, share_gqa=True, local=1, **kw), q, k)
        groups = shared.view(1, 2, 4, 10, 10)
        assert (groups == groups[:, :, :1]).all()
        own = select_blocks(sp.TopK(block=8, local=1, **kw), q, k).view(1, 2, 4, 10, 10)
        assert not (own == own[:, :, :1]).all(), "heads of a group differ without share_gqa"


def test_topk_dense_mask_expands_blocks():
    q, k = topk_inputs(7, b=2, s=30)
    p = sp.TopK(block=7, k=1, sink=1, local=1)
    blocks = select_blocks(p, q, k)
    m = sp.dense_mask(p, 30, 30, q=q, k=k)
    i = torch.arange(30)
    assert torch.equal(m, blocks[:, :, i[:, None] // 7, i[None, :] // 7])
    with pytest.raises(ValueError, match="TopK is data-dependent; pass q and k"):
        sp.dense_mask(p, 30, 30)
    with pytest.raises(NotImplementedError, match="q_len != kv_len"):
        select_blocks(p, q, k[:, :, :20])
