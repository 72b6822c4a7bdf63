"""What a site's mask means, when it can be known at compile time.

HuggingFace models build their causal (or sliding-window) mask inside the compiled graph from
``arange`` and comparisons. When that subgraph depends on no graph input it can be evaluated
once at compile time (see :class:`~spcompile.passes.fxutil.Folder`); a mask that evaluates to
exactly causal becomes ``is_causal`` and is dropped, so the site is not left dense just because
the model spelled causality as a tensor. A mask that depends on inputs (padding) is kept as is.

Causality is bottom-right aligned (query ``i`` sees key ``j`` iff ``j <= i + kv_len - q_len``),
like FlashAttention and spcompile's patterns; that is also what HuggingFace builds with a KV
cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .fxutil import Folder, concrete_int, shape

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
    i = torch.arange(q, device=allowed.device)[:, None]
    j = torch.arange(kv, device=allowed.device)[None, :]
    causal = j <= i + (kv - q)
    if bool(allowed.all()):
        return MaskFacts(None, None, note="the mask allows every key; dropped", recognized=True)
    if torch.equal(allowed, causal):
        return MaskFacts(None, None, is_causal=True, recognized=True,
                         note="causal mask built in the graph; dropped for is_causal")
    window = int(allowed[-1].sum())
    if window >= 1 and torch.equal(allowed, causal & (j > i + (kv - q) - window)):
        return MaskFacts(mask, kind, is_causal=True, window=window, recognized=True,
                         note=f"causal sliding-window mask ({window} keys per query) built in "
                              f"the graph")
    return MaskFacts(mask, kind, recognized=True,
                     note="kept: a constant mask that is neither causal nor a causal window")


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
