"""The page's form, built from the request model: one widget per input, with its range, default,
choices and description as ``pipeline.request.Request`` declares them.

Only which inputs stand up front (``EVERYDAY``) is chosen here; every other input, including any
added to the model later, goes under "Advanced" with a widget chosen from its kind. Nothing here
imports Gradio: ``webui.page`` turns these ``Widget``s into components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pipeline.inputs import InputSpec
from pipeline.request import Request

# The inputs up front, in this order; the caption box first.
EVERYDAY = ("prompt", "iterations", "size", "seed", "guidance_scale", "num_outputs")
# A numeric range wider than this is typed in a number box rather than dragged on a slider.
SLIDER_SPAN = 1000


@dataclass(frozen=True)
class Widget:
    """How one input is asked for. ``widget``: ``caption`` (the prompt), ``text``, ``slider``,
    ``number``, ``choice``, ``checkbox``, ``picture`` (an image upload) or ``file`` (any upload).
    ``step`` is a slider's or number box's step; ``everyday``: shown up front."""

    spec: InputSpec
    widget: str
    everyday: bool
    step: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.name

    @property
    def info(self) -> str:
        """The description, with the range and default as the API states them."""
        spec = self.spec
        parts = [spec.description or ""]
        if spec.ge is not None and spec.le is not None:
            parts.append(f"{_number(spec.ge)} to {_number(spec.le)}.")
        if spec.optional and spec.default is None:
            parts.append("Optional.")
        elif spec.default is not None:
            parts.append(f"Default {_number(spec.default)}.")
        return " ".join(part for part in parts if part)

    @property
    def initial(self) -> Any:
        """The widget's first value: the input's default (blank where there is none)."""
        if self.widget in ("caption", "text"):
            return self.spec.default or ""
        return self.spec.default


def widgets(specs: list[InputSpec] | None = None) -> list[Widget]:
    """Every input as a ``Widget``: the everyday ones first in ``EVERYDAY``'s order, then the
    others in the model's order."""
    specs = Request.input_specs() if specs is None else specs
    everyday = {name: i for i, name in enumerate(EVERYDAY)}
    ordered = sorted(specs, key=lambda spec: (spec.name not in everyday, everyday.get(spec.name, 0), spec.order))
    return [widget_for(spec, spec.name in everyday) for spec in ordered]


def widget_for(spec: InputSpec, everyday: bool = False) -> Widget:
    """The widget an input's kind, range and choices call for."""
    if spec.choices:
        return Widget(spec, "choice", everyday)
    if spec.kind == "bool":
        return Widget(spec, "checkbox", everyday)
    if spec.kind == "path":
        about = f"{spec.name} {spec.description or ''}".lower()
        return Widget(spec, "picture" if "picture" in about or "image" in spec.name else "file", everyday)
    if spec.kind in ("integer", "float") and spec.default is None:
        return Widget(spec, "text", everyday)  # blank: not given (a number box cannot be blank)
    if spec.kind in ("integer", "float"):
        step = 1 if spec.kind == "integer" else _float_step(spec)
        bounded = spec.ge is not None and spec.le is not None
        if bounded and spec.le - spec.ge <= SLIDER_SPAN:
            return Widget(spec, "slider", everyday, step)
        return Widget(spec, "number", everyday, step)
    if spec.kind == "string" and spec.required:
        return Widget(spec, "caption", everyday)
    return Widget(spec, "text", everyday)  # strings, and any kind this page does not know yet


def _float_step(spec: InputSpec) -> float:
    """Fine enough for the default and for hundredths: 0.995 -> 0.001, 1.0 -> 0.01."""
    places = 2
    if spec.default is not None:
        places = max(places, -Decimal(repr(float(spec.default))).normalize().as_tuple().exponent)
    return 10.0**-places


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def request_values(form: list[Widget], values: list[Any]) -> dict[str, Any]:
    """The request's inputs from the widgets' values (in ``form``'s order): a blank optional
    text or number is left out, whole numbers of integer inputs become ``int``, an upload its path.
    A value that is not of the input's type is passed on as it is, for the request to refuse by name."""
    inputs: dict[str, Any] = {}
    for widget, value in zip(form, values, strict=True):
        spec = widget.spec
        if value is None or (isinstance(value, str) and widget.widget != "caption" and not value.strip()):
            continue  # not given: the model's default applies (or its "required" message)
        if spec.kind in ("integer", "float") and isinstance(value, str):
            value = _number_of(value.strip(), spec.kind)
        if spec.kind == "integer" and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        elif spec.kind == "path" and isinstance(value, dict):  # an upload as some components hand it over
            value = value.get("path")
        inputs[spec.name] = value
    return inputs


def _number_of(text: str, kind: str) -> Any:
    """The number typed in a text box, or the text itself (the request then refuses it by name)."""
    try:
        return int(text) if kind == "integer" and text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        return text


def check(form: list[Widget], values: list[Any]) -> Request:
    """The request of the form's values, or a ``ValueError`` whose message names the inputs at fault."""
    return Request.check(**request_values(form, values))
