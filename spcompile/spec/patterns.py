"""Sparsity patterns: versioned dataclasses whose ``allowed`` method is the exact semantics.

Each pattern answers one question, "may query i see key j?", for integer tensors i and j that
broadcast against each other (DESIGN.md, "Patterns and their exact semantics"). ``allowed`` is
written to be read against the spec, not to be fast: the tile planner decides which tiles need
it at all, and the kernels evaluate the same predicate only on partial tiles.

1-D patterns align queries bottom-right when ``q_len != kv_len`` (FlashAttention's convention
for decoding against a KV cache): query i sits at position ``i + kv_len - q_len``.

Patterns round-trip through plain dicts (``to_dict`` / ``pattern_from_dict``), which is what the
spec files carry; each class has a ``version`` so that the tree can evolve.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .args import as_bool, as_int, one_of, per_axis_bool, per_axis_int

__all__ = [
    "PATTERNS",
    "AnyOf",
    "BlockLayout",
    "Blocked",
    "Dense",
    "Global",
    "Neighborhood",
    "Pattern",
    "PerHead",
    "Sliding",
    "Strided",
    "TopK",
    "pattern_from_dict",
]


class Pattern:
    """Base class. ``kind`` is the key a spec file uses for the pattern."""

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    #: True when the mask is known from positions alone (everything but TopK).
    static: ClassVar[bool] = True

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        """Bool tensor, broadcast of i and j: may query i see key j."""
        raise NotImplementedError(f"{type(self).__name__} has no position-only mask")

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ValueError if the pattern cannot apply to these sequence lengths."""

    def __post_init__(self) -> None:
        self._validate()
        self._seal()

    def _validate(self) -> None:
        """Check and normalize the arguments (each dataclass pattern overrides this)."""

    def _seal(self) -> None:
        """Cache the canonical key; every constructor ends with this.

        Computed eagerly so that code traced by dynamo only reads a string attribute of a
        constant (torch 2.11's dynamo cannot pass frozen dataclasses to helper calls).
        """
        key = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_key", key)

    @property
    def key(self) -> str:
        """Canonical JSON of the pattern's spec tree: equal patterns have equal keys."""
        return self._key  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any] | str:
        values = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value == f.default or (
                f.default_factory is not dataclasses.MISSING and value == f.default_factory()
            ):
                continue
            values[f.name] = _plain(value)
        return {self.kind: values}

    def __or__(self, other: Pattern) -> AnyOf:
        if not isinstance(other, Pattern):
            return NotImplemented
        return AnyOf(self, other)


def _plain(value: Any) -> Any:
    """Tuples to lists (recursively), so dicts serialize to YAML/TOML/JSON alike."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _store_int(pattern: Pattern, owner: str, name: str, *, minimum: int | None = None) -> None:
    """Check an integer field and keep it as a plain int: numpy and sympy integers and 0-d int
    tensors are accepted (``as_int``) and must not reach ``to_dict`` / the canonical key."""
    object.__setattr__(pattern, name, as_int(owner, name, getattr(pattern, name), minimum=minimum))


def _offset(q_len: int, kv_len: int) -> int:
    """Bottom-right alignment: query i is at position i + offset."""
    return kv_len - q_len


# --------------------------------------------------------------------------------------------
# Dense


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query sees every key: the site is left as it is."""

    kind: ClassVar[str] = "dense"

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        return torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)

    def to_dict(self) -> str:
        return "dense"


# --------------------------------------------------------------------------------------------
# Sliding window


@dataclass(frozen=True)
class Sliding(Pattern):
    """1-D local window, FlashAttention semantics: ``p - left <= j <= p + right``.

    Give either ``window`` (keys seen per query, the query included) or ``left``/``right``.
    With ``causal``, right is 0 and ``window=W`` means left = W - 1. Without it, ``window=W``
    splits like NATTEN: left = W // 2, right = W - 1 - W // 2.
    """

    kind: ClassVar[str] = "sliding"
    window: int | None = None
    left: int | None = None
    right: int | None = None
    causal: bool = False

    def _validate(self) -> None:
        owner = "Sliding"
        as_bool(owner, "causal", self.causal)
        if self.window is None and self.left is None and self.right is None:
            raise ValueError(f"{owner}: expected window=W or left=/right=, got neither")
        if self.window is not None:
            if self.left is not None or self.right is not None:
                raise ValueError(
                    f"{owner}: expected either window or left/right, got window={self.window}, "
                    f"left={self.left}, right={self.right}"
                )
            _store_int(self, owner, "window", minimum=1)
        else:
            if self.left is not None:
                _store_int(self, owner, "left", minimum=0)
            if self.right is not None:
                _store_int(self, owner, "right", minimum=0)
            if self.causal and self.right not in (None, 0):
                raise ValueError(
                    f"{owner}: causal means right=0, got right={self.right} with causal=True"
                )

    @property
    def left_extent(self) -> int:
        if self.window is not None:
            return self.window - 1 if self.causal else self.window // 2
        return self.left or 0

    @property
    def right_extent(self) -> int:
        if self.causal:
            return 0
        if self.window is not None:
            return self.window - 1 - self.window // 2
        return self.right or 0

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        p = i + _offset(q_len, kv_len)
        return (j >= p - self.left_extent) & (j <= p + self.right_extent)


# --------------------------------------------------------------------------------------------
# Neighborhood (GNA)


def neighborhood_axis_allowed(
    qi: Tensor, kj: Tensor, length: int, window: int, stride: int, dilation: int, causal: bool
) -> Tensor:
    """NATTEN's 1-D rule on one axis, coordinates qi, kj in [0, length). See DESIGN.md."""
    same_group = (qi % dilation) == (kj % dilation)
    group = qi % dilation
    group_len = length // dilation + (group < length % dilation).to(qi.dtype)
    i, j = qi // dilation, kj // dilation
    if causal:
        leader = torch.minimum((i // stride) * stride + stride - 1, group_len - 1)
        inside = (j <= i) & (leader - j < window)
    else:
        wl = window // 2
        wr = window // 2 + window % 2 - 1
        leader = torch.minimum((i // stride) * stride + stride // 2, group_len - 1)
        center = torch.maximum(torch.minimum(leader, group_len - 1 - wr), torch.full_like(i, wl))
        # clamp(leader, wl, L_g - 1 - wr): wl <= L_g - 1 - wr always holds since window <= L_g.
        inside = (j >= center - wl) & (j <= center + wr)
    return same_group & inside


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """N-d Generalized Neighborhood Attention over a row-major token grid (NATTEN's definition).

    ``shape`` is the token grid (1-3 axes); ``window``, ``stride``, ``dilation`` and ``causal``
    take one value for every axis or one per axis. stride 1 is standard neighborhood attention,
    stride == window is blocked attention, window == axis length is full attention on that axis.
    """

    kind: ClassVar[str] = "neighborhood"
    shape: tuple[int, ...] = ()
    window: tuple[int, ...] | int = 1
    stride: tuple[int, ...] | int = 1
    dilation: tuple[int, ...] | int = 1
    causal: tuple[bool, ...] | bool = False

    def _validate(self) -> None:
        owner = "Neighborhood"
        if isinstance(self.shape, int) and not isinstance(self.shape, bool):
            object.__setattr__(self, "shape", (self.shape,))
        shape = self.shape
        if not isinstance(shape, Sequence) or isinstance(shape, str) or not 1 <= len(shape) <= 3:
            raise TypeError(f"{owner}: expected shape to be 1 to 3 integers, got shape={shape!r}")
        n = len(shape)
        shape = per_axis_int(owner, "shape", shape, n, minimum=1)
        window = per_axis_int(owner, "window", self.window, n, minimum=1)
        stride = per_axis_int(owner, "stride", self.stride, n, minimum=1)
        dilation = per_axis_int(owner, "dilation", self.dilation, n, minimum=1)
        causal = per_axis_bool(owner, "causal", self.causal, n)
        for a in range(n):
            if window[a] * dilation[a] > shape[a]:
                raise ValueError(
                    f"{owner}: expected window * dilation <= shape on every axis, got "
                    f"window={window[a]}, dilation={dilation[a]}, shape={shape[a]} on axis {a}"
                )
            if stride[a] > window[a]:
                raise ValueError(
                    f"{owner}: expected stride <= window on every axis, got stride={stride[a]}, "
                    f"window={window[a]} on axis {a}"
                )
        for name, value in (("shape", shape), ("window", window), ("stride", stride),
                            ("dilation", dilation), ("causal", causal)):
            object.__setattr__(self, name, value)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        if q_len != self.num_tokens or kv_len != self.num_tokens:
            raise ValueError(
                f"Neighborhood: the grid {'x'.join(map(str, self.shape))} holds {self.num_tokens} "
                f"tokens, but the site has q_len={q_len}, kv_len={kv_len}"
            )

    def coords(self, t: Tensor) -> list[Tensor]:
        """Row-major grid coordinates of flat token indices t, one tensor per axis."""
        out = []
        for a in range(len(self.shape)):
            inner = math.prod(self.shape[a + 1 :])
            out.append((t // inner) % self.shape[a])
        return out

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        self.check_lengths(q_len, kv_len)
        result = None
        for a, (qi, kj) in enumerate(zip(self.coords(i), self.coords(j), strict=True)):
            axis = neighborhood_axis_allowed(
                qi, kj, self.shape[a], self.window[a], self.stride[a], self.dilation[a],
                self.causal[a],
            )
            result = axis if result is None else result & axis
        assert result is not None
        return result

    def to_dict(self) -> dict[str, Any]:
        n = len(self.shape)
        values: dict[str, Any] = {"shape": list(self.shape), "window": _compact(self.window)}
        if self.stride != (1,) * n:
            values["stride"] = _compact(self.stride)
        if self.dilation != (1,) * n:
            values["dilation"] = _compact(self.dilation)
        if self.causal != (False,) * n:
            values["causal"] = _compact(self.causal)
        return {self.kind: values}


def _compact(values: tuple) -> Any:
    """A per-axis tuple as one value when every axis agrees, else as a list."""
    return values[0] if len(set(values)) == 1 else list(values)


# --------------------------------------------------------------------------------------------
# Strided (Sparse Transformer)


@dataclass(frozen=True)
class Strided(Pattern):
    """Child et al. (2019). With d = p - j:

    - ``variant="strided"``: ``0 <= d < local`` or ``d % stride == 0`` (non-causal: ``|d| < local``
      or ``d % stride == 0``);
    - ``variant="fixed"``: ``p // stride == j // stride`` or ``j % stride >= stride - summary``.

    ``causal`` (default true) adds ``j <= p``.
    """

    kind: ClassVar[str] = "strided"
    local: int = 0
    stride: int = 1
    variant: str = "strided"
    summary: int = 1
    causal: bool = True

    def _validate(self) -> None:
        owner = "Strided"
        one_of(owner, "variant", self.variant, ("strided", "fixed"))
        _store_int(self, owner, "local", minimum=0)
        _store_int(self, owner, "stride", minimum=1)
        _store_int(self, owner, "summary", minimum=1)
        as_bool(owner, "causal", self.causal)
        if self.variant == "fixed" and self.summary > self.stride:
            raise ValueError(
                f"{owner}: expected summary <= stride, got summary={self.summary}, "
                f"stride={self.stride}"
            )

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        p = i + _offset(q_len, kv_len)
        d = p - j
        if self.variant == "strided":
            near = (d >= 0) & (d < self.local) if self.causal else d.abs() < self.local
            out = near | (d % self.stride == 0)
        else:
            out = (p // self.stride == j // self.stride) | (
                j % self.stride >= self.stride - self.summary
            )
        return out & (j <= p) if self.causal else out


# --------------------------------------------------------------------------------------------
# Blocked


@dataclass(frozen=True)
class Blocked(Pattern):
    """Block-diagonal (chunked local) attention: ``p // block == j // block``."""

    kind: ClassVar[str] = "blocked"
    block: int = 1
    causal: bool = False

    def _validate(self) -> None:
        _store_int(self, "Blocked", "block", minimum=1)
        as_bool("Blocked", "causal", self.causal)

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        p = i + _offset(q_len, kv_len)
        out = p // self.block == j // self.block
        return out & (j <= p) if self.causal else out


# --------------------------------------------------------------------------------------------
# Global tokens


@dataclass(frozen=True)
class Global(Pattern):
    """Global tokens: key columns every query sees and, with ``rows``, queries that see every key.

    The global set G is the union of ``first`` (positions < first: attention sinks), ``every``
    (positions p with p % every == 0: vertical stripes) and ``indices``.
    """

    kind: ClassVar[str] = "global"
    first: int = 0
    every: int = 0
    indices: tuple[int, ...] = ()
    columns: bool = True
    rows: bool = False
    causal: bool = False

    def _validate(self) -> None:
        owner = "Global"
        _store_int(self, owner, "first", minimum=0)
        _store_int(self, owner, "every", minimum=0)
        if isinstance(self.indices, (str, bytes)) or not isinstance(self.indices, Iterable):
            raise TypeError(f"{owner}: expected indices to be a list of integers, "
                            f"got indices={self.indices!r}")
        indices = tuple(sorted({as_int(owner, "indices[]", x, minimum=0) for x in self.indices}))
        object.__setattr__(self, "indices", indices)
        as_bool(owner, "columns", self.columns)
        as_bool(owner, "rows", self.rows)
        as_bool(owner, "causal", self.causal)
        if not (self.first or self.every or self.indices):
            raise ValueError(f"{owner}: expected at least one of first, every, indices, got none")
        if not (self.columns or self.rows):
            raise ValueError(f"{owner}: expected columns or rows (or both) to be true")

    def is_global(self, t: Tensor) -> Tensor:
        """Which positions t are global tokens; a position < 0 (a query placed before key 0 by
        bottom-right alignment when q_len > kv_len) is no token, so never global."""
        out = t < self.first
        if self.every:
            out = out | (t % self.every == 0)
        if self.indices:
            out = out | torch.isin(t, torch.tensor(self.indices, dtype=t.dtype))
        return out & (t >= 0)

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        p = i + _offset(q_len, kv_len)
        shape = torch.broadcast_shapes(p.shape, j.shape)
        out = torch.zeros(shape, dtype=torch.bool)
        if self.columns:
            out = out | self.is_global(j)
        if self.rows:
            out = out | self.is_global(p)
        return out & (j <= p) if self.causal else out


# --------------------------------------------------------------------------------------------
# Block layouts (DeepSpeed SparsityConfig vocabulary)

LAYOUT_KINDS = ("bigbird", "longformer", "fixed", "variable", "explicit")


@dataclass(frozen=True, init=False)
class BlockLayout(Pattern):
    """A block-level layout over ``block``-token blocks, as DeepSpeed's sparsity configs name them.

    - ``bigbird``: ``local`` sliding blocks centred on the diagonal, ``global_blocks`` first block
      rows and columns, ``random`` random blocks per row drawn from ``seed``.
    - ``longformer``: ``local`` sliding blocks plus global blocks ``global_indices`` (rows and
      columns; default the first ``global_blocks``).
    - ``fixed``: blocks grouped in windows of ``local``; the last ``global_blocks`` of each window
      are columns everyone sees (rows too with ``rows``).
    - ``variable``: windows of ``local_windows`` blocks (the last size repeats) plus global block
      columns ``global_indices`` (rows too with ``rows``).
    - ``explicit``: ``layout``, a 0/1 matrix of block rows x block columns.

    Random blocks come from a CPU ``torch.Generator`` seeded with ``seed``: identical in every
    process and on every rank.
    """

    kind: ClassVar[str] = "block_layout"
    layout_kind: str = "bigbird"
    block: int = 64
    local: int = 3
    global_blocks: int = 1
    random: int = 0
    seed: int = 0
    global_indices: tuple[int, ...] = ()
    local_windows: tuple[int, ...] = ()
    rows: bool = False
    layout: tuple[tuple[int, ...], ...] | None = None
    causal: bool = False

    def __init__(
        self, kind: str = "bigbird", block: int = 64, local: int = 3, global_blocks: int = 1,
        random: int = 0, seed: int = 0, global_indices: Iterable[int] = (),
        local_windows: Iterable[int] = (), rows: bool = False,
        layout: Sequence[Sequence[int]] | None = None, causal: bool = False,
    ) -> None:
        # ``kind`` (the layout family, DeepSpeed's word) is stored as ``layout_kind``: the class
        # attribute ``kind`` is the pattern's spec key, "block_layout".
        values = dict(layout_kind=kind, block=block, local=local, global_blocks=global_blocks,
                      random=random, seed=seed, global_indices=tuple(global_indices),
                      local_windows=tuple(local_windows), rows=rows,
                      layout=None if layout is None else tuple(tuple(r) for r in layout),
                      causal=causal)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def _validate(self) -> None:
        owner = "BlockLayout"
        one_of(owner, "kind", self.layout_kind, LAYOUT_KINDS)
        _store_int(self, owner, "block", minimum=1)
        _store_int(self, owner, "local", minimum=0)
        _store_int(self, owner, "global_blocks", minimum=0)
        _store_int(self, owner, "random", minimum=0)
        _store_int(self, owner, "seed")
        as_bool(owner, "rows", self.rows)
        as_bool(owner, "causal", self.causal)
        object.__setattr__(self, "global_indices", tuple(
            as_int(owner, "global_indices[]", x, minimum=0) for x in self.global_indices))
        object.__setattr__(self, "local_windows", tuple(
            as_int(owner, "local_windows[]", x, minimum=1) for x in self.local_windows))
        if self.layout_kind == "explicit":
            if self.layout is None:
                raise ValueError(f"{owner}: kind 'explicit' needs layout (a 0/1 block matrix)")
            rows = tuple(tuple(int(bool(x)) for x in row) for row in self.layout)
            if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
                raise ValueError(f"{owner}: expected layout to be a non-empty rectangular 0/1 "
                                 f"matrix, got {len(rows)} rows of lengths "
                                 f"{sorted({len(r) for r in rows})}")
            object.__setattr__(self, "layout", rows)
        elif self.layout is not None:
            raise ValueError(f"{owner}: layout is only for kind 'explicit', "
                             f"got kind={self.layout_kind!r}")
        if self.layout_kind == "variable" and not self.local_windows:
            raise ValueError(f"{owner}: kind 'variable' needs local_windows, e.g. [4, 8]")
        if self.layout_kind == "fixed" and (self.local < 1 or self.global_blocks > self.local):
            raise ValueError(f"{owner}: kind 'fixed' needs 1 <= global_blocks <= local, got "
                             f"local={self.local}, global_blocks={self.global_blocks}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        values = out[self.kind]
        values.pop("layout_kind", None)
        return {self.kind: {"kind": self.layout_kind, **values}}

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        if self.layout is not None:
            n_rows, n_cols = len(self.layout), len(self.layout[0])
            need_rows, need_cols = -(-kv_len // self.block), -(-kv_len // self.block)
            if (n_rows, n_cols) != (need_rows, need_cols):
                raise ValueError(
                    f"BlockLayout: layout is {n_rows}x{n_cols} blocks, but kv_len={kv_len} with "
                    f"block={self.block} needs {need_rows}x{need_cols}"
                )

    def block_mask(self, n_blocks: int) -> Tensor:
        """Bool [n_blocks, n_blocks]: which (query block, key block) pairs are allowed."""
        r = torch.arange(n_blocks)[:, None]
        c = torch.arange(n_blocks)[None, :]
        kind = self.layout_kind
        if kind == "explicit":
            assert self.layout is not None
            return torch.tensor(self.layout, dtype=torch.bool)
        if kind in ("bigbird", "longformer"):
            half = self.local // 2
            mask = (c - r).abs() <= half
            globals_ = self.global_indices or tuple(range(self.global_blocks))
            g = torch.isin(torch.arange(n_blocks), torch.tensor(globals_, dtype=torch.long))
            mask = mask | g[None, :] | g[:, None]
            if kind == "bigbird" and self.random:
                mask = mask | self._random_blocks(n_blocks)
            return mask
        if kind == "fixed":
            mask = r // self.local == c // self.local
            # The last global_blocks of every window, a short last window's included (as
            # DeepSpeed's FixedSparsityConfig places them).
            blocks = torch.arange(n_blocks)
            window_end = ((blocks // self.local + 1) * self.local).clamp_max(n_blocks)
            g = blocks >= window_end - self.global_blocks
        else:  # variable
            window_of = torch.empty(n_blocks, dtype=torch.long)
            start, w, sizes = 0, 0, list(self.local_windows)
            while start < n_blocks:
                size = sizes[min(w, len(sizes) - 1)]
                window_of[start : start + size] = w
                start, w = start + size, w + 1
            mask = window_of[:, None] == window_of[None, :]
            g = torch.isin(torch.arange(n_blocks),
                           torch.tensor(self.global_indices, dtype=torch.long))
        mask = mask | g[None, :]
        if self.rows:
            mask = mask | g[:, None]
        return mask

    def _random_blocks(self, n_blocks: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        out = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
        for r in range(n_blocks):
            limit = r + 1 if self.causal else n_blocks
            pick = torch.randperm(limit, generator=gen)[: self.random]
            out[r, pick] = True
        return out

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        self.check_lengths(q_len, kv_len)
        p = i + _offset(q_len, kv_len)
        n_blocks = -(-kv_len // self.block)
        mask = self.block_mask(n_blocks)
        # A query before key 0 (q_len > kv_len) has no block row: it sees nothing.
        out = mask[p.clamp_min(0) // self.block, j // self.block] & (p >= 0)
        return out & (j <= p) if self.causal else out


# --------------------------------------------------------------------------------------------
# Dynamic top-k blocks


@dataclass(frozen=True)
class TopK(Pattern):
    """Data-dependent block selection (NSA / MInference / XAttention style).

    Per query block of ``block`` tokens, keep the ``sink`` first key blocks, the ``local`` key
    blocks ending at the diagonal one, and beyond those the ``k`` best-scoring key blocks (or the
    fewest reaching cumulative probability ``coverage``). Scores come from mean-pooled q and k.
    ``share_gqa`` makes the heads of one GQA group share a selection. The exact selection rule is
    :func:`spcompile.spec.topk.select_blocks`.
    """

    kind: ClassVar[str] = "topk"
    static: ClassVar[bool] = False
    block: int = 64
    k: int | None = None
    coverage: float | None = None
    sink: int = 0
    local: int = 1
    causal: bool = False
    share_gqa: bool = False

    def _validate(self) -> None:
        owner = "TopK"
        _store_int(self, owner, "block", minimum=1)
        _store_int(self, owner, "sink", minimum=0)
        _store_int(self, owner, "local", minimum=0)
        as_bool(owner, "causal", self.causal)
        as_bool(owner, "share_gqa", self.share_gqa)
        if (self.k is None) == (self.coverage is None):
            raise ValueError(f"{owner}: expected exactly one of k or coverage, got "
                             f"k={self.k}, coverage={self.coverage}")
        if self.k is not None:
            _store_int(self, owner, "k", minimum=0)
        else:
            if isinstance(self.coverage, bool) or not isinstance(self.coverage, (int, float)):
                raise TypeError(f"{owner}: expected coverage to be a number in (0, 1], "
                                f"got coverage={self.coverage!r}")
            if not 0.0 < float(self.coverage) <= 1.0:
                raise ValueError(f"{owner}: expected 0 < coverage <= 1, "
                                 f"got coverage={self.coverage}")

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        if q_len != kv_len:
            raise NotImplementedError(
                f"TopK: q_len != kv_len (got {q_len} and {kv_len}) is not supported yet"
            )


# --------------------------------------------------------------------------------------------
# Composition


@dataclass(frozen=True, init=False)
class AnyOf(Pattern):
    """Union: a key is allowed if any member allows it; ``causal`` applies on top."""

    kind: ClassVar[str] = "any_of"
    patterns: tuple[Pattern, ...] = ()
    causal: bool = False

    def __init__(self, *patterns: Pattern, causal: bool = False) -> None:
        flat: list[Pattern] = []
        for p in patterns:
            if not isinstance(p, Pattern):
                raise TypeError(f"AnyOf: expected patterns, got {p!r}")
            if isinstance(p, AnyOf) and not p.causal:
                flat.extend(p.patterns)
            elif isinstance(p, (PerHead, TopK)):
                raise NotImplementedError(
                    f"AnyOf: a {type(p).__name__} cannot be a member of a union (yet); "
                    "put the union inside PerHead instead"
                )
            else:
                flat.append(p)
        if len(flat) < 1:
            raise ValueError("AnyOf: expected at least one pattern")
        object.__setattr__(self, "patterns", tuple(flat))
        object.__setattr__(self, "causal", as_bool("AnyOf", "causal", causal))
        self._seal()

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        for p in self.patterns:
            p.check_lengths(q_len, kv_len)

    def allowed(self, i: Tensor, j: Tensor, q_len: int, kv_len: int) -> Tensor:
        out = self.patterns[0].allowed(i, j, q_len, kv_len)
        for p in self.patterns[1:]:
            out = out | p.allowed(i, j, q_len, kv_len)
        if self.causal:
            out = out & (j <= i + _offset(q_len, kv_len))
        return out

    def to_dict(self) -> dict[str, Any]:
        members = [p.to_dict() for p in self.patterns]
        if self.causal:
            return {self.kind: {"patterns": members, "causal": True}}
        return {self.kind: members}


HeadSelector = int | range | Sequence[int] | str


def parse_heads(selector: Any, num_heads: int | None = None) -> tuple[int, ...]:
    """Head indices from an int, a range, a list, or a string like ``"0-3"``, ``"4-"``, ``"7"``.

    An open-ended string ("4-") needs ``num_heads``.
    """
    owner = "PerHead"
    if isinstance(selector, range):
        return tuple(selector)
    if isinstance(selector, str):
        text = selector.replace(" ", "")
        lo, dash, hi = text.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{owner}: expected heads like '0-3', '4-' or '7', got {selector!r}")
        if not dash:
            return (int(lo),)
        if not hi:
            if num_heads is None:
                raise ValueError(f"{owner}: open range {selector!r} needs the number of heads")
            return tuple(range(int(lo), num_heads))
        if int(hi) < int(lo):
            raise ValueError(f"{owner}: expected a range low-high with low <= high, "
                             f"got {selector!r}")
        return tuple(range(int(lo), int(hi) + 1))
    if isinstance(selector, (list, tuple)):
        return tuple(as_int(owner, "heads[]", h, minimum=0) for h in selector)
    return (as_int(owner, "heads", selector, minimum=0),)


def _selector_to_plain(selector: Any) -> Any:
    if isinstance(selector, range) and selector.step == 1:
        return f"{selector.start}-{selector.stop - 1}"
    if isinstance(selector, range):
        return list(selector)
    return _plain(selector)


@dataclass(frozen=True, init=False)
class PerHead(Pattern):
    """Different patterns on different heads of one site.

    ``PerHead({range(0, 4): Dense(), range(4, 32): Sliding(window=1024, causal=True)})``. Every
    head must be covered exactly once; check with :meth:`pattern_for_head` or :meth:`resolve`.
    """

    kind: ClassVar[str] = "heads"
    groups: tuple[tuple[Any, Pattern], ...] = field(default=())

    def __init__(self, heads: Mapping[Any, Pattern] | Iterable[tuple[Any, Pattern]]) -> None:
        items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
        if not items:
            raise ValueError("PerHead: expected at least one (heads, pattern) entry")
        groups = []
        for selector, pattern in items:
            if not isinstance(pattern, Pattern) or isinstance(pattern, PerHead):
                raise TypeError(f"PerHead: expected a (non-PerHead) pattern for heads "
                                f"{selector!r}, got {pattern!r}")
            if not (isinstance(selector, str) and selector.endswith("-")):
                parse_heads(selector)  # validate now; open ranges resolve with num_heads
            groups.append((selector if not isinstance(selector, list) else tuple(selector),
                           pattern))
        object.__setattr__(self, "groups", tuple(groups))
        self._seal()

    def resolve(self, num_heads: int) -> tuple[Pattern, ...]:
        """One pattern per head; every head covered exactly once."""
        per_head: list[Pattern | None] = [None] * num_heads
        for selector, pattern in self.groups:
            for h in parse_heads(selector, num_heads):
                if h >= num_heads:
                    raise ValueError(f"PerHead: head {h} given, but the site has "
                                     f"{num_heads} heads")
                if per_head[h] is not None:
                    raise ValueError(f"PerHead: head {h} is given more than one pattern")
                per_head[h] = pattern
        missing = [h for h, p in enumerate(per_head) if p is None]
        if missing:
            raise ValueError(f"PerHead: heads {missing} have no pattern (of {num_heads} heads)")
        return tuple(p for p in per_head if p is not None)

    def runs(self, num_heads: int) -> list[tuple[int, int, Pattern]]:
        """(start, stop, pattern) of each run of consecutive heads sharing a pattern: one
        kernel launch each, on views of q, k and v."""
        per_head = self.resolve(num_heads)
        runs, start = [], 0
        while start < num_heads:
            stop = start + 1
            while stop < num_heads and per_head[stop] == per_head[start]:
                stop += 1
            runs.append((start, stop, per_head[start]))
            start = stop
        return runs

    def pattern_for_head(self, head: int, num_heads: int) -> Pattern:
        return self.resolve(num_heads)[head]

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        for _, p in self.groups:
            p.check_lengths(q_len, kv_len)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: [{"heads": _selector_to_plain(s), "pattern": p.to_dict()}
                            for s, p in self.groups]}


# --------------------------------------------------------------------------------------------
# Registry and dict round trip

PATTERNS: dict[str, type[Pattern]] = {
    cls.kind: cls
    for cls in (Dense, Sliding, Neighborhood, Strided, Blocked, BlockLayout, TopK, Global,
                AnyOf, PerHead)
}


def pattern_from_dict(tree: Any) -> Pattern:
    """Build a pattern from the plain tree a spec file carries (the inverse of ``to_dict``).

    Raises ``ValueError``/``TypeError`` naming the key; :mod:`spcompile.spec.loading` adds the
    file, line and key path.
    """
    if isinstance(tree, Pattern):
        return tree
    if tree == "dense" or tree == {"dense": None} or tree == {"dense": {}}:
        return Dense()
    if not isinstance(tree, Mapping) or len(tree) != 1:
        raise TypeError(
            f"expected a pattern: 'dense' or a mapping with exactly one key out of "
            f"{', '.join(PATTERNS)}, got {tree!r}"
        )
    ((kind, body),) = tree.items()
    if kind not in PATTERNS:
        raise ValueError(f"unknown pattern {kind!r}; expected one of {', '.join(PATTERNS)}")
    cls = PATTERNS[kind]
    if cls is AnyOf:
        if isinstance(body, Mapping):
            members, causal = body.get("patterns"), body.get("causal", False)
            extra = set(body) - {"patterns", "causal"}
            if extra:
                raise ValueError(f"any_of: unknown keys {sorted(extra)}; "
                                 "expected 'patterns' and 'causal'")
        else:
            members, causal = body, False
        if not isinstance(members, list) or not members:
            raise TypeError(f"any_of: expected a non-empty list of patterns, got {members!r}")
        return AnyOf(*(pattern_from_dict(m) for m in members), causal=causal)
    if cls is PerHead:
        if not isinstance(body, list) or not body:
            raise TypeError("heads: expected a list of {heads: ..., pattern: ...} entries, "
                            f"got {body!r}")
        entries = []
        for entry in body:
            if not isinstance(entry, Mapping) or set(entry) != {"heads", "pattern"}:
                raise TypeError(f"heads: expected entries with keys 'heads' and 'pattern', "
                                f"got {entry!r}")
            entries.append((entry["heads"], pattern_from_dict(entry["pattern"])))
        return PerHead(entries)
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise TypeError(f"{kind}: expected a mapping of arguments, got {body!r}")
    body = dict(body)
    if cls is BlockLayout and body.get("layout") is not None:
        body["layout"] = tuple(tuple(r) for r in body["layout"])
    public = {"kind" if f.name == "layout_kind" else f.name
              for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(body) - public
    if unknown:
        raise ValueError(f"{kind}: unknown key(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(sorted(public))}")
    for key in ("indices", "global_indices", "local_windows", "shape"):
        if isinstance(body.get(key), list):
            body[key] = tuple(body[key])
    for key in ("window", "stride", "dilation", "causal"):
        if cls is Neighborhood and isinstance(body.get(key), list):
            body[key] = tuple(body[key])
    return cls(**body)
