"""Spec errors that name the file, the line, the key path, the value and what is allowed.

A spec is validated in one pass that collects every problem instead of stopping at the first,
so that a user fixes a file in one round trip. :class:`Problems` is that collector; it knows the
line of each key (where the file format has one) and turns into one :class:`SpecError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

#: A key path into the spec tree: ("rules", 1, "pattern", "neighborhood", "window").
KeyPath = tuple[str | int, ...]

__all__ = ["KeyPath", "Problem", "Problems", "SpecError", "format_path", "suggest"]


def format_path(path: KeyPath) -> str:
    """``("rules", 1, "pattern", "sliding")`` -> ``rules[1].pattern.sliding``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def suggest(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'sliding'?)`` when a close choice exists, else ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Problem:
    """One mistake in a spec: where (key path, line if known) and what was expected/got."""

    path: KeyPath
    message: str
    line: int | None = None

    def format(self, source: str | None) -> str:
        where = source or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
        key = format_path(self.path)
        return f"{where}: {key}: {self.message}" if key else f"{where}: {self.message}"


class SpecError(ValueError):
    """Every problem found in one spec. ``str()`` gives one line per problem."""

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(p.format(self.source) for p in self.problems)


class Problems:
    """Collects problems; looks up the line of the deepest known prefix of each key path."""

    def __init__(self, source: str | None = None, lines: Mapping[KeyPath, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.items: list[Problem] = []

    def line_of(self, path: KeyPath) -> int | None:
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return None

    def add(self, path: KeyPath, message: str, line: int | None = None) -> None:
        """Record a problem; its line is ``line`` or that of the deepest known key."""
        path = tuple(path)
        self.items.append(Problem(path, message, line or self.line_of(path)))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.items.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.items)

    def raise_if_any(self) -> None:
        """Raise one SpecError with every problem, in file order where lines are known."""
        if self.items:
            ordered = sorted(self.items, key=lambda p: p.line if p.line is not None else 1 << 62)
            raise SpecError(ordered, self.source)
