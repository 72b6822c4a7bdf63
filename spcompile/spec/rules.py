"""Rules: which attention site gets which pattern.

The backend describes each attention site it finds as a :class:`SiteKey` and asks
:meth:`Spec.match`; the first rule whose condition holds wins and unmatched sites stay dense.
Every "no" comes with a reason (:meth:`Rule.mismatch`, :meth:`Spec.why_not`) so that a report
can say why a site was left dense, and :meth:`Spec.unused_rules` names rules that matched no site
(usually a glob that does not fit the model's module names).
"""

from __future__ import annotations

import fnmatch
import keyword
import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sympy

from .errors import KeyPath, Problem, Problems, SpecError
from .expr import FUNCTIONS, SITE_SYMBOLS, Expression, ExpressionError
from .patterns import Pattern
from .templates import PatternTemplate, to_tree

__all__ = [
    "Match",
    "MatchCondition",
    "Rule",
    "SiteKey",
    "Spec",
    "check_glob",
    "check_grid_axis",
    "format_layers",
    "layer_from_path",
    "parse_layers",
]

Size = int | sympy.Expr


@dataclass(frozen=True)
class SiteKey:
    """What rule matching knows about one attention site.

    ``seq_len`` is the query length and ``kv_len`` the key length (defaults to ``seq_len``:
    self-attention); both may be sympy expressions under dynamic shapes. ``layer`` is the block
    index the site belongs to (see :func:`layer_from_path`). ``grid`` names the token grid when
    the backend knows it, e.g. ``{"T": 16, "H": 48, "W": 80}``; it is stored as a tuple of
    (axis, size) pairs so that the key stays hashable.
    """

    module_path: str
    layer: int | None = None
    seq_len: Size | None = None
    kv_len: Size | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    grid: Mapping[str, int] | tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.kv_len is None and self.seq_len is not None:
            object.__setattr__(self, "kv_len", self.seq_len)
        if isinstance(self.grid, Mapping):
            object.__setattr__(self, "grid", tuple(self.grid.items()))

    @property
    def grid_sizes(self) -> tuple[int, ...] | None:
        return None if self.grid is None else tuple(size for _, size in self.grid)

    def symbols(self) -> dict[str, Size]:
        """The site symbols expressions may use (those the site knows)."""
        values = {name: getattr(self, name) for name in SITE_SYMBOLS}
        return {k: v for k, v in values.items() if v is not None}


def layer_from_path(module_path: str) -> int | None:
    """The first integer component of a module path: ``model.layers.11.self_attn`` -> 11."""
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None


# --------------------------------------------------------------------------------------------
# Conditions

Layers = tuple[tuple[int, int | None], ...]
_LAYER_ITEM = re.compile(r"^(\d+)(?:(-)(\d*))?$")


def parse_layers(value: Any) -> Layers:
    """``"0-3,8,10-"``, an int, or a list of ints -> ((0, 3), (8, 8), (10, None)).

    Raises ValueError saying what is allowed.
    """
    allowed = "expected layers like '0-11', '0-3,8,10-' (10- is open-ended), an integer or a list"
    if isinstance(value, bool):
        raise ValueError(f"{allowed}, got {value!r}")
    if isinstance(value, int):
        items: list[str] = [str(value)]
    elif isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = [str(v) for v in value]
    elif isinstance(value, str) and value.strip():
        items = [part.strip() for part in value.split(",")]
    else:
        raise ValueError(f"{allowed}, got {value!r}")
    out = []
    for item in items:
        m = _LAYER_ITEM.match(item)
        if not m:
            raise ValueError(f"{allowed}, got {value!r} (bad part {item!r})")
        lo = int(m.group(1))
        hi = None if m.group(2) and not m.group(3) else int(m.group(3) or lo)
        if hi is not None and hi < lo:
            where = "" if item == value else f" in {value!r}"
            raise ValueError(f"expected ranges low-high with low <= high, got {item!r}{where}")
        out.append((lo, hi))
    return tuple(out)


def format_layers(layers: Layers) -> str:
    return ",".join(str(lo) if hi == lo else f"{lo}-" if hi is None else f"{lo}-{hi}"
                    for lo, hi in layers)


_GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.*?\[\]!\-]+$")


def check_glob(glob: Any) -> str | None:
    """Why ``glob`` is not a usable module-path glob, or None."""
    example = "expected a glob over the module path like 'blocks.*.attn'"
    if not isinstance(glob, str) or not glob.strip():
        return f"{example}, got {glob!r}"
    if "/" in glob:
        return f"{example} (module paths use dots, not slashes), got {glob!r}"
    if not _GLOB_CHARS.match(glob):
        return (f"{example}; allowed characters are letters, digits, _ . - and the wildcards "
                f"* ? [...], got {glob!r}")
    if glob.count("[") != glob.count("]"):
        return f"{example} with balanced [...], got {glob!r}"
    return None


def check_grid_axis(name: Any) -> str | None:
    """Why ``name`` cannot name a grid axis, or None."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        return f"expected a grid axis name like T, H or W, got {name!r}"
    if name in SITE_SYMBOLS or name in FUNCTIONS:
        return f"{name!r} is a built-in name; pick another grid axis name"
    return None


def _decide(op: Any, value: Size, bound: int) -> bool | None:
    """``op(value, bound)``, or None when a symbolic size leaves it undecided."""
    try:
        return bool(op(value, bound))
    except TypeError:
        return None


@dataclass(frozen=True)
class MatchCondition:
    """When a rule applies: a module-path glob plus optional layer and size conditions.

    ``grid`` (axis, size) pairs match sites of exactly that many tokens (and that grid, when the
    backend knows the site's grid); they also name the axes for expressions.
    """

    module: str = "*"
    layers: Layers | None = None
    min_seq_len: int | None = None
    max_seq_len: int | None = None
    grid: tuple[tuple[str, int], ...] | None = None

    KEYS = ("module", "layers", "min_seq_len", "max_seq_len", "grid")

    def mismatch(self, site: SiteKey) -> str | None:
        """Why ``site`` does not match, or None when it does."""
        if not fnmatch.fnmatchcase(site.module_path, self.module):
            return f"module path {site.module_path!r} does not match {self.module!r}"
        if self.layers is not None:
            if site.layer is None:
                return f"layers {format_layers(self.layers)} given, but the site has no layer"
            if not any(lo <= site.layer and (hi is None or site.layer <= hi)
                       for lo, hi in self.layers):
                return f"layer {site.layer} is not in {format_layers(self.layers)}"
        return self.size_mismatch(site)

    def size_mismatch(self, site: SiteKey) -> str | None:
        """The sequence-length and grid part of :meth:`mismatch`."""
        checks = [(self.min_seq_len, operator.ge, "min_seq_len"),
                  (self.max_seq_len, operator.le, "max_seq_len")]
        if self.grid is not None:
            checks.append((math.prod(s for _, s in self.grid), operator.eq, "the grid's size"))
        for bound, op, what in checks:
            if bound is None:
                continue
            if site.seq_len is None:
                return f"{what} is {bound}, but the site's seq_len is unknown"
            verdict = _decide(op, site.seq_len, bound)
            if verdict is None:
                return f"seq_len {site.seq_len} is symbolic; cannot decide {what} = {bound}"
            if not verdict:
                return f"seq_len {site.seq_len} does not satisfy {what} = {bound}"
        if self.grid is not None and site.grid_sizes is not None:
            want = tuple(s for _, s in self.grid)
            if site.grid_sizes != want:
                return f"site grid {site.grid_sizes} is not {want}"
        return None

    def to_tree(self) -> str | dict[str, Any]:
        if self.layers is None and self.min_seq_len is None and self.max_seq_len is None \
                and self.grid is None:
            return self.module
        tree: dict[str, Any] = {"module": self.module}
        if self.layers is not None:
            tree["layers"] = format_layers(self.layers)
        for key in ("min_seq_len", "max_seq_len"):
            if getattr(self, key) is not None:
                tree[key] = getattr(self, key)
        if self.grid is not None:
            tree["grid"] = dict(self.grid)
        return tree

    @classmethod
    def from_tree(cls, tree: Any, path: KeyPath, problems: Problems) -> MatchCondition | None:
        """Parse ``match:``; every problem goes to ``problems``."""
        before = len(problems.items)
        if isinstance(tree, str):
            why = check_glob(tree)
            if why:
                problems.add(path, why)
                return None
            return cls(module=tree)
        if not isinstance(tree, Mapping):
            problems.add(path, f"expected a glob string or a mapping with keys "
                               f"{', '.join(cls.KEYS)}, got {tree!r}")
            return None
        for key in tree:
            if key not in cls.KEYS:
                problems.add((*path, key), f"unknown key {key!r}; allowed: {', '.join(cls.KEYS)}")
        module = tree.get("module", "*")
        why = check_glob(module)
        if why:
            problems.add((*path, "module"), why)
        layers = None
        if "layers" in tree:
            try:
                layers = parse_layers(tree["layers"])
            except ValueError as e:
                problems.add((*path, "layers"), str(e))
        bounds = {}
        for key in ("min_seq_len", "max_seq_len"):
            value = tree.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                problems.add((*path, key), f"expected an integer >= 1, got {key}={value!r}")
            else:
                bounds[key] = value
        lo, hi = bounds.get("min_seq_len"), bounds.get("max_seq_len")
        if lo is not None and hi is not None and lo > hi:
            problems.add((*path, "max_seq_len"), f"expected min_seq_len <= max_seq_len, got "
                                                 f"min_seq_len={lo}, max_seq_len={hi}")
        grid = None
        if "grid" in tree:
            grid = _parse_fixed_grid(tree["grid"], (*path, "grid"), problems)
        if len(problems.items) > before:
            return None
        return cls(module=module, layers=layers, min_seq_len=lo, max_seq_len=hi, grid=grid)


def _parse_fixed_grid(tree: Any, path: KeyPath, problems: Problems
                      ) -> tuple[tuple[str, int], ...] | None:
    if not isinstance(tree, Mapping) or not 1 <= len(tree) <= 3:
        problems.add(path, f"expected 1 to 3 axes like {{T: 16, H: 48, W: 80}}, got {tree!r}")
        return None
    out = []
    for name, size in tree.items():
        why = check_grid_axis(name)
        if why:
            problems.add((*path, name), why)
        elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.add((*path, name), f"expected an integer >= 1, got {name}={size!r}")
        else:
            out.append((name, size))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Rules and specs


@dataclass(frozen=True)
class Rule:
    """One ``rules:`` entry: a condition and a pattern (or a template over site symbols).

    ``grid`` holds the rule's own ``grid:`` axes, each an int or an expression of the site
    symbols. ``index``, ``source`` and ``lines`` only serve error messages.
    """

    name: str | None
    match: MatchCondition
    template: Pattern | PatternTemplate
    grid: tuple[tuple[str, int | Expression], ...] = ()
    index: int = field(default=0, compare=False)
    source: str | None = field(default=None, compare=False, repr=False)
    lines: Mapping[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)

    def __hash__(self) -> int:
        return hash((self.name, self.match))

    @property
    def label(self) -> str:
        """What reports call the rule: its name, else its place in the file."""
        return self.name or f"rules[{self.index}]"

    @property
    def static_pattern(self) -> Pattern | None:
        """The pattern when it does not depend on the site, else None."""
        return self.template if isinstance(self.template, Pattern) else None

    def mismatch(self, site: SiteKey) -> str | None:
        return self.match.mismatch(site)

    def symbols(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Site symbol values plus this rule's grid axes."""
        out = dict(values)
        out.update(self.match.grid or ())
        problems = self._problems()
        for name, size in self.grid:
            if isinstance(size, Expression):
                try:
                    out[name] = size.evaluate(values)
                except ExpressionError as e:
                    problems.add(("rules", self.index, "grid", name), str(e))
            else:
                out[name] = size
        problems.raise_if_any()
        return out

    def resolve(self, values: Mapping[str, Any]) -> Pattern:
        """The pattern for these site symbol values (``seq_len``, ...); raises SpecError."""
        if isinstance(self.template, Pattern):
            return self.template
        symbols = self.symbols(values)
        problems = self._problems()
        pattern = self.template.build(symbols, ("rules", self.index, "pattern"), problems)
        if pattern is None:
            given = ", ".join(f"{k}={v}" for k, v in symbols.items())
            raise SpecError([Problem(p.path, f"{p.message} (with {given})", p.line)
                             for p in problems], self.source)
        return pattern

    def pattern_for(self, site: SiteKey) -> Pattern:
        """:meth:`resolve` for a site, checked against the site's lengths."""
        pattern = self.resolve(site.symbols())
        q, kv = _concrete(site.seq_len), _concrete(site.kv_len)
        if q is not None and kv is not None:
            try:
                pattern.check_lengths(q, kv)
            except (ValueError, NotImplementedError) as e:
                problems = self._problems()
                problems.add(("rules", self.index, "pattern"),
                             f"{e}; site {site.module_path!r} matched this rule: narrow its "
                             "match (min_seq_len, grid, a tighter glob) or fix the pattern")
                problems.raise_if_any()
        return pattern

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        if self.name is not None:
            tree["name"] = self.name
        tree["match"] = self.match.to_tree()
        if self.grid:
            tree["grid"] = {n: to_tree(v) for n, v in self.grid}
        tree["pattern"] = to_tree(self.template)
        return tree

    def _problems(self) -> Problems:
        return Problems(self.source, self.lines)


def _concrete(size: Size | None) -> int | None:
    """An int for a concrete size (int, sympy Integer), None for unknown or symbolic."""
    try:
        return operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        return None


class Match(NamedTuple):
    """The rule that matched a site and the pattern it gives that site."""

    rule: Rule
    pattern: Pattern


@dataclass(frozen=True)
class Spec:
    """A validated spec: rules in file order. ``source`` (the file) is not part of equality,
    so the same spec loaded from YAML, TOML and JSON compares equal."""

    rules: tuple[Rule, ...]
    source: str | None = field(default=None, compare=False)
    version: int = 1

    def match(self, site: SiteKey) -> Match | None:
        """The first rule whose condition holds, with the site's pattern; None: stay dense."""
        for rule in self.rules:
            if rule.mismatch(site) is None:
                return Match(rule, rule.pattern_for(site))
        return None

    def why_not(self, site: SiteKey) -> list[tuple[Rule, str]]:
        """For each rule before the one that matches (all, if none does): why it did not."""
        reasons = []
        for rule in self.rules:
            why = rule.mismatch(site)
            if why is None:
                break
            reasons.append((rule, why))
        return reasons

    def unused_rules(self, matched: Iterable[Rule]) -> list[Rule]:
        """Rules that are not in ``matched`` (the rules that matched some site)."""
        used = {id(r) for r in matched}
        return [r for r in self.rules if id(r) not in used]

    def unreachable_rules(self) -> list[tuple[Rule, Rule]]:
        """(rule, earlier rule) pairs where the earlier rule matches every site (``"*"`` with
        no conditions), so the later one can never match."""
        for n, rule in enumerate(self.rules):
            if rule.match == MatchCondition():
                return [(later, rule) for later in self.rules[n + 1 :]]
        return []

    def rule(self, name: str) -> Rule:
        """The rule called ``name`` (or ``rules[i]``), else a KeyError naming the rules."""
        for r in self.rules:
            if name in (r.name, f"rules[{r.index}]"):
                return r
        names = ", ".join(r.label for r in self.rules) or "(none)"
        raise KeyError(f"no rule named {name!r} in {self.source or 'the spec'}; rules: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rules": [r.to_dict() for r in self.rules]}
