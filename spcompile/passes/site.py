"""What the detect pass found: attention sites, rejected candidates, and where they live.

An :class:`AttentionSite` is everything a rewrite needs to replace one dense attention by one
call of the sparse op, and everything rule matching needs to choose its pattern (module path,
layer, lengths, heads), without reading the graph again. A :class:`Rejected` candidate looked
like attention but cannot be replaced without changing what the model computes; its reason is
shown to the user ("site left dense because ...").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx

from .fxutil import same_size

__all__ = [
    "LAYOUTS",
    "MASK_KINDS",
    "AttentionSite",
    "Rejected",
    "layer_index",
    "module_of",
    "normalize_module_path",
]

LAYOUTS = ("bhsd", "bshd", "bhsd-flattened")
"""How ``q``, ``k``, ``v`` and ``output`` hold their dimensions.

- ``"bhsd"``: ``[B, H, S, D]`` (SDPA, HuggingFace, timm).
- ``"bshd"``: ``[B, S, H, D]`` (einsum forms like ``"bqhd,bkhd->bhqk"``).
- ``"bhsd-flattened"``: ``[B*H, S, D]`` with batch-major flattening (``bmm`` forms); ``batch``
  and ``num_heads`` were recovered from the reshapes around the site, so
  ``q.view(batch, num_heads, S, D)`` is the 4-D view.
"""

MASK_KINDS = ("additive", "allow", "block")
"""``additive``: a float added to the scaled scores (0 keeps, -inf drops).
``allow``: bool, True = may attend (the SDPA convention, ``torch.where(mask, scores, -inf)``).
``block``: bool, True = masked out (the ``masked_fill(mask, -inf)`` convention)."""

Size = Any  # int or torch.SymInt


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation ``softmax(q k^T * scale + mask) v`` found in an FX graph.

    Nodes: ``q``, ``k``, ``v`` are the tensors as they enter attention (after any transposes and
    after GQA ``repeat_kv``); ``k_compact``/``v_compact`` are the tensors before ``repeat_kv``
    when it was detected (``[B, num_kv_heads, S, D]``), so a rewrite can use the GQA-native
    kernel; ``kv_repeat_nodes`` are the repeat nodes themselves (dead too once the compact
    tensors are used, unless something else reads the repeated ones). When ``num_kv_heads <
    num_heads`` and ``k_compact`` is None, ``k``/``v`` already have ``num_kv_heads`` heads (SDPA
    ``enable_gqa=True``, or MQA by broadcasting). ``output`` is the node whose users consume the
    attention result (same layout as ``q``, last dim ``v_head_dim``). ``nodes`` are the nodes
    that form the site, ``output`` included and ``q``/``k``/``v`` excluded: all of them are dead
    once ``output``'s users are redirected (pre-scales of q, the transpose of k, casts, dropout,
    in-place ops on the scores, an ignored ``baddbmm`` input).

    Shapes are read from the example values dynamo recorded and may be SymInts under dynamic
    shapes. ``batch``/``num_heads`` of a ``bhsd-flattened`` site come from the reshapes around
    it (see :data:`LAYOUTS`).

    Scale: the factor applied to ``q k^T``; None means SDPA's default ``1/sqrt(head_dim)``.
    Hand-written forms always give the float they compute (1.0 when nothing scales). Under
    ``torch.compile(dynamic=True)`` dynamo turns float module attributes (``self.scaling``) into
    graph inputs, so the scale is only known at run time: then ``scale_node`` is the node that
    carries it (a SymFloat, e.g. ``l_self_..._scaling.item()``) and ``scale`` is its value at
    capture time, for reports and rules. A rewrite must pass ``scale_node``, not bake ``scale``
    into a kernel that a later call with another value would reuse.

    Mask: the effective mask is ``attn_mask`` (interpreted as ``mask_kind``) AND causal when
    ``is_causal``. ``is_causal`` comes from SDPA's flag or from a mask built inside the graph
    that evaluated to exactly causal (bottom-right aligned, as in FlashAttention); the mask is
    then dropped (``attn_mask`` None). A constant causal sliding-window mask keeps ``attn_mask``
    and sets ``is_causal`` and ``mask_window`` (keys seen per query, itself included), so a
    rule whose pattern is that window can drop the mask. ``mask_note`` says in words what is
    known about the mask. ``attn_mask`` broadcasts against the scores it was applied to:
    ``[B, H, S_q, S_kv]``, or for ``bhsd-flattened`` sites either ``[B*H, S_q, S_kv]`` or a
    4-D ``[B, H, S_q, S_kv]`` view (BART-style code adds the mask on such a view).

    Key padding: ``key_padding`` is set when the kept ``attn_mask`` is known to equal a per-key
    mask AND (causal when ``is_causal``) AND (the causal window when ``mask_window``), nothing
    else (:func:`~spcompile.passes.masks.key_padding_facts`). The node broadcasts against the
    scores with size 1 on the query and head axes, B or 1 on the batch axis and S_kv on the
    key axis, and is read as ``key_padding_kind`` (see :data:`MASK_KINDS`; ``additive`` is any
    per-key bias). It is often a node inside the mask's own subgraph (HuggingFace's
    ``padding[b, kv]`` before it is AND-ed with causal and expanded to ``[B, 1, S, S]``), so a
    rewrite that reads it instead of ``attn_mask`` leaves the ``S_q x S_kv`` mask dead.

    ``dropout_p`` is always 0: attention dropout that is active makes the candidate a
    :class:`Rejected`. ``module_path`` is the user's dotted path of the innermost
    attention-like module (:func:`module_of`), ``layer`` its block index (:func:`layer_index`),
    ``form`` the :data:`~spcompile.passes.detect.FORMS` entry that matched.
    """

    form: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node
    nodes: tuple[fx.Node, ...]
    layout: str
    batch: Size | None
    num_heads: Size | None
    num_kv_heads: Size | None
    head_dim: Size | None
    v_head_dim: Size | None
    q_len: Size | None
    kv_len: Size | None
    scale: float | None = None
    scale_node: fx.Node | None = None
    is_causal: bool = False
    attn_mask: fx.Node | None = None
    mask_kind: str | None = None
    mask_window: int | None = None
    mask_note: str | None = None
    key_padding: fx.Node | None = None
    key_padding_kind: str | None = None
    dropout_p: float = 0.0
    k_compact: fx.Node | None = None
    v_compact: fx.Node | None = None
    kv_repeat_nodes: tuple[fx.Node, ...] = ()
    module_path: str | None = None
    module_type: str | None = None
    layer: int | None = None

    @property
    def q_shape(self) -> tuple[Size | None, Size | None, Size | None, Size | None]:
        """``(B, H, S_q, D)`` whatever the layout of ``q``."""
        return (self.batch, self.num_heads, self.q_len, self.head_dim)

    @property
    def is_gqa(self) -> bool:
        """Fewer key/value heads than query heads (GQA/MQA); False when unknown."""
        return (self.num_kv_heads is not None and self.num_heads is not None
                and not same_size(self.num_kv_heads, self.num_heads))

    def describe(self) -> str:
        """One line for logs: ``layers.0.self_attn [matmul] 2x4/2x8x8x16 scale=0.25 causal``."""
        heads = f"{self.num_heads}" if not self.is_gqa else \
            f"{self.num_heads}/{self.num_kv_heads}"
        parts = [f"{self.module_path or '?'} [{self.form}]",
                 f"{self.batch}x{heads}x{self.q_len}x{self.kv_len}x{self.head_dim}",
                 f"scale={self.scale if self.scale is not None else 'default'}"]
        if self.is_causal:
            parts.append("causal")
        if self.attn_mask is not None:
            parts.append(f"mask={self.mask_kind}")
        if self.mask_window is not None:
            parts.append(f"window={self.mask_window}")
        if self.key_padding is not None:
            parts.append(f"key_padding={self.key_padding_kind}")
        return " ".join(parts)


@dataclass(frozen=True)
class Rejected:
    """A candidate that looked like attention but is left dense, and why.

    ``node`` is the node the candidate was found from (the SDPA call or the ``q @ k^T``
    product); ``reason`` is written for the user, e.g. "attention weights are also returned
    (used by 1 node(s) outside the site: output)"; several reasons are joined by "; ".
    ``nodes`` are the nodes the candidate spans, so that no other site claims them.
    """

    form: str
    reason: str
    node: fx.Node
    module_path: str | None = None
    module_type: str | None = None
    layer: int | None = None
    nodes: tuple[fx.Node, ...] = ()


# --------------------------------------------------------------------------------------------
# Module paths

# The root: a local or global (``L['self']``), or the first positional argument of a wrapped
# ``forward(*args)`` (``L['args'][0]``: transformers 5 decorates its models' forward so).
_ROOT = re.compile(r"^(?:[LG]\[['\"]args['\"]\]\[0\]|[LG]\[(?:'[^']*'|\"[^\"]*\")\]|self)"
                   r"(?=\.|\[|$)")
_GETATTR = re.compile(r"getattr\(([^()]*?),\s*['\"]([^'\"]*)['\"]\)")
_MODULES_ITEM = re.compile(r"\._modules\[['\"]([^'\"]*)['\"]\]")
_ITEM = re.compile(r"\[(?:['\"]([^'\"]*)['\"]|(\d+))\]")
_MANGLED_ROOT = re.compile(r"^[LG]__\w+?__?_")

LAYER_CONTAINERS = frozenset({"layers", "blocks", "h", "layer", "transformer_blocks",
                              "single_transformer_blocks"})
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_ATTENTION_COMPONENT = re.compile(r"^(?:self_|cross_)?(?:attn|attention)\d*$", re.IGNORECASE)


def normalize_module_path(raw: str) -> str:
    """The user's dotted module path from the one dynamo records in ``nn_module_stack``.

    ``L['self'].layers.0.self_attn``, ``L['self']._modules['layers']._modules['0'].self_attn``,
    ``getattr(L['self'].layers, '0').self_attn``, ``L['self'].layers[0].self_attn`` and
    ``L['args'][0].layers.0.self_attn`` (a decorated ``forward(*args)``) all give
    ``layers.0.self_attn``; the root module gives ``""``. Mangled keys such as
    ``L__self___layers_0_self_attn`` lose their dots for good; the remainder is returned as is.
    """
    s = raw.strip()
    previous = None
    while previous != s:
        previous = s
        s = _GETATTR.sub(r"\1.\2", s)
    s = _MODULES_ITEM.sub(r".\1", s)
    s = _ROOT.sub("", s, count=1)
    s = _ITEM.sub(lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), s)
    if s == raw.strip() and _MANGLED_ROOT.match(s):
        s = _MANGLED_ROOT.sub("", s, count=1)
    return s.strip(".")


def layer_index(path: str | None) -> int | None:
    """The first integer component right after a ``layers``/``blocks``/``h``/``layer`` (or
    diffusers' ``transformer_blocks``) component: ``model.layers.11.self_attn`` -> 11,
    ``encoder.layer.3.attention.self`` -> 3, ``h.0.attn`` -> 0."""
    if not path:
        return None
    parts = path.split(".")
    for name, nxt in itertools.pairwise(parts):
        if name in LAYER_CONTAINERS and nxt.isdigit():
            return int(nxt)
    return None


def _type_name(kind: Any) -> str:
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).rsplit(".", 1)[-1].strip("'>")


def module_of(node: fx.Node) -> tuple[str | None, str | None]:
    """(module path, class name) of the innermost attention-like module around ``node``.

    Attention-like: the class name contains "attn"/"attention" (LlamaAttention,
    BertSelfAttention, timm's Attention), or, when only a name is known, the last path
    component is ``attn``/``self_attn``/``attention``. Dropout modules inside attention
    (timm's ``attn_drop``) are therefore skipped. Without any, the innermost module; without a
    module stack (a compiled function), (None, None).
    """
    stack = node.meta.get("nn_module_stack")
    if not isinstance(stack, Mapping) or not stack:
        return None, None
    entries: list[tuple[str, str]] = []
    for key, entry in stack.items():
        if isinstance(entry, (tuple, list)) and entry:
            raw, kind = str(entry[0]), entry[1] if len(entry) > 1 else ""
        else:
            raw, kind = str(key), entry
        entries.append((normalize_module_path(raw), _type_name(kind)))
    for path, type_name in reversed(entries):
        if _ATTENTION_NAME.search(type_name):
            return path, type_name
    for path, type_name in reversed(entries):
        if not type_name and _ATTENTION_COMPONENT.match(path.rsplit(".", 1)[-1]):
            return path, type_name
    path, type_name = entries[-1]
    return path, type_name or None
