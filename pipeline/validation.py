"""Check inputs exactly as the Cog server does, without the server.

coglet (Cog 0.23's Rust server) drops unknown fields, then validates the request's ``input``
against ``components.schemas.Input`` of ``.cog/openapi_schema.json`` with the Rust ``jsonschema``
crate, and answers 422 with one ``detail`` entry per problem::

    {"loc": ["body", "input", "iterations"], "msg": "5000 is greater than the maximum of 1000",
     "type": "value_error"}
    {"loc": ["body", "input", "prompt"], "msg": "Field required", "type": "value_error.missing"}

This module evaluates the same schema the same way and words each problem as the crate does
(numbers and strings as ``serde_json`` writes them), in the server's order: fields by name,
each field's rules by keyword name, missing fields last. ``validate_inputs`` then applies the
defaults and returns the keyword arguments for ``Predictor.run``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / ".cog" / "openapi_schema.json"
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
def _load(path: Path) -> dict:
    document = json.loads(path.read_text())
    schemas = document["components"]["schemas"]
    return _inline_refs(schemas["Input"], schemas)


def input_schema(path: Path = SCHEMA_PATH) -> dict:
    """``components.schemas.Input`` with its ``$ref`` (the choices' enums) inlined, as coglet does."""
    return _load(Path(path))


def _inline_refs(value: Any, schemas: dict) -> Any:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inline_refs(schemas[ref.rsplit("/", 1)[1]], schemas)
        return {key: _inline_refs(item, schemas) for key, item in value.items()}
    if isinstance(value, list):
        return [_inline_refs(item, schemas) for item in value]
    return value


# -- serde_json's text for a JSON value --------------------------------------------------------------


def json_text(value: Any) -> str:
    """A value as the server prints it in messages: compact JSON, keys sorted, serde_json numbers."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        # serde_json reads integers beyond 64 bits as floats
        return str(value) if -(2**63) <= value < 2**64 else _float_text(float(value))
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(json_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{json_text(value[k])}" for k in sorted(value))
            + "}"
        )
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _float_text(value: float) -> str:
    """Shortest round-trip digits; fixed notation for 1e-5 <= |x| < 1e16, else ``1e-7``/``1e+16``."""
    if not math.isfinite(value):
        raise ValueError(f"{value} is not valid JSON")
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    all_digits = "".join(map(str, digit_tuple))
    digits = all_digits.rstrip("0")
    exponent += len(all_digits) - len(digits)
    point = len(digits) + exponent  # 10**(point - 1) <= |value| < 10**point
    if exponent >= 0 and point <= 16:
        text = digits + "0" * exponent + ".0"
    elif 0 < point <= 16:
        text = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        mantissa = digits if len(digits) == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if point > 0 else '-'}{abs(point - 1)}"
    return sign + text


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
                messages.append(f"{json_text(value)} is not of {expected}")
        elif keyword == "enum":
            if not any(_json_equal(value, option) for option in rule):
                messages.append(f"{json_text(value)} is not one of {json_text(rule)}")
        elif keyword == "minimum":
            if _is_number(value) and value < rule:
                messages.append(f"{json_text(value)} is less than the minimum of {json_text(rule)}")
        elif keyword == "maximum":
            if _is_number(value) and value > rule:
                messages.append(f"{json_text(value)} is greater than the maximum of {json_text(rule)}")
        elif keyword == "minLength":
            if isinstance(value, str) and len(value) < rule:
                messages.append(f"{json_text(value)} is shorter than {rule} character{'' if rule == 1 else 's'}")
        elif keyword == "maxLength":
            if isinstance(value, str) and len(value) > rule:
                messages.append(f"{json_text(value)} is longer than {rule} character{'' if rule == 1 else 's'}")
        elif keyword == "pattern":
            if isinstance(value, str) and re.search(rule, value) is None:
                messages.append(f'{json_text(value)} does not match "{rule}"')
        else:
            raise NotImplementedError(f"schema keyword {keyword!r} is not supported by pipeline.validation")
    return messages


def input_errors(values: Any, schema: dict | None = None) -> list[dict]:
    """The server's 422 ``detail`` list for ``{"input": values}`` (empty when valid)."""
    schema = input_schema() if schema is None else schema
    if values is None:  # the server reads a null input as {}
        values = {}
    if not isinstance(values, dict):
        return [_error("__root__", f'{json_text(values)} is not of type "object"')]
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
