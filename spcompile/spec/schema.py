"""A JSON Schema (draft 2020-12) of the spec format, for editors' completion and checks.

The pattern part is generated from the pattern dataclasses in ``PATTERNS`` (their fields and
annotations), so a new pattern kind appears in the schema without touching this file; a field
type this module has no schema for fails loudly in :func:`spec_schema` (and in its test).
The schema is looser than :func:`~spcompile.spec.loading.load_spec` (it cannot check a window
against a shape, or an expression's names): ``spcompile validate`` is the full check.
"""

from __future__ import annotations

from typing import Any

from .expr import MAX_LENGTH
from .patterns import LAYOUT_KINDS, PATTERNS, AnyOf, Dense, PerHead
from .rules import MatchCondition
from .templates import pattern_arguments

__all__ = ["SCHEMA_ID", "spec_schema"]

SCHEMA_ID = "urn:spcompile:spec:v1"

_EXPR = {"$ref": "#/$defs/expression"}
_INT = {"anyOf": [{"type": "integer"}, _EXPR]}
_NUMBER = {"anyOf": [{"type": "number"}, _EXPR]}
_BOOL = {"type": "boolean"}
_NULL = {"type": "null"}


def _array(item: dict) -> dict:
    return {"type": "array", "items": item, "minItems": 1}


#: Annotation text of a pattern field -> the schema of its spec value.
_FIELD_SCHEMAS: dict[str, dict] = {
    "int": _INT,
    "int | None": {"anyOf": [_INT, _NULL]},
    "float | None": {"anyOf": [_NUMBER, _NULL]},
    "bool": _BOOL,
    "str": {"type": "string"},
    "tuple[int, ...]": {"anyOf": [_array(_INT), _INT]},
    "tuple[int, ...] | int": {"anyOf": [_INT, _array(_INT)]},
    "tuple[bool, ...] | bool": {"anyOf": [_BOOL, _array(_BOOL)]},
    "tuple[tuple[int, ...], ...] | None": {"anyOf": [_array(_array({"type": "integer"})),
                                                      _NULL]},
}

#: Fields whose strings are names, not expressions: their allowed values.
_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("strided", "variant"): ("strided", "fixed"),
    ("block_layout", "kind"): LAYOUT_KINDS,
}


def _leaf_schema(kind: str) -> dict:
    properties = {}
    for name, annotation in pattern_arguments(kind).items():
        if (kind, name) in _ENUMS:
            properties[name] = {"enum": list(_ENUMS[(kind, name)])}
        elif annotation in _FIELD_SCHEMAS:
            properties[name] = _FIELD_SCHEMAS[annotation]
        else:
            raise NotImplementedError(
                f"spec_schema: no JSON schema for {kind}.{name}: {annotation}; "
                "add it to spcompile.spec.schema._FIELD_SCHEMAS"
            )
    return {"type": ["object", "null"], "properties": properties,
            "additionalProperties": False}


def _kind_schema(kind: str) -> dict:
    pattern = {"$ref": "#/$defs/pattern"}
    if kind == Dense.kind:
        body: dict[str, Any] = {"anyOf": [_NULL, {"type": "object", "maxProperties": 0}]}
    elif kind == AnyOf.kind:
        body = {"anyOf": [
            _array(pattern),
            {"type": "object", "properties": {"patterns": _array(pattern), "causal": _BOOL},
             "required": ["patterns"], "additionalProperties": False},
        ]}
    elif kind == PerHead.kind:
        selector = {"anyOf": [{"type": "integer", "minimum": 0},
                              {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d*\s*)?$"},
                              _array({"type": "integer", "minimum": 0})]}
        body = _array({"type": "object", "properties": {"heads": selector, "pattern": pattern},
                       "required": ["heads", "pattern"], "additionalProperties": False})
    else:
        body = _leaf_schema(kind)
    return {"type": "object", "properties": {kind: body}, "required": [kind],
            "additionalProperties": False}


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of spec files (the same tree for YAML, TOML and JSON)."""
    grid_axis = r"^[A-Za-z_][A-Za-z0-9_]*$"
    size = {"type": "integer", "minimum": 1}
    layers = r"^\s*\d+(-\d*)?(\s*,\s*\d+(-\d*)?)*\s*$"
    match_properties = {
        "module": {"type": "string", "description": "glob over the module path"},
        "layers": {"anyOf": [{"type": "string", "pattern": layers},
                             {"type": "integer", "minimum": 0},
                             _array({"type": "integer", "minimum": 0})],
                   "description": "layer indices like '0-11' or '0-3,8,10-'"},
        "min_seq_len": size,
        "max_seq_len": size,
        "grid": {"type": "object", "propertyNames": {"pattern": grid_axis},
                 "additionalProperties": size, "minProperties": 1, "maxProperties": 3},
    }
    assert set(match_properties) == set(MatchCondition.KEYS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "spcompile sparsity spec",
        "description": "Rules mapping attention sites to sparsity patterns; first match wins, "
                       "unmatched sites stay dense.",
        "type": "object",
        "properties": {
            "version": {"const": 1},
            "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
        },
        "required": ["version", "rules"],
        "additionalProperties": False,
        "$defs": {
            "expression": {
                "type": "string", "maxLength": MAX_LENGTH,
                "description": "arithmetic over seq_len, kv_len, num_heads, head_dim and grid "
                               "axes with + - * / // % ** and min, max, floor, ceil",
            },
            "rule": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "match": {"anyOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "object", "properties": match_properties,
                         "additionalProperties": False},
                    ]},
                    "grid": {"type": "object", "propertyNames": {"pattern": grid_axis},
                             "additionalProperties": {"anyOf": [size, _EXPR]},
                             "minProperties": 1, "maxProperties": 3},
                    "pattern": {"$ref": "#/$defs/pattern"},
                },
                "required": ["match", "pattern"],
                "additionalProperties": False,
            },
            "pattern": {"oneOf": [{"const": "dense"}, *(_kind_schema(k) for k in PATTERNS)]},
        },
    }
