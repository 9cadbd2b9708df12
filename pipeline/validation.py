"""Check inputs exactly as the Cog server does, without the server.

coglet (Cog 0.23's Rust server) drops unknown fields, then validates the request's ``input``
against ``components.schemas.Input`` of ``.cog/openapi_schema.json`` with the Rust ``jsonschema``
crate, and answers 422 with one ``detail`` entry per problem::

    {"loc": ["body", "input", "iterations"], "msg": "5000 is greater than the maximum of 1000",
     "type": "value_error"}
    {"loc": ["body", "input", "prompt"], "msg": "Field required", "type": "value_error.missing"}

This module evaluates the same schema (built from the request model, ``pipeline.inputs``) the same
way and words each problem as the crate does
(numbers and strings as ``serde_json`` writes them), in the server's order: fields by name,
each field's rules by keyword name, missing fields last. ``validate_inputs`` then applies the
defaults and returns the inputs with their defaults.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from typing import Any

from .inputs import server_input_schema
from .jsontext import serde_json

# Keywords that carry no rule: documentation, Cog's extensions, OpenAPI's ``nullable`` (which
# the server's JSON Schema validator ignores too).
_ANNOTATIONS = {"title", "description", "default", "nullable", "deprecated", "format", "writeOnly", "readOnly"}

log = logging.getLogger("didp")


class InputError(ValueError):
    """Invalid inputs; ``errors`` is the server's 422 ``detail`` list for the same input."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        super().__init__("; ".join(f"{error['loc'][-1]}: {_plain(error['msg'])}" for error in errors))


def _plain(message: str) -> str:
    """A 422 message in plain words where the schema's are cryptic: ``\\S`` means "not blank"."""
    blank = re.fullmatch(r'(.*) does not match "\\S"', message, re.DOTALL)
    return f"{blank[1]} is blank: give some text" if blank else message


# -- the schema -----------------------------------------------------------------------------------


@cache
def input_schema() -> dict:
    """The schema the server checks ``input`` against (``.cog/openapi_schema.json``'s Input, which
    ``tests/test_inputs.py`` keeps equal to this), from the request model."""
    from .request import Request

    return server_input_schema(Request.input_specs())


# -- the rules -----------------------------------------------------------------------------------------


def _is_type(value: Any, kind: str) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list | tuple),
        "object": isinstance(value, dict),
        "number": number,
        # JSON Schema (draft 6 on) counts 3.0 as an integer, and so does the server
        "integer": number and (isinstance(value, int) or value.is_integer()),
    }[kind]


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(value: Any, schema: dict) -> list[str]:
    """The messages for ``value`` against one property's schema, keywords in name order."""
    messages: list[str] = []
    for keyword in sorted(schema):
        rule = schema[keyword]
        if keyword in _ANNOTATIONS or keyword.startswith("x-"):
            continue
        if keyword == "allOf":
            for part in rule:
                messages += _check(value, part)
        elif keyword == "type":
            if not any(_is_type(value, kind) for kind in ([rule] if isinstance(rule, str) else rule)):
                expected = f'type "{rule}"' if isinstance(rule, str) else "types " + ", ".join(f'"{k}"' for k in rule)
                messages.append(f"{serde_json(value)} is not of {expected}")
        elif keyword == "enum":
            if not any(_json_equal(value, option) for option in rule):
                messages.append(f"{serde_json(value)} is not one of {serde_json(rule)}")
        elif keyword == "minimum":
            if _is_number(value) and value < rule:
                messages.append(f"{serde_json(value)} is less than the minimum of {serde_json(rule)}")
        elif keyword == "maximum":
            if _is_number(value) and value > rule:
                messages.append(f"{serde_json(value)} is greater than the maximum of {serde_json(rule)}")
        elif keyword == "minLength":
            if isinstance(value, str) and len(value) < rule:
                messages.append(f"{serde_json(value)} is shorter than {rule} character{'' if rule == 1 else 's'}")
        elif keyword == "maxLength":
            if isinstance(value, str) and len(value) > rule:
                messages.append(f"{serde_json(value)} is longer than {rule} character{'' if rule == 1 else 's'}")
        elif keyword == "pattern":
            if isinstance(value, str) and re.search(rule, value) is None:
                messages.append(f'{serde_json(value)} does not match "{rule}"')
        else:
            raise NotImplementedError(f"schema keyword {keyword!r} is not supported by pipeline.validation")
    return messages


def input_errors(values: Any, schema: dict | None = None) -> list[dict]:
    """The server's 422 ``detail`` list for ``{"input": values}`` (empty when valid)."""
    schema = input_schema() if schema is None else schema
    if values is None:  # the server reads a null input as {}
        values = {}
    if not isinstance(values, dict):
        return [_error("__root__", f'{serde_json(values)} is not of type "object"')]
    properties = schema.get("properties", {})
    errors = [
        _error(name, message)
        for name in sorted(properties)
        if name in values
        for message in _check(values[name], properties[name])
    ]
    errors += [
        _error(name, "Field required", "value_error.missing")
        for name in schema.get("required", [])
        if name not in values
    ]
    return errors


def _error(field: str, msg: str, kind: str = "value_error") -> dict:
    return {"loc": ["body", "input", field], "msg": msg, "type": kind}


# -- the keyword arguments -------------------------------------------------------------------------------


def validate_inputs(values: dict, schema: dict | None = None) -> dict:
    """Inputs as ``Predictor.run`` receives them: checked, defaults applied, in signature order.

    Raises ``InputError`` (a ``ValueError``) whose ``errors`` equal the server's 422 ``detail``
    for the same input. Unknown fields are dropped with a warning, as the server drops them.
    Whole floats for integer inputs become ints, as the Cog SDK normalises them.
    """
    schema = input_schema() if schema is None else schema
    properties = schema.get("properties", {})
    unknown = sorted(set(values) - set(properties))
    if unknown:
        log.warning("unknown inputs ignored: %s", ", ".join(unknown))
    known = {name: value for name, value in values.items() if name in properties}
    errors = input_errors(known, schema)
    if errors:
        raise InputError(errors)
    kwargs = {}
    for name, prop in sorted(properties.items(), key=lambda item: item[1].get("x-order", 0)):
        value = known[name] if name in known else prop.get("default")
        kind = prop.get("type") or next((part.get("type") for part in prop.get("allOf", [])), None)
        if kind == "integer" and isinstance(value, float):
            value = int(value)
        elif kind == "number" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    return kwargs
