"""Spec files: YAML, TOML and JSON carrying one tree, read into a validated :class:`Spec`.

    version: 1
    rules:
      - name: video-blocks            # optional
        match: "blocks.*.attn"        # glob, or {module, layers, min/max_seq_len, grid}
        grid: {T: 16, H: 48, W: 80}   # optional axis names for expressions
        pattern: {neighborhood: {shape: [T, H, W], window: [7, 17, 33]}}

Validation collects every problem of a file into one :class:`SpecError` with file, line (YAML
always; TOML for keys the cheap line scan below finds; JSON only for syntax errors), key path,
the value and what is allowed. Syntax errors stop there; everything else is reported together.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import KeyPath, Problem, Problems, SpecError
from .expr import SITE_SYMBOLS, ExpressionError, parse_expression
from .patterns import Pattern
from .rules import MatchCondition, Rule, Spec, check_grid_axis
from .templates import check_pattern

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["FORMATS", "SPEC_VERSION", "dump_spec", "load_spec", "loads_spec", "spec_from_tree"]

SPEC_VERSION = 1
#: File suffix -> format name.
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
_TOP_KEYS = ("version", "rules")
_RULE_KEYS = ("name", "match", "grid", "pattern")

Lines = dict[KeyPath, int]


def load_spec(spec: str | os.PathLike | Mapping | Spec) -> Spec:
    """A validated :class:`Spec` from a file path (.yaml/.yml/.toml/.json) or a plain dict.

    Raises :class:`SpecError` listing every problem (never a bare KeyError or traceback).
    """
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        return spec_from_tree(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_spec: expected a path or a dict, got {type(spec).__name__}")
    path = Path(spec)
    source = str(spec)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SpecError([Problem((), f"unknown spec file type {path.suffix or '(none)'!r}; "
                                     f"expected one of {', '.join(FORMATS)}")], source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([Problem((), f"cannot read the spec file: {reason}")], source) from None
    return loads_spec(text, fmt, source)


def loads_spec(text: str, format: str, source: str | None = None) -> Spec:
    """A validated Spec from text in ``format`` ("yaml", "toml" or "json")."""
    readers = {"yaml": _read_yaml, "toml": _read_toml, "json": _read_json}
    if format not in readers:
        raise ValueError(f"loads_spec: expected format yaml, toml or json, got {format!r}")
    tree, lines, found = readers[format](text, source)
    return spec_from_tree(tree, source, lines, found)


# --------------------------------------------------------------------------------------------
# Readers: (tree, line of each key path, problems the reader saw)


def _syntax_error(source: str | None, line: int | None, message: str) -> SpecError:
    return SpecError([Problem((), f"syntax error: {message}", line)], source)


def _read_yaml(text: str, source: str | None) -> tuple[Any, Lines, list[Problem]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        tree = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        message = " ".join(str(getattr(e, "problem", None) or e).split())
        raise _syntax_error(source, mark.line + 1 if mark else None, message) from None
    finally:
        loader.dispose()
    lines: Lines = {}
    duplicates = Problems(source, lines)
    if node is not None:
        _yaml_lines(node, (), lines, duplicates)
    return tree, lines, duplicates.items


def _yaml_lines(node: yaml.Node, path: KeyPath, lines: Lines, problems: Problems) -> None:
    """Record the line of every key and list item; PyYAML keeps the last of duplicate keys
    silently, so they are errors here."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            here = (*path, key)
            if key in seen:
                problems.add(here, f"duplicate key {key!r} (first given on line {seen[key]})",
                             line)
                continue
            seen[key] = line
            lines[here] = line
            _yaml_lines(value_node, here, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _yaml_lines(item, (*path, i), lines, problems)


def _read_json(text: str, source: str | None) -> tuple[Any, Lines, list[Problem]]:
    try:
        return json.loads(text), {}, []
    except json.JSONDecodeError as e:
        raise _syntax_error(source, e.lineno, f"{e.msg} (column {e.colno})") from None


_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)")


def _read_toml(text: str, source: str | None) -> tuple[Any, Lines, list[Problem]]:
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_AT.search(str(e))
        raise _syntax_error(source, int(m.group(1)) if m else None, str(e)) from None
    return tree, _toml_lines(text), []


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\s\"'-]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_.\-\s]+?)\s*=")


def _toml_lines(text: str) -> Lines:
    """Lines of table headers and ``key =`` lines: a cheap scan, good for what specs use
    (``[[rules]]``, ``[rules.pattern.sliding]``, bare keys). Unusual TOML only loses lines."""
    lines: Lines = {}
    counts: dict[KeyPath, int] = {}
    table: KeyPath = ()
    for number, raw in enumerate(text.splitlines(), start=1):
        header = _TOML_HEADER.match(raw)
        if header:
            table = _toml_table(header.group(2), header.group(1) == "[[", counts)
            lines.setdefault(table, number)
            continue
        key = _TOML_KEY.match(raw)
        if key:
            parts = tuple(p.strip() for p in key.group(1).split("."))
            lines.setdefault((*table, *parts), number)
    return lines


def _toml_table(dotted: str, array: bool, counts: dict[KeyPath, int]) -> KeyPath:
    path: KeyPath = ()
    names = [p.strip().strip("\"'") for p in dotted.split(".")]
    for n, name in enumerate(names):
        path = (*path, name)
        last = n == len(names) - 1
        if last and array:
            counts[path] = counts.get(path, 0) + 1
            path = (*path, counts[path] - 1)
        elif path in counts:  # a table inside the latest element of an array of tables
            path = (*path, counts[path] - 1)
    return path


# --------------------------------------------------------------------------------------------
# Validation


def spec_from_tree(tree: Any, source: str | None = None, lines: Mapping | None = None,
                   found: Iterable[Problem] = ()) -> Spec:
    """Validate a plain spec tree; raise SpecError with every problem found (``found``: those
    a reader already saw, such as duplicate YAML keys)."""
    problems = Problems(source, lines)
    problems.extend(found)
    lines = problems.lines
    if not isinstance(tree, Mapping):
        problems.add((), f"expected a mapping with keys version and rules, got {tree!r}")
        problems.raise_if_any()
    for key in tree:
        if key not in _TOP_KEYS:
            problems.add((key,), f"unknown top-level key {key!r}; allowed: version, rules")
    version = tree.get("version")
    if "version" not in tree:
        problems.add((), f"missing key 'version'; expected version: {SPEC_VERSION}")
    elif type(version) is not int or version != SPEC_VERSION:
        problems.add(("version",), f"expected version: {SPEC_VERSION} (the only spec version "
                                   f"so far), got version={version!r}")
    raw_rules = tree.get("rules")
    rules: list[Rule] = []
    if "rules" not in tree:
        problems.add((), "missing key 'rules'; expected a list of {match, pattern} rules")
    elif not isinstance(raw_rules, list):
        problems.add(("rules",), f"expected a list of {{match, pattern}} rules, "
                                 f"got {raw_rules!r}")
    else:
        names: dict[str, int] = {}
        for index, raw in enumerate(raw_rules):
            rule = _rule(raw, index, names, problems, source)
            if rule is not None:
                rules.append(rule)
    problems.raise_if_any()
    return Spec(tuple(rules), source=source)


def _rule(raw: Any, index: int, names: dict[str, int], problems: Problems,
          source: str | None) -> Rule | None:
    path: KeyPath = ("rules", index)
    before = len(problems.items)
    if not isinstance(raw, Mapping):
        problems.add(path, f"expected a rule mapping with keys {', '.join(_RULE_KEYS)}, "
                           f"got {raw!r}")
        return None
    for key in raw:
        if key not in _RULE_KEYS:
            problems.add((*path, key), f"unknown rule key {key!r}; allowed: "
                                       f"{', '.join(_RULE_KEYS)}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        problems.add((*path, "name"), f"expected a non-empty string, got name={name!r}")
    elif name is not None and name in names:
        problems.add((*path, "name"), f"duplicate rule name {name!r} (also rules[{names[name]}])")
    elif name is not None:
        names[name] = index
    for key in ("match", "pattern"):
        if key not in raw:
            problems.add(path, f"missing key {key!r}; every rule needs match and pattern "
                               f"(match: '*' matches every site, pattern: dense leaves it)")
    match = (MatchCondition.from_tree(raw["match"], (*path, "match"), problems)
             if "match" in raw else None)
    grid = _rule_grid(raw.get("grid"), (*path, "grid"), problems)
    fixed = [n for n, _ in (match.grid or ())] if match is not None else []
    for axis in fixed:
        if any(axis == n for n, _ in grid):
            problems.add((*path, "grid", axis), f"grid axis {axis!r} is also given in match.grid;"
                                                " give it once")
    axes = (*SITE_SYMBOLS, *fixed, *(n for n, _ in grid))
    template = (check_pattern(raw["pattern"], (*path, "pattern"), axes, problems)
                if "pattern" in raw else None)
    if len(problems.items) > before or match is None or template is None:
        return None
    return Rule(name=name, match=match, template=template, grid=tuple(grid), index=index,
                source=source, lines=problems.lines)


def _rule_grid(tree: Any, path: KeyPath, problems: Problems) -> list[tuple[str, Any]]:
    """A rule's ``grid:``: axis -> int or expression of the site symbols."""
    if tree is None:
        return []
    if not isinstance(tree, Mapping) or not 1 <= len(tree) <= 3:
        problems.add(path, f"expected 1 to 3 axes like {{T: 16, H: 48, W: 80}}, got {tree!r}")
        return []
    out = []
    for name, size in tree.items():
        why = check_grid_axis(name)
        if why:
            problems.add((*path, name), why)
        elif isinstance(size, str):
            try:
                out.append((name, parse_expression(size, SITE_SYMBOLS)))
            except ExpressionError as e:
                problems.add((*path, name), str(e))
        elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.add((*path, name), f"expected an integer >= 1 or an expression of "
                                        f"{', '.join(SITE_SYMBOLS)}, got {name}={size!r}")
        else:
            out.append((name, size))
    return out


# --------------------------------------------------------------------------------------------
# Writers


def dump_spec(spec: Spec | Mapping, format: str) -> str:
    """The spec as text in ``format`` ("yaml", "toml" or "json"); loads back equal."""
    tree = spec.to_dict() if isinstance(spec, Spec) else dict(spec)
    if format == "yaml":
        return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
    if format == "json":
        return json.dumps(tree, indent=2) + "\n"
    if format == "toml":
        return _toml_dumps(tree)
    raise ValueError(f"dump_spec: expected format yaml, toml or json, got {format!r}")


def _toml_dumps(tree: Mapping) -> str:
    """TOML for a spec tree: top-level scalars, then one ``[[rules]]`` table per rule with
    inline values (the stdlib reads TOML but does not write it)."""
    out = [f"{key} = {_toml_value(value)}" for key, value in tree.items() if key != "rules"]
    for rule in tree.get("rules", []):
        out += ["", "[[rules]]"]
        out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(out) + "\n"


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, Pattern):
        value = value.to_dict()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}"
                                for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"dump_spec: TOML cannot hold {value!r} (no null in TOML)")
