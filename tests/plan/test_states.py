"""Tile states and plans are sound against the exact mask, for every static pattern kind.

The oracle is ``dense_mask`` (itself checked against tests/oracle.py), reduced tile pair by tile
pair through the layouts' ``token_index``: a pair of tiles is truly EMPTY (no allowed pair),
FULL (every valid query sees every key slot, so no padding key) or PARTIAL. Seeded sweeps over
small odd sizes, q_len != kv_len both ways, random tiles, then per kind:

(a) every allowed (q, k) pair lies in a listed tile (FULL or PARTIAL), or, for a plan with a
    gather segment, its key is gathered; (c) is the same statement from the other side: the tiles
    a plan does not list (EMPTY) hold no allowed pair;
(b) no FULL tile holds a disallowed pair or a padding key;
(d) exactness where the structural rule claims it. The monotone-interval rules (Sliding,
    Blocked, Neighborhood 1-3-D incl. stride, dilation, causal) and Dense give exactly the states
    ``classify_by_mask`` gives, so no PARTIAL tile is visited in vain. Strided always takes the
    exact path. Global, BlockLayout and unions (AnyOf) promise soundness (a)-(c) only: a union
    of two partial members may truly be full, causal on top of a partial block may truly be
    empty; their exactness rate is not asserted.

``classify_by_mask`` (the exact slow path) must equal the oracle exactly for every kind.
"""

from __future__ import annotations

import random

import pytest
import torch

import spcompile as sp
from spcompile.plan.layout import TokenLayout
from spcompile.plan.states import EMPTY, FULL, PARTIAL, classify_by_mask, has_rule, tile_states
from spcompile.plan.tiles import build_plan, layouts_for

CASES = 30


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: on a loaded 2-core runner OpenMP's fork/join made each row reduction cost
    ~1 ms instead of 5 us (x.max(1) of a 20x16 tensor), doubling the sweeps' time. One thread
    while a test runs; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

NAMES = {EMPTY: "EMPTY", PARTIAL: "PARTIAL", FULL: "FULL"}

# ---------------------------------------------------------------------------------------------
# Random patterns: each maker returns (pattern, q_len, kv_len, q_tile, kv_tile)


def lengths(rng, hi=130):
    q_len = rng.randint(1, hi)
    r = rng.random()
    kv_len = q_len if r < 0.5 else rng.randint(1, hi)
    return q_len, kv_len


def tile_1d(rng):
    return (rng.choice([rng.randint(1, 12), rng.randint(1, 40), 16, 32, 64]),)


def sliding(rng):
    causal = rng.random() < 0.4
    form = rng.randrange(4)
    if form == 0:
        p = sp.Sliding(window=rng.randint(1, 48), causal=causal)
    elif form == 1 or causal:
        p = sp.Sliding(left=rng.randint(0, 40), causal=causal)
    elif form == 2:
        p = sp.Sliding(left=rng.randint(0, 40), right=rng.randint(0, 40))
    else:
        p = sp.Sliding(right=rng.randint(0, 30))
    return p


def blocked(rng):
    return sp.Blocked(block=rng.randint(1, 40), causal=rng.random() < 0.5)


def strided(rng):
    variant = rng.choice(["strided", "fixed"])
    stride = rng.randint(1, 24)
    return sp.Strided(local=rng.randint(0, 20), stride=stride, variant=variant,
                      summary=rng.randint(1, stride), causal=rng.random() < 0.6)


def global_(rng, n=130):
    first = rng.choice([0, 0, rng.randint(1, 6)])
    every = rng.choice([0, rng.randint(2, 9), rng.randint(8, 40)])
    indices = tuple(rng.sample(range(n), rng.randint(0, min(4, n))))
    if not (first or every or indices):
        first = 1
    columns, rows = rng.choice([(True, False), (True, False), (False, True), (True, True)])
    return sp.Global(first=first, every=every, indices=indices, columns=columns, rows=rows,
                     causal=rng.random() < 0.5)


def block_layout(rng, kv_len):
    block = rng.randint(1, 24)
    causal = rng.random() < 0.4
    kind = rng.choice(["bigbird", "longformer", "fixed", "variable", "explicit"])
    if kind == "bigbird":
        return sp.BlockLayout(kind="bigbird", block=block, local=rng.randint(0, 5),
                              global_blocks=rng.randint(0, 2), random=rng.randint(0, 3),
                              seed=rng.randint(0, 99), causal=causal)
    if kind == "longformer":
        return sp.BlockLayout(kind="longformer", block=block, local=rng.randint(0, 5),
                              global_blocks=rng.randint(0, 2),
                              global_indices=tuple(rng.sample(range(8), rng.randint(0, 2))),
                              causal=causal)
    if kind == "fixed":
        local = rng.randint(1, 4)
        return sp.BlockLayout(kind="fixed", block=block, local=local,
                              global_blocks=rng.randint(1, local), rows=rng.random() < 0.3,
                              causal=causal)
    if kind == "variable":
        return sp.BlockLayout(kind="variable", block=block,
                              local_windows=tuple(rng.randint(1, 4)
                                                  for _ in range(rng.randint(1, 3))),
                              global_indices=tuple(rng.sample(range(6), rng.randint(0, 2))),
                              rows=rng.random() < 0.3, causal=causal)
    n = -(-kv_len // block)
    density = rng.random()
    layout = tuple(tuple(int(rng.random() < density) for _ in range(n)) for _ in range(n))
    return sp.BlockLayout(kind="explicit", block=block, layout=layout, causal=causal)


def neighborhood(rng, ndim=None):
    ndim = ndim or rng.randint(1, 3)
    side = {1: 110, 2: 14, 3: 6}[ndim]
    shape, window, stride, dilation, causal = [], [], [], [], []
    for _ in range(ndim):
        n = rng.randint(1, side)
        d = rng.choice([1, 1, 1, 2, 3]) if n >= 2 else 1
        d = min(d, n)
        w = rng.randint(1, n // d)
        shape.append(n)
        dilation.append(d)
        window.append(w)
        stride.append(rng.choice([1, rng.randint(1, w), w]))
        causal.append(rng.random() < 0.3)
    return sp.Neighborhood(shape=tuple(shape), window=tuple(window), stride=tuple(stride),
                           dilation=tuple(dilation), causal=tuple(causal))


def nd_tile(rng, p):
    if len(p.shape) == 1:
        return tile_1d(rng)
    return tuple(rng.randint(1, min(8, -(-n // d) + 1))
                 for n, d in zip(p.shape, p.dilation, strict=True))


def make(kind, rng):
    """(pattern, q_len, kv_len, q_tile, kv_tile) of one random case of ``kind``."""
    if kind in ("neighborhood", "union_nd"):
        p = neighborhood(rng)
        if kind == "union_nd":
            members = [p]
            for _ in range(rng.randint(1, 2)):
                r = rng.random()
                if r < 0.5:
                    members.append(global_(rng, p.num_tokens))
                elif r < 0.8:
                    w = tuple(rng.randint(1, n // d) for n, d in zip(p.shape, p.dilation,
                                                                     strict=True))
                    members.append(sp.Neighborhood(shape=p.shape, window=w,
                                                   dilation=p.dilation,
                                                   causal=rng.random() < 0.3))
                else:
                    members.append(sp.Dense())
            p = sp.AnyOf(*members, causal=rng.random() < 0.4)
        n = p.num_tokens if isinstance(p, sp.Neighborhood) else p.patterns[0].num_tokens
        grid_p = p if isinstance(p, sp.Neighborhood) else p.patterns[0]
        return p, n, n, nd_tile(rng, grid_p), nd_tile(rng, grid_p)
    q_len, kv_len = lengths(rng)
    one_d = {
        "sliding": sliding,
        "blocked": blocked,
        "strided": strided,
        "global": lambda r: global_(r, kv_len),
        "block_layout": lambda r: block_layout(r, kv_len),
        "dense": lambda r: sp.Dense(),
    }
    if kind == "union":
        names = ["sliding", "blocked", "strided", "global", "global", "block_layout", "dense"]
        members = [one_d[rng.choice(names)](rng) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.2:  # a causal union nested in a union stays a member
            members[0] = sp.AnyOf(members[0], one_d["global"](rng), causal=True)
        p = sp.AnyOf(*members, causal=rng.random() < 0.4)
    else:
        p = one_d[kind](rng)
    return p, q_len, kv_len, tile_1d(rng), tile_1d(rng)


KINDS = ["sliding", "neighborhood", "strided", "blocked", "global", "block_layout", "union",
         "union_nd", "dense"]
#: Kinds whose structural states must equal the exact ones (see the module docstring).
EXACT = {"sliding", "neighborhood", "blocked", "dense", "strided"}


def cases(kind, seed, n=CASES):
    rng = random.Random(f"{kind}-{seed}")
    return [make(kind, rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The oracle: exact states from dense_mask


def true_states(mask: torch.Tensor, q: TokenLayout, kv: TokenLayout):
    """(states int8 [nq, nk], permuted mask Bool [nq, Tq, nk, Tk]) of ``mask`` [q_len, kv_len].

    Padding slots are False in the permuted mask; padding queries do not stop a tile from being
    full, padding keys do.
    """
    qi, kj = q.token_index(), kv.token_index()
    m = mask[qi.clamp_min(0)][:, kj.clamp_min(0)] & (qi >= 0)[:, None] & (kj >= 0)[None, :]
    m = m.view(q.num_tiles, q.tile_size, kv.num_tiles, kv.tile_size)
    q_pad = (qi < 0).view(q.num_tiles, q.tile_size, 1, 1)
    any_ = m.any(3).any(1)
    all_ = (m | q_pad).all(3).all(1)
    states = torch.where(any_, PARTIAL, EMPTY).to(torch.int8)
    states[any_ & all_] = FULL
    return states, m


def _example(m, qi, kj, qt, kt, want):
    """A (query, key) pair of tile pair (qt, kt) that is allowed (want=True) or not (False)."""
    q_ids = qi.view(m.shape[0], m.shape[1])[qt]
    k_ids = kj.view(m.shape[2], m.shape[3])[kt]
    block = m[qt, :, kt, :]
    for r, i in enumerate(q_ids.tolist()):
        if i < 0:
            continue
        for c, j in enumerate(k_ids.tolist()):
            if bool(block[r, c]) == want:
                return f"(q={i}, k={'pad' if j < 0 else j})"
    return "(none)"


def soundness_problems(states, mask, q: TokenLayout, kv: TokenLayout, exact: bool,
                       gathered_keys: torch.Tensor | None = None) -> list[str]:
    """Where ``states`` break (a)-(c), or differ from the exact states when ``exact``.

    ``gathered_keys`` (Bool [kv_len]) marks keys a gather segment visits for every query: their
    pairs need no listed tile.
    """
    want, m = true_states(mask, q, kv)
    qi, kj = q.token_index(), kv.token_index()
    out = []
    if gathered_keys is not None:
        covered = (kj >= 0) & gathered_keys[kj.clamp_min(0)]
        m_rest = m & ~covered.view(1, 1, kv.num_tiles, kv.tile_size)
        missed = (states == EMPTY) & m_rest.any(3).any(1)
    else:
        m_rest = m
        missed = (states == EMPTY) & (want != EMPTY)
    for qt, kt in missed.nonzero().tolist()[:4]:
        out.append(f"(a/c) tile ({qt}, {kt}) is EMPTY but allows "
                   f"{_example(m_rest, qi, kj, qt, kt, True)}")
    bad_full = (states == FULL) & (want != FULL)
    for qt, kt in bad_full.nonzero().tolist()[:4]:
        out.append(f"(b) tile ({qt}, {kt}) is FULL but disallows "
                   f"{_example(m, qi, kj, qt, kt, False)} (true state {NAMES[int(want[qt, kt])]})")
    if exact and not out:
        diff = states != want
        for qt, kt in diff.nonzero().tolist()[:4]:
            out.append(f"(d) tile ({qt}, {kt}) is {NAMES[int(states[qt, kt])]}, exactly "
                       f"{NAMES[int(want[qt, kt])]}")
        if bool(diff.any()):
            out.append(f"(d) {int(diff.sum())} of {diff.numel()} tile states are not exact")
    return out


def describe(p, q_len, kv_len, qt, kt):
    return f"{p!r} q_len={q_len} kv_len={kv_len} q_tile={qt} kv_tile={kt}"


# ---------------------------------------------------------------------------------------------
# Structural states (tile_states), per kind


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_structural_states_sound(kind, seed):
    failures = []
    for p, q_len, kv_len, qt, kt in cases(kind, seed):
        q, kv = layouts_for(p, q_len, kv_len, qt, kt)
        states = tile_states(p, q, kv, kv_len - q_len)
        assert states.dtype == torch.int8 and states.shape == (q.num_tiles, kv.num_tiles)
        problems = soundness_problems(states, sp.dense_mask(p, q_len, kv_len), q, kv,
                                      exact=kind in EXACT)
        if problems:
            failures.append(describe(p, q_len, kv_len, qt, kt) + "\n  " + "\n  ".join(problems))
    assert not failures, f"{len(failures)} of {CASES} {kind} cases:\n" + "\n".join(failures[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_classify_by_mask_is_exact(kind):
    failures = []
    for p, q_len, kv_len, qt, kt in cases(kind, 2, n=15):
        q, kv = layouts_for(p, q_len, kv_len, qt, kt)
        # A small chunk limit exercises the chunking over Q tiles too.
        states = classify_by_mask(p, q, kv, kv_len - q_len, max_elements=1 << 10)
        want, _ = true_states(sp.dense_mask(p, q_len, kv_len), q, kv)
        if not torch.equal(states, want):
            where = (states != want).nonzero()[:4].tolist()
            failures.append(f"{describe(p, q_len, kv_len, qt, kt)}: differs at tiles {where}")
    assert not failures, "\n".join(failures[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_has_rule(kind):
    """Structural rules everywhere except Strided (and unions holding one)."""
    for p, *_ in cases(kind, 0, n=10):
        members = p.patterns if isinstance(p, sp.AnyOf) else (p,)
        flat = []
        for m in members:
            flat.extend(m.patterns if isinstance(m, sp.AnyOf) else (m,))
        assert has_rule(p) is (not any(isinstance(m, sp.Strided) for m in flat)), p


@pytest.mark.parametrize(
    ("pattern", "q_len", "kv_len", "q_tile", "kv_tile"),
    [
        # Decode against a KV cache, and queries placed before key 0 (q_len > kv_len).
        (sp.Sliding(window=16, causal=True), 5, 131, (4,), (8,)),
        (sp.Sliding(left=3, right=2), 70, 20, (8,), (4,)),
        (sp.Blocked(block=7, causal=True), 60, 23, (5,), (3,)),
        (sp.Global(first=2, rows=True, causal=True), 40, 13, (4,), (4,)),
        (sp.BlockLayout(kind="bigbird", block=4, local=1, global_blocks=1), 30, 17,
         (3,), (4,)),
        (sp.BlockLayout(kind="fixed", block=3, local=2, global_blocks=1, causal=True),
         25, 11, (4,), (2,)),
        (sp.AnyOf(sp.Sliding(window=8, causal=True), sp.Global(first=4)), 90, 200, (16,), (16,)),
        # Dilated, strided, causal neighborhoods on odd grids.
        (sp.Neighborhood(shape=(17, 23), window=(5, 7), stride=(2, 3), dilation=(2, 3)), 391,
         391, (4, 2), (2, 4)),
        (sp.Neighborhood(shape=(5, 7, 3), window=(3, 3, 2), stride=(3, 1, 2),
                         causal=(True, False, True)), 105, 105, (2, 4, 2), (2, 2, 2)),
    ],
)
def test_named_cases(pattern, q_len, kv_len, q_tile, kv_tile):
    q, kv = layouts_for(pattern, q_len, kv_len, q_tile, kv_tile)
    states = tile_states(pattern, q, kv, kv_len - q_len)
    exact = not isinstance(pattern, (sp.Global, sp.BlockLayout, sp.AnyOf))
    problems = soundness_problems(states, sp.dense_mask(pattern, q_len, kv_len), q, kv, exact)
    assert not problems, "\n".join(problems)


def test_oracle_can_fail():
    """The checks catch a missed tile, a false FULL and an inexact PARTIAL."""
    p = sp.Sliding(window=9)
    q, kv = layouts_for(p, 40, 40, (8,), (8,))
    mask = sp.dense_mask(p, 40, 40)
    good = tile_states(p, q, kv, 0)
    assert not soundness_problems(good, mask, q, kv, exact=True)
    missed = good.clone()
    missed[0, 1] = EMPTY
    assert any(s.startswith("(a/c)") for s in soundness_problems(missed, mask, q, kv, True))
    false_full = good.clone()
    false_full[0, 1] = FULL
    assert any(s.startswith("(b)") for s in soundness_problems(false_full, mask, q, kv, True))
    wasted = good.clone()
    wasted[0, 4] = PARTIAL
    assert not soundness_problems(wasted, mask, q, kv, exact=False)
    assert any(s.startswith("(d)") for s in soundness_problems(wasted, mask, q, kv, True))


# ---------------------------------------------------------------------------------------------
# Whole plans (build_plan): the same soundness, with gather segments taken into account


def gather_problems(plan, q_len, kv_len) -> tuple[list[str], torch.Tensor | None]:
    """Check a plan's gather segment splits its union disjointly; return its gathered keys."""
    g = plan.gather
    if g is None:
        return [], None
    out = []
    tokens = g.tokens.long()
    valid = tokens[tokens >= 0]
    n_valid = valid.numel()
    if not (bool((tokens[:n_valid] >= 0).all()) and bool((tokens[n_valid:] == -1).all())):
        out.append("gather tokens: padding is not only at the end")
    if n_valid and not bool((valid[1:] > valid[:-1]).all()):
        out.append("gather tokens are not strictly ascending")
    if g.tokens.numel() != g.num_tiles * g.tile_size or g.tile_size != plan.kv_layout.tile_size:
        out.append(f"gather: {g.tokens.numel()} slots for {g.num_tiles} tiles of {g.tile_size}")
    if g.num_tiles != -(-n_valid // g.tile_size):
        out.append(f"gather: {g.num_tiles} tiles for {n_valid} keys")
    gathered = torch.zeros(kv_len, dtype=torch.bool)
    gathered[valid] = True
    # The union is the list pattern's mask plus the gathered keys' columns (causal if asked).
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    extra = gathered[None, :].expand(q_len, kv_len)
    if g.causal:
        extra = extra & (j <= i + kv_len - q_len)
    whole = sp.dense_mask(plan.pattern, q_len, kv_len)
    listed = sp.dense_mask(plan.list_pattern, q_len, kv_len)
    if not torch.equal(listed | extra, whole):
        where = (listed | extra != whole).nonzero()[:4].tolist()
        out.append(f"gather: list pattern + gathered keys != pattern at (q, k) {where}")
    return out, gathered


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_plan_sound(kind, seed):
    failures = []
    n_gather = 0
    for p, q_len, kv_len, qt, kt in cases(kind, seed + 10):
        plan = build_plan(p, q_len, kv_len, qt, kt)
        problems, gathered = gather_problems(plan, q_len, kv_len)
        n_gather += gathered is not None
        mask = sp.dense_mask(plan.list_pattern, q_len, kv_len)
        exact = kind in EXACT
        problems += soundness_problems(plan.states, mask, plan.q_layout, plan.kv_layout, exact,
                                       gathered)
        if plan.exact_by_mask == has_rule(plan.list_pattern):
            problems.append(f"exact_by_mask={plan.exact_by_mask} for {plan.list_pattern!r}")
        if problems:
            failures.append(describe(p, q_len, kv_len, qt, kt) + "\n  " + "\n  ".join(problems))
    assert not failures, f"{len(failures)} of {CASES} {kind} cases:\n" + "\n".join(failures[:3])
    if kind == "union":
        assert n_gather > 0, "no union case exercised a gather segment"


@pytest.mark.parametrize(
    "pattern",
    [
        sp.AnyOf(sp.Sliding(window=16, causal=True), sp.Global(every=8)),
        sp.AnyOf(sp.Sliding(window=16), sp.Global(every=8, causal=True), sp.Blocked(block=5)),
        sp.AnyOf(sp.Sliding(window=7), sp.Global(every=6, first=3), causal=True),
        sp.AnyOf(sp.Neighborhood(shape=(12, 10), window=3), sp.Global(every=9), causal=True),
    ],
)
def test_gather_plans_sound(pattern):
    n = 120
    plan = build_plan(pattern, n, n, (4, 4) if isinstance(pattern.patterns[0], sp.Neighborhood)
                      else (8,), (4, 4) if isinstance(pattern.patterns[0], sp.Neighborhood)
                      else (8,))
    assert plan.gather is not None
    problems, gathered = gather_problems(plan, n, n)
    problems += soundness_problems(plan.states, sp.dense_mask(plan.list_pattern, n, n),
                                   plan.q_layout, plan.kv_layout, False, gathered)
    assert not problems, "\n".join(problems)
