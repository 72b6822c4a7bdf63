"""Emit Triton source for the two things a kernel specializes on: layouts and masks.

Layouts become index arithmetic with every size inlined as a constant (tile sides are powers of
two, so the div/mod on row offsets compile to shifts and masks): this is the token permutation,
fused into the kernel's loads and stores, so no permuted copy of q, k, v or o ever exists.

Masks become one boolean expression over per-row and per-column integer vectors. The kernel
evaluates it only on PARTIAL tiles. Everything derived from the query alone (an NA window's
centre) is computed on the [M, 1] column before it meets the [1, N] keys.

Variables the emitted code may use (all int32):
    ``{p}_tok``  flat token index, ``{p}_ok`` valid (not padding), ``{p}x{a}`` grid coordinate on
    axis a, for p in (q, k); ``qpos`` = q_tok + (kv_len - q_len), the bottom-right position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..plan.layout import TokenLayout
from ..spec.patterns import (
    AnyOf,
    Blocked,
    BlockLayout,
    Dense,
    Global,
    Neighborhood,
    Pattern,
    Sliding,
    Strided,
    TopK,
)

MAX_GLOBAL_INDICES = 64


def layout_code(layout: TokenLayout, prefix: str, tile: str, offs: str, shape: str) -> list[str]:
    """Lines computing ``{prefix}_tok``, ``{prefix}_ok`` and ``{prefix}x{a}`` for one tile.

    ``tile`` is a scalar expression (tile id), ``offs`` the row offsets (tl.arange), ``shape``
    the broadcast suffix ("[:, None]" for rows, "[None, :]" for columns).
    """
    p = prefix
    if layout.ndim == 1 and layout.dilation == (1,):
        lines = [f"{p}_tok = ({tile} * {layout.tile[0]} + {offs}){shape}"]
        lines.append(f"{p}x0 = {p}_tok")
        if layout.num_tokens % layout.tile[0]:
            lines.append(f"{p}_ok = {p}_tok < {layout.num_tokens}")
        else:
            lines.append(f"{p}_ok = {p}_tok >= 0")
        return lines
    lines = [f"{p}_grp = {tile} // {layout.tiles_per_group}",
             f"{p}_box = {tile} % {layout.tiles_per_group}"]
    ok_terms, tok = [], None
    for a in range(layout.ndim):
        tiles_inner = math.prod(layout.tiles_per_axis[a + 1 :])
        dil_inner = math.prod(layout.dilation[a + 1 :])
        row_inner = math.prod(layout.tile[a + 1 :])
        box = f"(({p}_box // {tiles_inner}) % {layout.tiles_per_axis[a]})"
        off = f"(({offs} // {row_inner}) % {layout.tile[a]}){shape}"
        coord = f"({box} * {layout.tile[a]} + {off})"
        if layout.dilation[a] > 1:
            grp = f"(({p}_grp // {dil_inner}) % {layout.dilation[a]})"
            coord = f"({coord} * {layout.dilation[a]} + {grp})"
        lines.append(f"{p}x{a} = {coord}")
        ok_terms.append(f"({p}x{a} < {layout.grid[a]})")
        tok = f"{p}x{a}" if tok is None else f"({tok}) * {layout.grid[a]} + {p}x{a}"
    lines.append(f"{p}_ok = {' & '.join(ok_terms)}")
    lines.append(f"{p}_tok = {tok}")
    return lines


# ---------------------------------------------------------------------------------------------
# Masks

MaskEmitter = Callable[[Pattern], str]
_EMITTERS: dict[type[Pattern], MaskEmitter] = {}


def emitter(cls: type[Pattern]) -> Callable[[MaskEmitter], MaskEmitter]:
    def register(fn: MaskEmitter) -> MaskEmitter:
        _EMITTERS[cls] = fn
        return fn

    return register


def mask_expr(pattern: Pattern) -> str:
    """A Triton boolean expression for ``pattern``; raises NotImplementedError if none."""
    fn = _EMITTERS.get(type(pattern))
    if fn is None:
        raise NotImplementedError(f"no Triton mask for {type(pattern).__name__} yet")
    return fn(pattern)


def _causal(expr: str, causal: bool) -> str:
    return f"({expr}) & (k_tok <= qpos)" if causal else expr


@emitter(Dense)
def _dense(p: Dense) -> str:
    return "(k_tok >= 0)"


@emitter(Sliding)
def _sliding(p: Sliding) -> str:
    # qpos - left <= k_tok <= qpos + right as one unsigned compare of the difference (a key
    # left of the band wraps to a large value): per element one add, one compare and the
    # select, against two compares and two selects (sm_90 SASS of the sw16k forward).
    return f"((k_tok - (qpos - {p.left_extent})).to(tl.uint32) <= {p.left_extent + p.right_extent})"


@emitter(Blocked)
def _blocked(p: Blocked) -> str:
    # Triton's // truncates toward zero: guard negative positions (rows before the KV start).
    return _causal(f"(qpos >= 0) & (qpos // {p.block} == k_tok // {p.block})", p.causal)


@emitter(Strided)
def _strided(p: Strided) -> str:
    d = "(qpos - k_tok)"
    if p.variant == "strided":
        near = (f"({d} >= 0) & ({d} < {p.local})" if p.causal
                else f"({d} < {p.local}) & ({d} > -{p.local})")
        expr = f"({near}) | ({d} % {p.stride} == 0)"
    else:
        expr = (f"((qpos >= 0) & (qpos // {p.stride} == k_tok // {p.stride})) | "
                f"(k_tok % {p.stride} >= {p.stride - p.summary})")
    return _causal(expr, p.causal)


def _is_global(p: Global, var: str) -> str:
    terms = []
    if p.first:
        terms.append(f"({var} < {p.first})")
    if p.every:
        terms.append(f"({var} % {p.every} == 0)")
    if len(p.indices) > MAX_GLOBAL_INDICES:
        raise NotImplementedError(f"Global: more than {MAX_GLOBAL_INDICES} explicit indices")
    terms += [f"({var} == {i})" for i in p.indices]
    return " | ".join(terms)


@emitter(Global)
def _global(p: Global) -> str:
    terms = []
    if p.columns:
        terms.append(f"({_is_global(p, 'k_tok')})")
    if p.rows:
        terms.append(f"(({_is_global(p, 'qpos')}) & (qpos >= 0))")
    return _causal(" | ".join(terms), p.causal)


@emitter(Neighborhood)
def _neighborhood(p: Neighborhood) -> str:
    terms = []
    for a, length in enumerate(p.shape):
        w, s, d = p.window[a], p.stride[a], p.dilation[a]
        qi, kj = f"qx{a}", f"kx{a}"
        same = ""
        if d > 1:
            same = f"(({qi} % {d}) == ({kj} % {d})) & "
            lg = f"({length // d} + (({qi} % {d}) < {length % d}).to(tl.int32))"
            qi, kj = f"({qi} // {d})", f"({kj} // {d})"
        else:
            lg = str(length)
        if p.causal[a]:
            leader = f"tl.minimum(({qi} // {s}) * {s} + {s - 1}, {lg} - 1)"
            terms.append(f"({same}({kj} <= {qi}) & ({leader} - {kj} < {w}))")
        else:
            wl, wr = w // 2, w // 2 + w % 2 - 1
            leader = qi if s == 1 else f"tl.minimum(({qi} // {s}) * {s} + {s // 2}, {lg} - 1)"
            center = f"tl.maximum(tl.minimum({leader}, {lg} - 1 - {wr}), {wl})"
            terms.append(f"({same}({kj} >= {center} - {wl}) & ({kj} <= {center} + {wr}))")
    return " & ".join(terms)


@emitter(BlockLayout)
def _block_layout(p: BlockLayout) -> str:
    # The block matrix is passed as AUX (int8 [n_blocks, n_blocks], row stride AUX_STRIDE).
    expr = (f"(tl.load(AUX + (tl.maximum(qpos, 0) // {p.block}) * AUX_STRIDE + "
            f"(k_tok // {p.block}), mask=(qpos >= 0) & k_ok, other=0) != 0)")
    return _causal(expr, p.causal)


@emitter(TopK)
def _topk(p: TopK) -> str:
    # Tiles are whole blocks and the lists hold only selected ones: causality is all that is left.
    return _causal("(k_tok >= 0)", p.causal)


@emitter(AnyOf)
def _any_of(p: AnyOf) -> str:
    return _causal(" | ".join(f"({mask_expr(m)})" for m in p.patterns), p.causal)


def needs_aux(pattern: Pattern) -> BlockLayout | None:
    """The BlockLayout whose block matrix the kernel reads, if any."""
    if isinstance(pattern, BlockLayout):
        return pattern
    if isinstance(pattern, AnyOf):
        found = [m for m in pattern.patterns if isinstance(m, BlockLayout)]
        if len(found) > 1:
            raise NotImplementedError("AnyOf with more than one BlockLayout")
        return found[0] if found else None
    return None
