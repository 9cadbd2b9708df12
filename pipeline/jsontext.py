"""JSON text exactly as Cog's two programs write it: one encoder, two dialects.

- ``go_json``: Go's ``encoding/json`` (the ``cog`` tool writes ``.cog/openapi_schema.json`` with it):
  compact, map keys sorted (``Ordered`` keeps insertion order, as Go's ordered maps do),
  HTML-safe strings, floats in their shortest form without a trailing ``.0``.
- ``serde_json``: Rust's ``serde_json`` (coglet quotes values with it in its 422 messages): keys
  sorted, strings as they are, floats always with a fraction or an exponent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple


class Ordered(dict):
    """A JSON object written in insertion order (Go's ``orderedMapAny``); plain dicts are sorted."""


class Dialect(NamedTuple):
    integer: Callable[[int], str]
    float: Callable[[float], str]
    string: Callable[[str], str]


def dumps(value: Any, dialect: Dialect) -> str:
    """Compact JSON text of ``value`` in ``dialect``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return dialect.integer(value)
    if isinstance(value, float):
        return dialect.float(value)
    if isinstance(value, str):
        return dialect.string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(item, dialect) for item in value) + "]"
    if isinstance(value, dict):
        keys = list(value) if isinstance(value, Ordered) else sorted(value)
        return "{" + ",".join(f"{dialect.string(str(k))}:{dumps(value[k], dialect)}" for k in keys) + "}"
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} cannot be written as JSON")
    return value


# -- Go ----------------------------------------------------------------------------------------------


def _go_float(value: float) -> str:
    """``strconv.AppendFloat(f, 'f' or 'e', -1, 64)`` as ``encoding/json`` uses it: ``1.0`` -> ``1``."""
    _finite(value)
    if value == 0 or 1e-6 <= abs(value) < 1e21:
        text = format(Decimal(repr(value)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    text = repr(value)  # shortest digits, e.g. 1e-07 or 1e+21; Go then shortens e-07 to e-7
    return re.sub(r"e-0(\d)$", r"e-\1", text)


def _go_string(text: str) -> str:
    encoded = json.dumps(text, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escape)
    return encoded


GO = Dialect(str, _go_float, _go_string)


def go_json(value: Any) -> str:
    """Compact JSON as Go's ``json.Marshal`` writes it (sorted map keys, HTML-safe strings)."""
    return dumps(value, GO)


# -- Rust's serde_json ------------------------------------------------------------------------------------


def _serde_float(value: float) -> str:
    """Shortest round-trip digits; fixed notation for 1e-5 <= |x| < 1e16, else ``1e-7``/``1e+16``."""
    _finite(value)
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


def _serde_integer(value: int) -> str:
    # serde_json reads integers beyond 64 bits as floats
    return str(value) if -(2**63) <= value < 2**64 else _serde_float(float(value))


SERDE = Dialect(_serde_integer, _serde_float, lambda text: json.dumps(text, ensure_ascii=False))


def serde_json(value: Any) -> str:
    """A value as coglet prints it in messages: compact JSON, keys sorted, serde_json numbers."""
    return dumps(value, SERDE)
