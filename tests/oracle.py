"""An independent, deliberately naive oracle for every static pattern's mask.

Written straight from DESIGN.md ("Patterns and their exact semantics") and, for block layouts,
from DeepSpeed's SparsityConfig classes: one query/key pair at a time, plain Python ints, no
torch, nothing shared with ``spcompile.spec.patterns`` except reading a pattern's public fields.
Slow on purpose; the tests keep sizes small.

Conventions it pins down (each one is also a test):

- 1-D patterns align bottom-right when q_len != kv_len: query i sits at position
  p = i + kv_len - q_len (FlashAttention's decode / KV-cache convention). Positions p < 0 are
  virtual: they are never "tokens" (not global rows, no block-layout row), but window and causal
  arithmetic still applies to them.
- Sliding ``window=W`` without causal splits like NATTEN: left = W // 2, right = W - 1 - W // 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import spcompile.spec.patterns as P

Matrix = list[list[int]]


# ---------------------------------------------------------------------------------------------
# Neighborhood (NATTEN / GNA), one axis at a time


def na_axis(q: int, k: int, L: int, w: int, s: int, d: int, causal: bool) -> bool:
    """DESIGN.md's rule for coordinates q, k on an axis of length L."""
    if q % d != k % d:  # different dilation groups never see each other
        return False
    g = q % d
    L_g = L // d + (1 if g < L % d else 0)
    i, j = q // d, k // d  # coordinates inside the group
    if causal:
        leader = min((i // s) * s + s - 1, L_g - 1)
        return j <= i and leader - j < w
    wl = w // 2
    wr = w // 2 + w % 2 - 1
    leader = min((i // s) * s + s // 2, L_g - 1)
    lo, hi = wl, L_g - 1 - wr
    center = min(max(leader, lo), hi)  # clamp(leader, wl, L_g - 1 - wr)
    return center - wl <= j <= center + wr


def na_axis_legacy(q: int, k: int, L: int, w: int, d: int) -> bool:
    """Second, differently written check: NATTEN <= 0.17's window start for odd w, stride 1.

    start = max(i - ns, 0) + (i + ns >= L_g) * (L_g - i - ns - 1) in group coordinates, window
    [start, start + w). Only valid for odd w (the old kernels' restriction).
    """
    assert w % 2 == 1
    if q % d != k % d:
        return False
    g = q % d
    L_g = len(range(g, L, d))
    i, j = q // d, k // d
    ns = w // 2
    start = max(i - ns, 0) + ((L_g - i - ns - 1) if i + ns >= L_g else 0)
    return start <= j < start + w


def _per_axis(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        assert len(value) == n
        return list(value)
    return [value] * n


def _coords(t: int, shape: Sequence[int]) -> list[int]:
    out = []
    for L in reversed(shape):
        out.append(t % L)
        t //= L
    return out[::-1]


def neighborhood_mask(shape, window, stride=1, dilation=1, causal=False) -> Matrix:
    shape = list(shape) if isinstance(shape, (list, tuple)) else [shape]
    n = len(shape)
    window, stride = _per_axis(window, n), _per_axis(stride, n)
    dilation, causal = _per_axis(dilation, n), _per_axis(causal, n)
    # One table per axis: the rule is per axis and the mask is the AND over axes.
    tables = [
        [[na_axis(a, b, L, w, s, d, c) for b in range(L)] for a in range(L)]
        for L, w, s, d, c in zip(shape, window, stride, dilation, causal, strict=True)
    ]
    N = math.prod(shape)
    coords = [_coords(t, shape) for t in range(N)]
    return [
        [int(all(tables[a][coords[q][a]][coords[k][a]] for a in range(n))) for k in range(N)]
        for q in range(N)
    ]


# ---------------------------------------------------------------------------------------------
# 1-D patterns


def sliding_extents(window=None, left=None, right=None, causal=False) -> tuple[int, int]:
    if window is not None:
        return (window - 1, 0) if causal else (window // 2, window - 1 - window // 2)
    return (left or 0), (0 if causal else (right or 0))


def sliding_allowed(p: int, j: int, left: int, right: int) -> bool:
    return p - left <= j <= p + right


def strided_allowed(p: int, j: int, local: int, stride: int, variant: str, summary: int,
                    causal: bool) -> bool:
    d = p - j
    if variant == "strided":
        near = (0 <= d < local) if causal else (abs(d) < local)
        out = near or d % stride == 0
    else:
        out = p // stride == j // stride or j % stride >= stride - summary
    return out and (j <= p or not causal)


def is_global_token(t: int, first: int, every: int, indices: Sequence[int]) -> bool:
    if t < 0:  # a virtual position (q_len > kv_len) is no token
        return False
    return t < first or (every > 0 and t % every == 0) or t in indices


def global_allowed(p: int, j: int, g: P.Global) -> bool:
    out = (g.columns and is_global_token(j, g.first, g.every, g.indices)) or (
        g.rows and is_global_token(p, g.first, g.every, g.indices))
    return bool(out) and (j <= p or not g.causal)


# ---------------------------------------------------------------------------------------------
# Block layouts (DeepSpeed SparsityConfig, re-derived loop by loop)


def block_layout_static(b: P.BlockLayout, n: int) -> Matrix:
    """The block matrix without random blocks: n x n of 0/1 (rows: query blocks)."""
    lay = [[0] * n for _ in range(n)]
    kind = b.layout_kind
    if kind == "explicit":
        return [list(r) for r in b.layout]
    if kind in ("bigbird", "longformer"):
        w = b.local // 2
        for r in range(n):
            for c in range(max(0, r - w), min(r + w + 1, n)):
                lay[r][c] = 1
        globals_ = list(b.global_indices) or list(range(b.global_blocks))
        for g in globals_:
            if g < n:
                for x in range(n):
                    lay[g][x] = 1  # global row
                    lay[x][g] = 1  # global column
        return lay
    if kind == "fixed":
        windows = [(s, min(s + b.local, n)) for s in range(0, n, b.local)]
        globals_ = set()
        for s, e in windows:
            for r in range(s, e):
                for c in range(s, e):
                    lay[r][c] = 1
            # the last global_blocks of every window, a short last window included (DeepSpeed
            # FixedSparsityConfig.set_global_layout: start = min(end + first, n - global))
            for c in range(max(e - b.global_blocks, 0), e):
                globals_.add(c)
    else:  # variable
        sizes = list(b.local_windows)
        s, w = 0, 0
        while s < n:
            e = min(s + sizes[min(w, len(sizes) - 1)], n)
            for r in range(s, e):
                for c in range(s, e):
                    lay[r][c] = 1
            s, w = e, w + 1
        globals_ = {g for g in b.global_indices if g < n}
    for g in globals_:
        for x in range(n):
            lay[x][g] = 1
            if b.rows:
                lay[g][x] = 1
    return lay


def block_layout_token_mask(b: P.BlockLayout, q_len: int, kv_len: int, lay: Matrix) -> Matrix:
    off = kv_len - q_len
    out = []
    for i in range(q_len):
        p = i + off
        row = []
        for j in range(kv_len):
            ok = p >= 0 and bool(lay[p // b.block][j // b.block]) and (j <= p or not b.causal)
            row.append(int(ok))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Any static pattern


def allowed(pattern: P.Pattern, i: int, j: int, q_len: int, kv_len: int) -> bool:
    p = i + kv_len - q_len
    if isinstance(pattern, P.Dense):
        return True
    if isinstance(pattern, P.Sliding):
        left, right = sliding_extents(pattern.window, pattern.left, pattern.right,
                                      pattern.causal)
        return sliding_allowed(p, j, left, right)
    if isinstance(pattern, P.Strided):
        return strided_allowed(p, j, pattern.local, pattern.stride, pattern.variant,
                               pattern.summary, pattern.causal)
    if isinstance(pattern, P.Blocked):
        return p // pattern.block == j // pattern.block and (j <= p or not pattern.causal)
    if isinstance(pattern, P.Global):
        return global_allowed(p, j, pattern)
    raise TypeError(f"oracle.allowed: no per-pair rule for {pattern!r}")


def mask(pattern: P.Pattern, q_len: int, kv_len: int) -> Matrix:
    """The 0/1 mask, list of q_len rows of kv_len ints."""
    if isinstance(pattern, P.Neighborhood):
        assert q_len == kv_len == math.prod(pattern.shape)
        return neighborhood_mask(pattern.shape, pattern.window, pattern.stride,
                                 pattern.dilation, pattern.causal)
    if isinstance(pattern, P.BlockLayout):
        assert pattern.random == 0 or pattern.layout_kind != "bigbird", "random: structure only"
        n = -(-kv_len // pattern.block)
        return block_layout_token_mask(pattern, q_len, kv_len, block_layout_static(pattern, n))
    if isinstance(pattern, P.AnyOf):
        members = [mask(m, q_len, kv_len) for m in pattern.patterns]
        off = kv_len - q_len
        return [[int(any(m[i][j] for m in members) and (j <= i + off or not pattern.causal))
                 for j in range(kv_len)] for i in range(q_len)]
    return [[int(allowed(pattern, i, j, q_len, kv_len)) for j in range(kv_len)]
            for i in range(q_len)]


# ---------------------------------------------------------------------------------------------
# Top-k block selection (DESIGN.md "topk"), one block pair at a time in Python floats


def select_blocks(pattern: P.TopK, q, k, scale: float | None = None) -> list:
    """Nested lists [B][H][n][n] of 0/1: the key blocks each query block keeps.

    q [B, H, S, D] and k [B, H_kv, S, D] as tensors (read with .tolist()). Scores: softmax over
    the eligible blocks (c <= r when causal) of mean-pooled q . mean-pooled k * scale. Forced:
    the first ``sink`` blocks and blocks r - local + 1 .. r. Then the ``k`` best candidates
    (ties to the lower index), or candidates in descending probability while the kept mass is
    below ``coverage`` (1e-12 slack for rounding; coverage 1.0 keeps every eligible block).
    """
    qs, ks = q.tolist(), k.tolist()
    B, H, S, D = len(qs), len(qs[0]), len(qs[0][0]), len(qs[0][0][0])
    H_kv = len(ks[0])
    group = H // H_kv
    blk = pattern.block
    n = -(-S // blk)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def pool(x):  # x: [S][D] -> [n][D]
        out = []
        for r in range(n):
            rows = x[r * blk:(r + 1) * blk]
            out.append([sum(t[dd] for t in rows) / len(rows) for dd in range(D)])
        return out

    def eligible(r, c):
        return c <= r or not pattern.causal

    probs = [[None] * H for _ in range(B)]
    for b in range(B):
        for h in range(H):
            qp, kp = pool(qs[b][h]), pool(ks[b][h // group])
            rows = []
            for r in range(n):
                sc = {c: sum(x * y for x, y in zip(qp[r], kp[c], strict=True)) * scale
                      for c in range(n) if eligible(r, c)}
                top = max(sc.values())
                ex = {c: math.exp(v - top) for c, v in sc.items()}
                total = sum(ex.values())
                rows.append([ex[c] / total if c in ex else 0.0 for c in range(n)])
            probs[b][h] = rows
    if pattern.share_gqa:
        for b in range(B):
            for g in range(H_kv):
                heads = range(g * group, (g + 1) * group)
                mean = [[sum(probs[b][h][r][c] for h in heads) / group for c in range(n)]
                        for r in range(n)]
                for h in heads:
                    probs[b][h] = mean

    out = [[[[0] * n for _ in range(n)] for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for r in range(n):
                p = probs[b][h][r]
                forced = [c for c in range(n) if eligible(r, c)
                          and (c < pattern.sink or r - pattern.local < c <= r)]
                cands = sorted((c for c in range(n) if eligible(r, c) and c not in forced),
                               key=lambda c: (-p[c], c))
                if pattern.k is not None:
                    chosen = cands[:pattern.k]
                elif pattern.coverage >= 1.0:
                    chosen = cands
                else:
                    mass, chosen = sum(p[c] for c in forced), []
                    for c in cands:
                        if mass >= pattern.coverage - 1e-12:
                            break
                        chosen.append(c)
                        mass += p[c]
                for c in [*forced, *chosen]:
                    out[b][h][r][c] = 1
    return out


# ---------------------------------------------------------------------------------------------
# Comparing


def describe_diff(got, want, what: str = "", limit: int = 12) -> str:
    """Where two 0/1 matrices (tensor or nested lists) differ, for assertion messages."""
    got = got.tolist() if hasattr(got, "tolist") else got
    got = [[int(x) for x in row] for row in got]
    want = [[int(x) for x in row] for row in want]
    if len(got) != len(want) or any(len(a) != len(b) for a, b in zip(got, want, strict=False)):
        return (f"{what}: shapes differ, got {len(got)}x{len(got[0]) if got else 0}, "
                f"want {len(want)}x{len(want[0]) if want else 0}")
    diffs = [(i, j, got[i][j], want[i][j]) for i in range(len(want)) for j in range(len(want[i]))
             if got[i][j] != want[i][j]]
    if not diffs:
        return ""
    lines = [f"{what}: {len(diffs)} of {len(want) * len(want[0])} entries differ "
             "(query i, key j: got, want):"]
    lines += [f"  i={i} j={j}: got {g}, want {w}" for i, j, g, w in diffs[:limit]]
    if len(want) <= 40 and len(want[0]) <= 80:
        lines.append("got / want rows that differ:")
        for i in sorted({d[0] for d in diffs})[:limit]:
            lines.append(f"  {i:3d} got  {''.join('#' if x else '.' for x in got[i])}")
            lines.append(f"  {i:3d} want {''.join('#' if x else '.' for x in want[i])}")
    return "\n".join(lines)


def assert_same(got, want, what: str = "") -> None:
    msg = describe_diff(got, want, what)
    assert not msg, msg


def parse_picture(text: str) -> Matrix:
    """A literal 0/1 matrix written as rows of '1'/'0' (spaces ignored)."""
    rows = [r.replace(" ", "") for r in text.strip().splitlines()]
    return [[int(c) for c in r] for r in rows if r]
