"""The inputs in words, from the request model: ``didp --help`` and the README's table."""

from __future__ import annotations

from pipeline.inputs import InputSpec
from pipeline.request import Request


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def default_text(spec: InputSpec) -> str:
    if spec.default is not None:
        return f"default {spec.default!r}"
    return "optional" if spec.optional else "required"


def describe(spec: InputSpec) -> str:
    """One line of ``didp --help``: what the input means, what it takes, its default."""
    parts = [(spec.description or "").rstrip(".")]
    if spec.choices:
        parts.append(f"one of {', '.join(map(str, spec.choices))}")
    if spec.ge is not None or spec.le is not None:
        low = "" if spec.ge is None else number(spec.ge)
        high = "" if spec.le is None else number(spec.le)
        parts.append(f"range {low}..{high}")
    if spec.regex == r"\S":
        parts.append("not blank")
    elif spec.min_length:
        parts.append(f"at least {spec.min_length} character(s)")
    if spec.kind == "path":
        parts.append("a file, name=@path or name=path")
    parts.append(default_text(spec))
    return f"  {spec.name} ({spec.kind}): " + "; ".join(p for p in parts if p)


def inputs_help() -> str:
    return "inputs (-i name=value):\n" + "\n".join(describe(spec) for spec in Request.input_specs())


def _allowed(spec: InputSpec) -> str:
    if spec.choices:
        return ", ".join(f"`{c}`" for c in spec.choices)
    if spec.ge is not None or spec.le is not None:
        low = number(spec.ge) if spec.ge is not None else ""
        return f"{low} to {number(spec.le) if spec.le is not None else ''}"
    if spec.min_length:
        return "not blank" if spec.regex == r"\S" else "non-empty"
    return ""


def inputs_table() -> str:
    """The README's table of inputs (Markdown)."""
    rows = ["| input | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for spec in Request.input_specs():
        default = f"`{spec.default}`" if spec.default is not None else default_text(spec)  # optional/required
        rows.append(f"| `{spec.name}` | {spec.kind} | {default} | {_allowed(spec)} | {spec.description} |")
    return "\n".join(rows)
