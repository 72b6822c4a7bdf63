"""Spec expressions: what they compute, and that hostile text never runs."""

from __future__ import annotations

import pytest
import sympy

from spcompile.spec.expr import (
    MAX_LENGTH,
    SITE_SYMBOLS,
    Expression,
    ExpressionError,
    parse_expression,
    to_number,
)

NAMES = (*SITE_SYMBOLS, "T", "H", "W")
SITE = {"seq_len": 61440, "kv_len": 61440, "num_heads": 24, "head_dim": 128,
        "T": 16, "H": 48, "W": 80}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("seq_len // 8", 7680),
        ("seq_len / 8", 7680),
        ("min(seq_len // 4, 16384)", 15360),
        ("max(1, T - 9)", 7),
        ("floor(seq_len / 7)", 61440 // 7),
        ("ceil(seq_len / 7)", -(-61440 // 7)),
        ("T * H * W", 61440),
        ("seq_len % 1000", 440),
        ("2 ** 10", 1024),
        ("-(-seq_len // 3)", 20480),
        ("0.5 * head_dim", 64),
        ("num_heads - 4", 20),
        ("  W//4 + 1  ", 21),
    ],
)
def test_expressions_evaluate(text, expected):
    value = parse_expression(text, NAMES).evaluate(SITE)
    assert value == expected and type(value) is int


def test_symbols_are_the_names_used():
    assert parse_expression("min(T, 7) * W", NAMES).symbols == {"T", "W"}
    assert parse_expression("64", NAMES).symbols == frozenset()


def test_equal_whatever_the_spelling():
    assert parse_expression("seq_len//4", NAMES) == parse_expression("floor(seq_len / 4)", NAMES)
    assert parse_expression("seq_len//4", NAMES) != parse_expression("seq_len//2", NAMES)


def test_non_integer_result_is_an_error_naming_the_value():
    with pytest.raises(ExpressionError, match=r"'seq_len / 7' gave 8777\.14.*expected an integer"):
        parse_expression("seq_len / 7", NAMES).evaluate(SITE)


def test_float_allowed_where_not_integer():
    assert parse_expression("1 / 4", NAMES, integer=False).evaluate({}) == 0.25


@pytest.mark.parametrize("text", ["seq_len / (T - 16)", "seq_len % (T - 16)",
                                  "seq_len // (T - 16)"])
def test_division_by_zero_is_an_error(text):
    with pytest.raises(ExpressionError, match=r"finite number|cannot be computed"):
        parse_expression(text, NAMES).evaluate(SITE)


@pytest.mark.parametrize("text", ["1 % 0", "seq_len // 0"])
def test_constant_division_by_zero_is_an_error(text):
    with pytest.raises(ExpressionError, match=r"finite number|cannot be computed"):
        parse_expression(text, NAMES).evaluate(SITE)


def test_missing_symbol_is_named():
    with pytest.raises(ExpressionError, match="needs head_dim"):
        parse_expression("head_dim // 2", NAMES).evaluate({"seq_len": 1})


def test_symbolic_size_is_not_a_number():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    with pytest.raises(ExpressionError, match="not a number"):
        parse_expression("seq_len // 8", NAMES).evaluate({"seq_len": s0})


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(ExpressionError, match=r"unknown name 'seq_lne' \(did you mean 'seq_len'"):
        parse_expression("seq_lne // 8", NAMES)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("__import__('os').system('touch /tmp/pwned')", "attribute access|calling"),
        ("__import__('os')", "calling __import__ is not allowed"),
        ("().__class__", "attribute access"),
        ("().__class__.__bases__[0].__subclasses__()", "calling|attribute|indexing"),
        ("seq_len.__class__", "attribute access"),
        ("lambda: 1", "lambda"),
        ("(lambda x: x)(1)", "calling"),
        ("eval('1')", "calling eval"),
        ("exec('import os')", "calling exec"),
        ("open('/etc/passwd')", "calling open"),
        ("Symbol('x')", "calling Symbol"),
        ("[x for x in ()]", "comprehension"),
        ("seq_len if 1 else 2", "if/else"),
        ("seq_len[0]", "indexing"),
        ("'text'", "literal 'text'"),
        ("True", "literal True"),
        ("seq_len > 4", "comparison"),
        ("seq_len ^ 2", "use \\*\\* for powers"),
        ("min(*[1, 2])", "arguments|a list"),
        ("floor(seq_len, 2)", "takes 1 arguments"),
        ("max(a=1)", "keyword"),
        ("9 ** 9 ** 9", "exponent"),
        ("seq_len ** seq_len", "exponent"),
        ("2 ** 2 ** 2 ** 2", "exponent|powers"),
        ("(x := 1)", ":="),
        ("seq_len; 1", "not an expression"),
        ("import os", "not an expression"),
        ("", "not an expression"),
        ("floor", "must be called"),
    ],
)
def test_hostile_or_unsupported_text_is_refused(text, why):
    with pytest.raises(ExpressionError, match=why):
        parse_expression(text, NAMES)


def test_long_text_is_refused_before_parsing():
    with pytest.raises(ExpressionError, match=f"at most {MAX_LENGTH}"):
        parse_expression("1+" * MAX_LENGTH + "1", NAMES)


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(ExpressionError):
        parse_expression("(" * 150 + "1" + ")" * 150, NAMES)


def test_refused_text_runs_nothing(tmp_path, monkeypatch):
    """The classic escape hatch must neither run nor create the file."""
    target = tmp_path / "pwned"
    text = f"__import__('pathlib').Path('{target}').touch()"
    with pytest.raises(ExpressionError):
        parse_expression(text, NAMES)
    assert not target.exists()


def test_to_number_accepts_whole_floats():
    assert to_number(sympy.Float(64.0), integer=True, text="x") == 64
    assert isinstance(Expression("1", sympy.Integer(1)).evaluate({}), int)
