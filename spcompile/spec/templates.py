"""Pattern trees from spec files: structure checks, expressions, and construction.

A rule's ``pattern:`` is the plain tree that :func:`~spcompile.spec.patterns.pattern_from_dict`
reads, except that numeric arguments may be expressions of site symbols. :func:`check_pattern`
walks the tree once at load time: it reports unknown kinds and keys with their exact key paths,
parses expressions, and, when no expression is left, constructs the pattern right away so that
argument errors surface at load time. A tree with symbols stays a :class:`PatternTemplate` until
the site's sizes are known; its leaves that use symbols are only constructed then, so their
other argument errors surface at match time (as a SpecError naming the same key path).

Construction goes through ``pattern_from_dict`` (the one definition of the tree), one pattern at
a time from the leaves up, so that an error names the leaf it came from.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import KeyPath, Problems, suggest
from .expr import Expression, ExpressionError, parse_expression
from .patterns import PATTERNS, AnyOf, Dense, Pattern, PerHead, pattern_from_dict

__all__ = ["PatternTemplate", "build_pattern", "check_pattern", "pattern_arguments", "to_tree"]

_COMPOSITES = (AnyOf.kind, PerHead.kind)


def pattern_arguments(kind: str) -> dict[str, str]:
    """The spec-file argument names of a leaf pattern kind, with their annotation text.

    BlockLayout's ``layout_kind`` field is spelled ``kind`` in spec files.
    """
    cls = PATTERNS[kind]
    return {
        ("kind" if f.name == "layout_kind" else f.name): str(f.type)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    }


def _is_dense(tree: Any) -> bool:
    return tree == "dense" or (isinstance(tree, Mapping) and len(tree) == 1
                               and "dense" in tree and tree["dense"] in (None, {}))


@dataclass(frozen=True)
class PatternTemplate:
    """A pattern tree whose arguments use site symbols; :meth:`build` makes the Pattern."""

    tree: Any
    symbols: frozenset[str]

    def to_dict(self) -> Any:
        return to_tree(self.tree)

    def build(self, values: Mapping[str, Any], path: KeyPath, problems: Problems
              ) -> Pattern | None:
        return build_pattern(self.tree, path, problems, values)


def to_tree(tree: Any) -> Any:
    """A plain tree again: patterns to dicts, expressions to their text, tuples to lists."""
    if isinstance(tree, (Pattern, PatternTemplate)):
        return tree.to_dict()
    if isinstance(tree, Expression):
        return tree.text
    if isinstance(tree, Mapping):
        return {k: to_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_tree(v) for v in tree]
    return tree


# --------------------------------------------------------------------------------------------
# Load time: structure and expressions


def check_pattern(tree: Any, path: KeyPath, names: Iterable[str], problems: Problems
                  ) -> Pattern | PatternTemplate | None:
    """Check a pattern tree; a Pattern when it has no symbols, else a template.

    Every problem goes to ``problems``; returns None when there was one.
    """
    before = len(problems.items)
    checked = _check(tree, path, tuple(names), problems)
    if len(problems.items) > before:
        return None
    symbols = _symbols(checked)
    if symbols:
        return PatternTemplate(checked, frozenset(symbols))
    return build_pattern(checked, path, problems, {})


def _symbols(tree: Any) -> set[str]:
    if isinstance(tree, Expression):
        return set(tree.symbols)
    if isinstance(tree, Mapping):
        return set().union(*(_symbols(v) for v in tree.values()))
    if isinstance(tree, (list, tuple)):
        return set().union(*(_symbols(v) for v in tree))
    return set()


def _check(tree: Any, path: KeyPath, names: tuple[str, ...], problems: Problems) -> Any:
    if isinstance(tree, Pattern) or _is_dense(tree):
        return tree
    kinds = ", ".join(PATTERNS)
    if isinstance(tree, str):
        if tree in PATTERNS:
            problems.add(path, f"pattern {tree!r} needs arguments; write it as a mapping, "
                               f"e.g. {{{tree}: {{...}}}}")
        else:
            problems.add(path, f"unknown pattern {tree!r}{suggest(tree, PATTERNS)}; "
                               f"expected one of {kinds}")
        return None
    if not isinstance(tree, Mapping) or len(tree) != 1:
        got = f"keys {sorted(map(str, tree))}" if isinstance(tree, Mapping) else repr(tree)
        problems.add(path, f"expected a pattern: 'dense' or a mapping with exactly one key out "
                           f"of {kinds}, got {got}")
        return None
    ((kind, body),) = tree.items()
    here = (*path, kind)
    if kind not in PATTERNS:
        problems.add(here, f"unknown pattern {kind!r}{suggest(kind, PATTERNS)}; "
                           f"expected one of {kinds}")
        return None
    if kind == "dense":
        problems.add(here, f"dense takes no arguments, got {body!r}")
        return None
    if kind == AnyOf.kind:
        return {kind: _check_any_of(body, here, names, problems)}
    if kind == PerHead.kind:
        return {kind: _check_heads(body, here, names, problems)}
    return {kind: _check_arguments(kind, body, here, names, problems)}


def _check_any_of(body: Any, here: KeyPath, names: tuple[str, ...], problems: Problems) -> Any:
    if isinstance(body, Mapping):
        extra = sorted(set(body) - {"patterns", "causal"})
        for key in extra:
            problems.add((*here, key), f"unknown key {key!r}; allowed: patterns, causal")
        members = body.get("patterns")
        if not isinstance(members, list) or not members:
            problems.add((*here, "patterns"), f"expected a non-empty list of patterns, "
                                              f"got {members!r}")
            return body
        checked = [_check(m, (*here, "patterns", i), names, problems)
                   for i, m in enumerate(members)]
        return {**body, "patterns": checked}
    if not isinstance(body, list) or not body:
        problems.add(here, f"expected a non-empty list of patterns, got {body!r}")
        return body
    return [_check(m, (*here, i), names, problems) for i, m in enumerate(body)]


def _check_heads(body: Any, here: KeyPath, names: tuple[str, ...], problems: Problems) -> Any:
    if not isinstance(body, list) or not body:
        problems.add(here, f"expected a list of {{heads: ..., pattern: ...}} entries, "
                           f"got {body!r}")
        return body
    out = []
    for i, entry in enumerate(body):
        if not isinstance(entry, Mapping) or set(entry) != {"heads", "pattern"}:
            got = sorted(map(str, entry)) if isinstance(entry, Mapping) else repr(entry)
            problems.add((*here, i), f"expected an entry with keys 'heads' and 'pattern', "
                                     f"got {got}")
            continue
        pattern = _check(entry["pattern"], (*here, i, "pattern"), names, problems)
        out.append({"heads": entry["heads"], "pattern": pattern})
    return out


def _check_arguments(kind: str, body: Any, here: KeyPath, names: tuple[str, ...],
                     problems: Problems) -> Any:
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        problems.add(here, f"expected a mapping of arguments, got {body!r}")
        return body
    arguments = pattern_arguments(kind)
    out = {}
    bad_expression = False
    for key, value in body.items():
        if key not in arguments:
            problems.add((*here, key), f"unknown argument {key!r}{suggest(key, arguments)}; "
                                       f"{kind} takes {', '.join(arguments)}")
            continue
        annotation = arguments[key]
        if "int" not in annotation and "float" not in annotation:
            out[key] = value  # names (variant: fixed) and flags are never expressions
            continue
        before = len(problems.items)
        out[key] = _parse_values(value, (*here, key), names, "float" not in annotation,
                                 problems)
        bad_expression |= len(problems.items) > before
    if not bad_expression and not _symbols(out):
        # Check the arguments now, even after an unknown key, so one pass reports them all.
        _construct({kind: out}, here, problems, out)
    return out


def _parse_values(value: Any, path: KeyPath, names: tuple[str, ...], integer: bool,
                  problems: Problems) -> Any:
    """Strings become expressions, inside lists too; other values pass through."""
    if isinstance(value, str):
        try:
            return parse_expression(value, names, integer=integer)
        except ExpressionError as e:
            problems.add(path, str(e))
            return value
    if isinstance(value, (list, tuple)):
        return [_parse_values(v, (*path, i), names, integer, problems)
                for i, v in enumerate(value)]
    return value


# --------------------------------------------------------------------------------------------
# Construction


def build_pattern(tree: Any, path: KeyPath, problems: Problems, values: Mapping[str, Any]
                  ) -> Pattern | None:
    """Substitute ``values`` into the expressions of a checked tree and construct the pattern.

    Returns None after adding every problem found to ``problems``.
    """
    if isinstance(tree, Pattern):
        return tree
    if _is_dense(tree):
        return Dense()
    ((kind, body),) = tree.items()
    here = (*path, kind)
    if kind == AnyOf.kind:
        listed = isinstance(body, list)
        members = body if listed else body["patterns"]
        prefix = here if listed else (*here, "patterns")
        built = [build_pattern(m, (*prefix, i), problems, values) for i, m in enumerate(members)]
        if any(b is None for b in built):
            return None
        return _construct({kind: built if listed else {**body, "patterns": built}}, here,
                          problems, {})
    if kind == PerHead.kind:
        entries = [{"heads": e["heads"],
                    "pattern": build_pattern(e["pattern"], (*here, i, "pattern"), problems,
                                             values)}
                   for i, e in enumerate(body)]
        if any(e["pattern"] is None for e in entries):
            return None
        return _construct({kind: entries}, here, problems, {})
    before = len(problems.items)
    resolved = {key: _substitute(v, (*here, key), problems, values) for key, v in body.items()}
    if len(problems.items) > before:
        return None
    return _construct({kind: resolved}, here, problems, resolved)


def _substitute(value: Any, path: KeyPath, problems: Problems, values: Mapping[str, Any]) -> Any:
    if isinstance(value, Expression):
        try:
            return value.evaluate(values)
        except ExpressionError as e:
            problems.add(path, str(e))
            return None
    if isinstance(value, list):
        return [_substitute(v, (*path, i), problems, values) for i, v in enumerate(value)]
    return value


_OWNER = re.compile(r"^[A-Z]\w*: ")
_GOT = re.compile(r"\bgot ([a-z_]\w*)")


def _construct(tree: Mapping, here: KeyPath, problems: Problems, arguments: Mapping) -> Any:
    """``pattern_from_dict`` with its error moved to the argument it names, when it names one."""
    try:
        return pattern_from_dict(tree)
    except (ValueError, TypeError, NotImplementedError) as e:
        message = _OWNER.sub("", str(e))
        named = _GOT.search(message)
        path = (*here, named.group(1)) if named and named.group(1) in arguments else here
        problems.add(path, message)
        return None
