"""Inputs described the way Cog describes them, and the JSON schema Cog's server checks them with.

``InputSpec`` is one input as Cog's signature inspector sees it (type, default, range, choices,
pattern, description). The request model (``pipeline.request.Request.input_specs``) gives these
for the pipeline, Cog's inspector for ``predict.py`` (``commands.cog_schema``): a test compares
the two. ``cog_input_schema`` is ``components.schemas.Input`` of ``.cog/openapi_schema.json`` as the
``cog`` tool's generator (replicate/cog ``pkg/schema/openapi.go``) writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .jsontext import Ordered, go_json

_JSON_TYPES = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "path": {"type": "string", "format": "uri"},  # a URL or data: URI, downloaded by Cog
}


@dataclass(frozen=True)
class InputSpec:
    """One input. ``kind``: Cog's name of its type: string, integer, float, bool or path (a file). ``default`` is
    ``None`` for none; ``optional`` inputs may be null. Bounds are inclusive."""

    name: str
    order: int
    kind: str
    description: str | None = None
    default: Any = None
    optional: bool = False
    ge: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    regex: str | None = None
    choices: tuple | None = None
    deprecated: bool = False

    @property
    def required(self) -> bool:
        return self.default is None and not self.optional


def title_case(name: str) -> str:
    """``input_noise_strength`` -> ``Input Noise Strength`` (the generator's ``TitleCase``)."""
    return " ".join(word[:1].upper() + word[1:] for word in name.split("_") if word)


def cog_input_schema(specs: list[InputSpec]) -> tuple[dict, list[tuple[str, dict]]]:
    """``components.schemas.Input``, and the enum schemas its choices refer to (name, schema)."""
    properties = Ordered()
    enums: list[tuple[str, dict]] = []
    for spec in sorted(specs, key=lambda spec: spec.order):
        prop: dict = {"x-order": spec.order}
        if spec.choices:
            enum = {"title": spec.name, "description": "An enumeration.", "enum": list(spec.choices)}
            enums.append((spec.name, {**enum, "type": _JSON_TYPES[spec.kind]["type"]}))
            prop["allOf"] = [{"$ref": f"#/components/schemas/{spec.name}"}]
        else:
            prop["title"] = title_case(spec.name)
            prop.update(_JSON_TYPES[spec.kind])
        # The generator writes ``"default": null`` on Optional inputs, the usual
        # ``Optional[X] = Input(default=None)``, and no default where there is none.
        if spec.default is not None or spec.optional:
            prop["default"] = spec.default
        if spec.optional:
            prop["nullable"] = True
        if spec.description is not None:
            prop["description"] = spec.description
        rules = {"minimum": spec.ge, "maximum": spec.le, "minLength": spec.min_length, "maxLength": spec.max_length}
        for keyword, value in rules.items():
            if value is not None:
                prop[keyword] = value
        if spec.regex is not None:
            prop["pattern"] = spec.regex
        if spec.deprecated:
            prop["deprecated"] = True
        properties[spec.name] = prop
    schema: dict = {"title": "Input", "type": "object", "properties": properties}
    required = [spec.name for spec in sorted(specs, key=lambda spec: spec.order) if spec.required]
    if required:
        schema["required"] = required
    return schema, enums


def server_input_schema(specs: list[InputSpec]) -> dict:
    """The Input schema as the server reads it from the file (through Go's JSON text) with its
    ``$ref``s to the choices' enums inlined, as coglet does."""
    schema, enums = cog_input_schema(specs)
    document = json.loads(go_json({"Input": schema, **dict(enums)}))
    return inline_refs(document["Input"], document)


def inline_refs(value: Any, schemas: dict) -> Any:
    """``value`` with each ``{"$ref": "#/components/schemas/NAME"}`` replaced by ``schemas[NAME]``."""
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return inline_refs(schemas[ref.rsplit("/", 1)[1]], schemas)
        return {key: inline_refs(item, schemas) for key, item in value.items()}
    if isinstance(value, list):
        return [inline_refs(item, schemas) for item in value]
    return value
