"""What a site's mask means, when it can be known at compile time.

HuggingFace models build their causal (or sliding-window) mask inside the compiled graph from
``arange`` and comparisons. When that subgraph depends on no graph input it can be evaluated
once at compile time (see :class:`~spcompile.passes.fxutil.Folder`); a mask that evaluates to
exactly causal becomes ``is_causal`` and is dropped, so the site is not left dense just because
the model spelled causality as a tensor.

A mask that depends on inputs is kept; when it is a *key-padding* mask (it broadcasts over
queries and heads, or it is such a per-key mask AND-ed with a constant causal / causal-window
mask, as HuggingFace's ``masking_utils`` builds it), :func:`key_padding_facts` splits it into
that per-key tensor and the constant part, so that a rewrite can apply the padding with the
pattern instead of leaving the site dense.

Causality is bottom-right aligned (query ``i`` sees key ``j`` iff ``j <= i + kv_len - q_len``),
like FlashAttention and spcompile's patterns; that is also what HuggingFace builds with a KV
cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .fxutil import (
    BROADCAST,
    CAST,
    IDENTITY,
    LOGICAL_AND,
    WHERE,
    Folder,
    concrete_int,
    same_size,
    scalar,
    shape,
    tensor_meta,
)

# An additive mask entry at or below this is "blocked": exp(-1e4) is exactly 0 next to a real
# score even in float64, so such a mask equals a -inf mask (except on rows with no key left).
BLOCKED_BELOW = -1e4


@dataclass(frozen=True)
class MaskFacts:
    """The mask part of an :class:`~spcompile.passes.site.AttentionSite`."""

    attn_mask: fx.Node | None = None
    kind: str | None = None
    is_causal: bool = False
    window: int | None = None
    note: str | None = None
    recognized: bool = False  # the mask was evaluated and only holds 0 / blocked entries
    key_padding: fx.Node | None = None  # see AttentionSite.key_padding
    key_padding_kind: str | None = None


def check_mask_shape(mask: fx.Node, scores_shape: tuple[Any, ...]) -> str | None:
    """None when ``mask`` broadcasts to the scores ``[..., S_q, S_kv]``, else the reason."""
    m = shape(mask)
    if m is None:
        return "the mask is not a tensor"
    if len(m) > len(scores_shape) or len(m) == 0:
        return (f"mask of unsupported shape {list(m)} for attention scores of shape "
                f"{list(scores_shape)}")
    for got, want in zip(reversed(m), reversed(scores_shape), strict=False):
        g, w = concrete_int(got), concrete_int(want)
        if g is not None and w is not None and g not in (1, w):
            return (f"mask of unsupported shape {list(m)} for attention scores of shape "
                    f"{list(scores_shape)}")
    return None


def mask_facts(mask: fx.Node | None, kind: str | None, q_len: Any, kv_len: Any,
               folder: Folder) -> MaskFacts:
    """Describe ``mask`` (interpreted as ``kind``: additive / allow / block) for one site."""
    if mask is None:
        return MaskFacts()
    folded, why = folder.fold(mask)
    if folded is None:
        return MaskFacts(mask, kind, note=f"kept: the mask {why}")
    q, kv = concrete_int(q_len), concrete_int(kv_len)
    if q is None or kv is None:
        return MaskFacts(mask, kind, note="kept: symbolic sequence lengths")
    allowed, why = _allowed(folded, kind, q, kv)
    if allowed is None:
        return MaskFacts(mask, kind, note=f"kept: {why}")
    shape_of = _classify(allowed, q, kv)
    if shape_of == "all":
        return MaskFacts(None, None, note="the mask allows every key; dropped", recognized=True)
    if shape_of == "causal":
        return MaskFacts(None, None, is_causal=True, recognized=True,
                         note="causal mask built in the graph; dropped for is_causal")
    if isinstance(shape_of, int):
        return MaskFacts(mask, kind, is_causal=True, window=shape_of, recognized=True,
                         note=f"causal sliding-window mask ({shape_of} keys per query) built in "
                              f"the graph")
    return MaskFacts(mask, kind, recognized=True,
                     note="kept: a constant mask that is neither causal nor a causal window")


def _classify(allowed: torch.Tensor, q: int, kv: int) -> str | int | None:
    """``"all"``, ``"causal"`` (bottom-right), the window of a causal sliding window (keys per
    query, itself included), or None for anything else, of a ``[q, kv]`` bool matrix."""
    i = torch.arange(q, device=allowed.device)[:, None]
    j = torch.arange(kv, device=allowed.device)[None, :]
    causal = j <= i + (kv - q)
    if bool(allowed.all()):
        return "all"
    if torch.equal(allowed, causal):
        return "causal"
    window = int(allowed[-1].sum())
    if window >= 1 and torch.equal(allowed, causal & (j > i + (kv - q) - window)):
        return window
    return None


def is_key_mask(node: fx.Node, scores_shape: tuple[Any, ...]) -> bool:
    """True when ``node`` broadcasts against the scores ``[B, H, S_q, S_kv]`` (or the flattened
    ``[B*H, S_q, S_kv]``) as a per-key mask: size 1 on the query and head axes (and on the
    flattened batch*heads axis), the key axis in full, the batch axis 1 or B.

    Sizes of 1 are plain ints even under dynamic shapes (dynamo specializes them), so this
    never guards.
    """
    m = shape(node)
    if m is None or not 1 <= len(m) <= len(scores_shape) or len(scores_shape) not in (3, 4):
        return False
    m = (1,) * (len(scores_shape) - len(m)) + tuple(m)

    def one(x: Any) -> bool:
        return concrete_int(x) == 1

    if not same_size(m[-1], scores_shape[-1]) or not one(m[-2]):
        return False
    if len(scores_shape) == 3:
        return one(m[0])
    return one(m[1]) and (one(m[0]) or same_size(m[0], scores_shape[0]))


def _peel_broadcasts(node: fx.Node) -> fx.Node:
    """Through ``expand``/``broadcast_to``, ``contiguous``/``clone`` and bool-to-bool ``to``
    (a device move): ops that change neither the values nor which axes vary."""
    while True:
        nxt = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if nxt is None:
            return node
        if BROADCAST.matches(node) or IDENTITY.matches(node):
            node = nxt
            continue
        before, after = tensor_meta(nxt), tensor_meta(node)
        if CAST.matches(node) and before is not None and after is not None \
                and before.dtype == after.dtype == torch.bool:
            node = nxt
            continue
        return node


def _and_leaves(node: fx.Node, out: list[Any]) -> None:
    """The operands of a tree of bool ANDs (``&``, ``logical_and``), broadcasts peeled."""
    node = _peel_broadcasts(node)
    if LOGICAL_AND.matches(node) and len(node.args) == 2 and not node.kwargs:
        for operand in node.args:
            if isinstance(operand, fx.Node):
                _and_leaves(operand, out)
            else:
                out.append(operand)
        return
    out.append(node)


def _floating(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.is_floating_point()


def _where_allow(node: fx.Node, folder: Folder) -> tuple[fx.Node, str] | None:
    """``torch.where(c, 0, -inf)`` -> (c, "allow"), ``torch.where(c, -inf, 0)`` -> (c,
    "block"); any fill at or below BLOCKED_BELOW counts as -inf. None for anything else."""
    node = _peel_broadcasts(node)
    while CAST.matches(node) and node.args and isinstance(node.args[0], fx.Node) \
            and _floating(node) and _floating(node.args[0]):
        node = _peel_broadcasts(node.args[0])  # float casts of a 0 / blocked mask keep both
    if not (WHERE.matches(node) and len(node.args) == 3 and isinstance(node.args[0], fx.Node)):
        return None
    cond, a, b = node.args
    meta = tensor_meta(cond)
    if meta is None or meta.dtype != torch.bool:
        return None
    x, y = scalar(a, folder), scalar(b, folder)
    if x == 0 and y is not None and y <= BLOCKED_BELOW:
        return cond, "allow"
    if y == 0 and x is not None and x <= BLOCKED_BELOW:
        return cond, "block"
    return None


def key_padding_facts(mask: fx.Node, kind: str | None, scores_shape: tuple[Any, ...],
                      q_len: Any, kv_len: Any, folder: Folder) -> tuple[MaskFacts | None, str]:
    """Split a kept mask into a per-key mask and a constant part, exactly, or say why not.

    Recognized (the effective mask must be *equal* to key mask AND constant part, so every step
    is an identity of boolean algebra or of broadcasting):

    - the whole mask is a per-key mask (:func:`is_key_mask`): additive (any values: a per-key
      bias), allow or block;
    - an allow mask that is a tree of ANDs (through broadcasts and device moves) of exactly one
      input-dependent per-key factor and constant factors (which fold at compile time); an
      additive ``torch.where(allow, 0, -inf)`` of such a tree counts as that allow mask. The
      constant factors AND-ed must be all-true, causal or a causal window: they become
      ``is_causal`` / ``window``, like a constant mask.

    That is how HuggingFace's ``masking_utils`` builds ``[B, 1, S_q, S_kv]`` masks from a
    ``[B, S]`` padding mask: ``causal(q, kv) & padding[b, kv]``, expanded. On success the facts
    keep ``attn_mask`` (the whole mask) and add ``key_padding``/``key_padding_kind``.
    """
    if kind not in ("additive", "allow", "block"):
        return None, f"unknown mask kind {kind!r}"
    node, node_kind = _peel_broadcasts(mask), kind
    if kind == "additive":
        found = _where_allow(mask, folder)
        if found is None:
            if is_key_mask(node, scores_shape):
                return MaskFacts(mask, kind, key_padding=node, key_padding_kind="additive",
                                 note="kept: a per-key additive mask (key padding)"), ""
            return None, "an additive mask that varies over queries or heads"
        node, node_kind = found
    if node_kind == "block":
        node = _peel_broadcasts(node)
        if is_key_mask(node, scores_shape):
            return MaskFacts(mask, kind, key_padding=node, key_padding_kind="block",
                             note="kept: a per-key boolean mask (key padding)"), ""
        return None, "a mask of blocked pairs that varies over queries or heads"
    leaves: list[Any] = []
    _and_leaves(node, leaves)
    key: fx.Node | None = None
    constants: list[torch.Tensor] = []
    for leaf in leaves:
        if not isinstance(leaf, fx.Node):
            if leaf is True:
                continue
            return None, f"a boolean mask AND-ed with {leaf!r}"
        meta = tensor_meta(leaf)
        if meta is None or meta.dtype != torch.bool:
            return None, "a boolean mask built from non-boolean parts"
        folded, why = folder.fold(leaf)
        if isinstance(folded, torch.Tensor):
            if not bool(folded.all()):
                constants.append(folded)
            continue
        if not is_key_mask(leaf, scores_shape):
            return None, f"a part of the mask that varies over queries or heads {why}"
        if key is not None:
            return None, "more than one per-key part"
        key = leaf
    if key is None:
        return None, "no per-key part"
    facts = MaskFacts(mask, kind, key_padding=key, key_padding_kind="allow",
                      note="kept: a per-key mask (key padding)")
    if not constants:
        return facts, ""
    q, kv = concrete_int(q_len), concrete_int(kv_len)
    if q is None or kv is None:
        return None, "its constant part has symbolic sizes"
    combined = constants[0]
    for c in constants[1:]:
        combined = combined & c
    allowed, why = _allowed(combined, "allow", q, kv)
    if allowed is None:
        return None, f"its constant part is {why}"
    rest = _classify(allowed, q, kv)
    if rest == "all":
        return facts, ""
    if rest == "causal":
        return MaskFacts(mask, kind, is_causal=True, key_padding=key, key_padding_kind="allow",
                         note="kept: causal AND a per-key mask (key padding)"), ""
    if isinstance(rest, int):
        return MaskFacts(mask, kind, is_causal=True, window=rest, key_padding=key,
                         key_padding_kind="allow",
                         note=f"kept: a causal sliding window ({rest} keys per query) AND a "
                              f"per-key mask (key padding)"), ""
    return None, "its constant part is neither causal nor a causal window"


def _allowed(value: Any, kind: str | None, q: int, kv: int) -> tuple[torch.Tensor | None, str]:
    """The ``[q, kv]`` bool matrix of allowed pairs, or (None, why not)."""
    if not isinstance(value, torch.Tensor):
        return None, "the mask is not a tensor"
    if kind == "additive":
        if not value.is_floating_point():
            return None, f"an additive mask of dtype {value.dtype}"
        zero, blocked = value == 0, value <= BLOCKED_BELOW
        if not bool((zero | blocked).all()):
            return None, "an additive bias (values other than 0 and -inf)"
        allowed = zero
    elif kind in ("allow", "block"):
        if value.dtype != torch.bool:
            return None, f"a boolean mask of dtype {value.dtype}"
        allowed = value if kind == "allow" else ~value
    else:
        return None, f"unknown mask kind {kind!r}"
    while allowed.dim() < 2:
        allowed = allowed.unsqueeze(0)
    if allowed.shape[-2] not in (1, q) or allowed.shape[-1] not in (1, kv):
        return None, f"a mask of shape {list(allowed.shape)} for {q} queries and {kv} keys"
    allowed = allowed.expand(*allowed.shape[:-2], q, kv).reshape(-1, q, kv)
    if not torch.equal(allowed, allowed[:1].expand_as(allowed)):
        return None, "the mask differs across batch or heads"
    return allowed[0], ""
