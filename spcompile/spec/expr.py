"""Expressions in spec values: ``window: "seq_len // 8"``, ``shape: [T, H, W]``.

Spec files come from users, so their text must never reach ``eval``. ``sympy.parse_expr`` itself
evaluates its transformed token stream with ``eval``; instead we parse with :mod:`ast` (which
executes nothing), accept only a whitelist of node types (numbers, known names, arithmetic, and
calls of ``min``/``max``/``floor``/``ceil``), and build the sympy expression from that tree
ourselves. Anything else (attribute access, subscripts, lambdas, other calls, comprehensions,
strings) is rejected with a message naming what is allowed.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy

from .errors import suggest

__all__ = [
    "FUNCTIONS",
    "MAX_EXPONENT",
    "MAX_LENGTH",
    "SITE_SYMBOLS",
    "Expression",
    "ExpressionError",
    "parse_expression",
    "symbol",
    "to_number",
]

#: Names every site provides (``kv_len`` defaults to ``seq_len`` for self-attention).
SITE_SYMBOLS = ("seq_len", "kv_len", "num_heads", "head_dim")

FUNCTIONS: dict[str, Any] = {
    "min": sympy.Min,
    "max": sympy.Max,
    "floor": sympy.floor,
    "ceil": sympy.ceiling,
}
_ARITY = {"min": (1, 8), "max": (1, 8), "floor": (1, 1), "ceil": (1, 1)}

#: Longer text is refused before parsing: spec values are short, and this bounds parse cost.
MAX_LENGTH = 200
#: ``x ** n`` needs a literal n in [0, MAX_EXPONENT], at most two powers per expression, so that
#: ``9 ** 9 ** 9`` cannot make sympy build a number with hundreds of millions of digits.
MAX_EXPONENT = 64
_MAX_POWERS = 2

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: sympy.floor(a / b),
    ast.Mod: lambda a, b: sympy.Mod(a, b),
    ast.Pow: lambda a, b: a**b,
}


class ExpressionError(ValueError):
    """A spec expression that cannot be parsed, or whose value does not fit where it is used."""


def symbol(name: str) -> sympy.Symbol:
    """The one sympy symbol for ``name``: positive integers, so ``floor``/``Min`` simplify."""
    return sympy.Symbol(name, integer=True, positive=True)


@dataclass(frozen=True)
class Expression:
    """A parsed expression. Equal when the sympy expressions are equal, whatever the spelling;
    ``text`` is kept to write the spec back as the user wrote it."""

    text: str = field(compare=False)
    expr: sympy.Expr
    #: True where the pattern argument is an integer (everything but e.g. TopK.coverage).
    integer: bool = field(default=True, compare=False)

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s.name for s in self.expr.free_symbols)

    def evaluate(self, values: Mapping[str, Any]) -> int | float:
        """The value for these symbol values; int where ``integer``, else int or float."""
        missing = sorted(self.symbols - set(values))
        if missing:
            raise ExpressionError(
                f"{self.text!r} needs {', '.join(missing)}, which this site does not provide"
            )
        try:
            result = self.expr.subs({symbol(n): v for n, v in values.items()
                                     if n in self.symbols})
        except ArithmeticError as e:  # sympy raises for x % 0 once x is known
            raise ExpressionError(f"{self.text!r} cannot be computed ({e})") from None
        return to_number(result, integer=self.integer, text=self.text)

    def __str__(self) -> str:
        return self.text


def to_number(value: Any, *, integer: bool, text: str) -> int | float:
    """A sympy result as a Python int (or float where ``integer`` is False), or an error."""
    value = sympy.sympify(value)
    if not value.is_number:
        raise ExpressionError(
            f"{text!r} gave {value}, which is not a number (symbolic sizes need concrete values)"
        )
    if value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo) or not value.is_real:
        raise ExpressionError(f"{text!r} gave {value}, expected a finite number "
                              "(division by zero?)")
    if value.is_Integer:
        return int(value)
    as_float = float(value)
    if as_float.is_integer() and math.isfinite(as_float):
        return int(as_float)
    if integer:
        raise ExpressionError(
            f"{text!r} gave {as_float:g}, expected an integer; wrap it in floor() or ceil()"
        )
    return as_float


def parse_expression(text: str, names: Iterable[str], *, integer: bool = True) -> Expression:
    """Parse ``text`` into an :class:`Expression` over ``names`` (and nothing else)."""
    allowed = tuple(names)
    if not isinstance(text, str):
        raise ExpressionError(f"expected an expression string, got {text!r}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is {len(text)} characters long; at most "
                              f"{MAX_LENGTH} are allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        msg = e.msg if isinstance(e, SyntaxError) else str(e)
        raise ExpressionError(f"{text!r} is not an expression ({msg})") from None
    try:
        expr = _Builder(text, allowed).build(tree.body)
    except ArithmeticError as e:  # 1 % 0 fails while building
        raise ExpressionError(f"{text!r} cannot be computed ({e})") from None
    return Expression(text=text, expr=expr, integer=integer)


class _Builder:
    """Turns a whitelisted Python AST into a sympy expression, refusing everything else."""

    def __init__(self, text: str, names: tuple[str, ...]) -> None:
        self.text = text
        self.names = names
        self.powers = 0

    def fail(self, what: str) -> ExpressionError:
        return ExpressionError(
            f"{self.text!r}: {what}; expressions may use numbers, {self._names()}, "
            "+ - * / // % **, parentheses and min, max, floor, ceil"
        )

    def _names(self) -> str:
        return ", ".join(self.names) if self.names else "(no symbols here)"

    def build(self, node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(f"the literal {value!r} is not allowed")
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise self.fail(f"the literal {value!r} is not allowed")
                return sympy.Rational(repr(value))
            return sympy.Integer(value)
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return symbol(node.id)
            if node.id in FUNCTIONS:
                raise self.fail(f"{node.id} must be called, like {node.id}(...)")
            raise ExpressionError(
                f"{self.text!r}: unknown name {node.id!r}{suggest(node.id, self.names)}; "
                f"allowed names: {self._names()}"
            )
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.build(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if isinstance(node.op, ast.Pow):
                self._check_power(node)
            return _BINARY[type(node.op)](self.build(node.left), self.build(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
            raise self.fail("'^' is not allowed (use ** for powers)")
        if isinstance(node, ast.Call):
            return self._call(node)
        raise self.fail(f"{_describe(node)} is not allowed")

    def _check_power(self, node: ast.BinOp) -> None:
        self.powers += 1
        exponent = node.right
        if self.powers > _MAX_POWERS:
            raise self.fail(f"at most {_MAX_POWERS} powers are allowed")
        if not (isinstance(exponent, ast.Constant) and type(exponent.value) is int
                and 0 <= exponent.value <= MAX_EXPONENT):
            raise self.fail(f"the exponent of ** must be a whole number from 0 to {MAX_EXPONENT}")

    def _call(self, node: ast.Call) -> sympy.Expr:
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in FUNCTIONS:
            name = func.id if isinstance(func, ast.Name) else _describe(func)
            raise self.fail(f"calling {name} is not allowed (only min, max, floor, ceil)")
        if node.keywords:
            raise self.fail(f"{func.id}() takes no keyword arguments")
        lo, hi = _ARITY[func.id]
        if not lo <= len(node.args) <= hi:
            count = str(lo) if lo == hi else f"{lo} to {hi}"
            raise self.fail(f"{func.id}() takes {count} arguments, got {len(node.args)}")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail("*arguments are not allowed")
        return FUNCTIONS[func.id](*(self.build(a) for a in node.args))


def _describe(node: ast.AST) -> str:
    """A user-facing name for a rejected syntax node."""
    names = {
        ast.Attribute: "attribute access (.name)",
        ast.Subscript: "indexing ([...])",
        ast.Lambda: "lambda",
        ast.Compare: "comparison",
        ast.BoolOp: "and/or",
        ast.IfExp: "if/else",
        ast.Tuple: "a tuple",
        ast.List: "a list",
        ast.Dict: "a dict",
        ast.Set: "a set",
        ast.NamedExpr: ":=",
        ast.JoinedStr: "an f-string",
    }
    for cls, name in names.items():
        if isinstance(node, cls):
            return name
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        return "a comprehension"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"the operator {type(node.op).__name__}"
    return type(node).__name__
