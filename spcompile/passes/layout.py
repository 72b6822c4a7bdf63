"""Layout facts around an attention site: GQA repeats, heads of flattened forms, einsum layouts.

Models rarely hand attention a clean ``[B, H, S, D]``: HuggingFace repeats GQA key/value heads
(``repeat_kv``) right before attention, diffusers' older processors flatten heads into the batch
(``[B*H, S, D]``) for ``bmm``, einsum code names its own axes. These helpers read those
conventions back from the graph.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .fxutil import (
    EINSUM,
    EXPAND,
    GETITEM,
    IDENTITY,
    PERMUTE,
    REPEAT_INTERLEAVE,
    TRANSPOSE,
    UNSQUEEZE,
    VIEW,
    arg,
    concrete_int,
    differ,
    ndim,
    norm_dim,
    same_size,
    shape,
)

_FULL = slice(None, None, None)


def unrepeat_kv(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """(compact ``[B, H_kv, S, D]`` tensor, repeat nodes) when ``node`` repeats KV heads.

    Recognized: HuggingFace ``repeat_kv`` (``x[:, :, None].expand(B, H_kv, n, S, D)`` or
    ``x.unsqueeze(2).expand(...)``, then ``.reshape(B, H_kv * n, S, D)``) and
    ``x.repeat_interleave(n, dim=1)``. Both put the copies of KV head ``g`` at query heads
    ``g*n .. g*n+n-1``, the GQA grouping. ``x.repeat(1, n, 1, 1)`` tiles the heads instead
    (head ``h`` reads KV head ``h % H_kv``) and is deliberately not treated as GQA.
    """
    out = shape(node)
    if out is None or len(out) != 4:
        return None
    if VIEW.matches(node) and node.args and isinstance(node.args[0], fx.Node):
        expanded = node.args[0]
        if not (EXPAND.matches(expanded) and isinstance(expanded.args[0], fx.Node)):
            return None
        inserted = expanded.args[0]
        if not _inserts_group_axis(inserted):
            return None
        base = inserted.args[0]
        b, e = shape(base), shape(expanded)
        if b is None or e is None or len(b) != 4 or len(e) != 5:
            return None
        if differ(out[1], _mul(b[1], e[2])) or differ(out[2], b[2]) or differ(out[3], b[3]):
            return None
        return base, (inserted, expanded, node)
    if REPEAT_INTERLEAVE.matches(node):
        base = node.args[0]
        repeats = arg(node, 1, "repeats", None)
        dim = arg(node, 2, "dim", None)
        b = shape(base)
        if b is None or len(b) != 4 or concrete_int(repeats) is None:
            return None
        if norm_dim(dim, 4) != 1:
            return None
        return base, (node,)
    return None


def _inserts_group_axis(node: fx.Node) -> bool:
    """``x[:, :, None]`` (any spelling of the trailing slices) or ``x.unsqueeze(2)``."""
    if UNSQUEEZE.matches(node):
        return norm_dim(arg(node, 1, "dim", None), 5) == 2
    if not GETITEM.matches(node) or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    if len(index) < 3 or index[0] != _FULL or index[1] != _FULL or index[2] is not None:
        return False
    return all(i == _FULL or i is Ellipsis for i in index[3:])


def _mul(a: Any, b: Any) -> Any:
    try:
        return a * b
    except TypeError:
        return None


_VIEWLIKE = (VIEW, PERMUTE, TRANSPOSE, IDENTITY)


def heads_of_flattened(bh: Any, seq: Any, dim: Any, inputs: list[fx.Node],
                       output: fx.Node | None, score_views: list[tuple[Any, ...]]
                       ) -> tuple[Any, Any] | None:
    """(batch, heads) of a ``[B*H, S, D]`` site, read from the reshapes around it.

    Looks back from each input (``q``, ``k``, ``v``) and forward from the output, through
    view/reshape/permute/transpose/contiguous, for a 4-D tensor ``[B, H, S, D]`` or
    ``[B, S, H, D]`` with ``B*H`` equal to the flattened dim; also accepts a 4-D view of the
    scores ``[B, H, S_q, S_kv]`` (BART-style code reshapes scores to add the mask).
    """
    for s in score_views:
        if len(s) == 4 and same_size(_mul(s[0], s[1]), bh):
            return s[0], s[1]
    for start in inputs:
        node: Any = start
        for _ in range(6):
            found = _split(shape(node), bh, seq, dim)
            if found is not None:
                return found
            if not (isinstance(node, fx.Node) and any(op.matches(node) for op in _VIEWLIKE)):
                break
            node = node.args[0]
    node = output
    for _ in range(6):
        if node is None or len(node.users) != 1:
            break
        (node,) = node.users
        if not any(op.matches(node) for op in _VIEWLIKE):
            break
        found = _split(shape(node), bh, seq, None)
        if found is not None:
            return found
    return None


def _split(s: tuple[Any, ...] | None, bh: Any, seq: Any, dim: Any) -> tuple[Any, Any] | None:
    if s is None or len(s) != 4 or (dim is not None and not same_size(s[3], dim)):
        return None
    if same_size(_mul(s[0], s[1]), bh) and same_size(s[2], seq):
        return s[0], s[1]  # [B, H, S, D]
    if same_size(_mul(s[0], s[2]), bh) and same_size(s[1], seq):
        return s[0], s[2]  # [B, S, H, D]
    return None


# --------------------------------------------------------------------------------------------
# einsum


def einsum_operands(node: fx.Node) -> tuple[list[str], str, list[Any]] | None:
    """(input subscripts, output subscript, operands) with spaces removed and ``...`` spelled
    out as digits (one per broadcast dim, right-aligned), or None for implicit-output forms."""
    if not EINSUM.matches(node) or not node.args or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    eq = node.args[0].replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(operands):
        return None
    widths = []
    for sub, op in zip(ins, operands, strict=True):
        rank = ndim(op)
        if "..." in sub:
            if rank is None:
                return None
            widths.append(rank - (len(sub) - 3))
    width = max(widths, default=0)
    digits = "".join(str(i) for i in range(width))

    def spell(sub: str, w: int) -> str:
        return sub.replace("...", digits[width - w:]) if "..." in sub else sub

    it = iter(widths)
    ins = [spell(s, next(it)) if "..." in s else s for s in ins]
    return ins, spell(out, width), operands


def einsum_layout(sub: str, batch: str, seq: str, feat: str) -> str | None:
    """The layout name of one operand's subscript, given its batch letters (in order), its
    sequence letter and its feature letter; ``"transposed"`` for ``[.., D, S]``."""
    if sub == batch + seq + feat:
        return {2: "bhsd", 1: "bhsd-flattened"}.get(len(batch))
    if len(batch) == 2 and sub == batch[0] + seq + batch[1] + feat:
        return "bshd"
    if sub == batch + feat + seq:
        return "transposed"
    return None
