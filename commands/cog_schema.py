"""Write ``.cog/openapi_schema.json`` as ``cog build`` would, without Docker or the ``cog`` tool.

    python -m commands.cog_schema           # (re)write .cog/openapi_schema.json
    python -m commands.cog_schema --check   # exit 1 if the committed file is stale

The Cog server (coglet) validates every request against this file and answers 422 on bad input;
without it, it accepts anything. The inputs come from the SDK's own signature inspector
(``cog._inspector``); the document mirrors the ``cog`` tool's generator (replicate/cog
``pkg/schema/openapi.go``) byte for byte: Go's ``encoding/json`` output, compact, plain maps with
sorted keys, properties in signature order, ``choices`` as ``allOf`` references to enum schemas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.inputs import InputSpec, cog_input_schema, title_case
from pipeline.jsontext import Ordered, go_json

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"
PREDICTOR = ("predict", "Predictor")


# -- the document -------------------------------------------------------------------------------


def predictor_info():
    """The predictor's inputs and output type, from the Cog SDK's inspector (imports ``predict``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from cog import _inspector

    return _inspector.create_predictor(*PREDICTOR)


def is_streaming(module_name: str = PREDICTOR[0], class_name: str = PREDICTOR[1]) -> bool:
    """Whether ``run`` (or ``predict``) is decorated with ``@streaming``/``@cog.streaming``.

    The decorator does nothing at run time, so, like the ``cog`` tool, read it from the source.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in ("run", "predict"):
                    for decorator in item.decorator_list:
                        target = decorator.func if isinstance(decorator, ast.Call) else decorator
                        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                        if name == "streaming":
                            return True
    return False


def _primitive_json_type(primitive) -> dict:
    from cog._adt import PrimitiveType

    return {
        PrimitiveType.BOOL: {"type": "boolean"},
        PrimitiveType.FLOAT: {"type": "number"},
        PrimitiveType.INTEGER: {"type": "integer"},
        PrimitiveType.STRING: {"type": "string"},
        PrimitiveType.PATH: {"type": "string", "format": "uri"},
        PrimitiveType.FILE: {"type": "string", "format": "uri"},
        PrimitiveType.SECRET: {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    }.get(primitive, {"type": "object"})


_KINDS = {"STRING": "string", "INTEGER": "integer", "FLOAT": "float", "BOOL": "bool", "PATH": "path"}


def predictor_specs(info=None) -> list[InputSpec]:
    """``predict.py``'s inputs as ``InputSpec``s, read by Cog's own signature inspector."""
    from cog._adt import Repetition

    info = info if info is not None else predictor_info()
    specs = []
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        kind = _KINDS.get(field.type.primitive.name)
        if (
            kind is None
            or field.type.union_variants is not None
            or field.type.repetition
            not in (
                Repetition.REQUIRED,
                Repetition.OPTIONAL,
            )
        ):
            raise ValueError(f"{name}: inputs of type {field.type} are not supported by this generator")
        specs.append(
            InputSpec(
                name=name,
                order=field.order,
                kind=kind,
                description=field.description,
                default=field.default,
                optional=field.type.repetition is Repetition.OPTIONAL,
                ge=field.ge,
                le=field.le,
                min_length=field.min_length,
                max_length=field.max_length,
                regex=field.regex,
                choices=tuple(field.choices) if field.choices else None,
                deprecated=bool(field.deprecated),
            )
        )
    return specs


def _output_schema(info) -> dict:
    from cog._adt import OutputKind

    output = info.output
    if output.kind is OutputKind.SINGLE:
        core = _primitive_json_type(output.type)
    elif output.kind is OutputKind.LIST:
        core = {"type": "array", "items": _primitive_json_type(output.type)}
    elif output.kind is OutputKind.ITERATOR:
        core = {"type": "array", "items": _primitive_json_type(output.type), "x-cog-array-type": "iterator"}
    elif output.kind is OutputKind.CONCAT_ITERATOR:
        core = {
            "type": "array",
            "items": _primitive_json_type(output.type),
            "x-cog-array-type": "iterator",
            "x-cog-array-display": "concatenate",
        }
    else:
        raise ValueError(f"output kind {output.kind.name} is not supported by this generator")
    return {**core, "title": "Output"}


def _json_response(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def openapi_schema(info=None, streaming: bool | None = None) -> dict:
    """The OpenAPI 3.0.2 document of ``pkg/schema/openapi.go`` (predict mode) for the predictor.

    ``streaming`` (default: read from ``predict.py``) adds ``"x-cog-streaming": true`` to the
    ``POST /predictions`` operation: coglet answers ``Accept: text/event-stream`` only with it.
    """
    info = info if info is not None else predictor_info()
    streaming = is_streaming() if streaming is None else streaming
    input_schema, enums = cog_input_schema(predictor_specs(info))
    input_ref = {"$ref": "#/components/schemas/Input"}
    validation_error = {
        "description": "Validation Error",
        **_json_response({"$ref": "#/components/schemas/HTTPValidationError"}),
    }
    ok_any = {"description": "Successful Response", **_json_response({})}

    components = Ordered()
    components["Input"] = input_schema
    components["Output"] = _output_schema(info)
    for name, schema in enums:
        components[name] = schema
    components["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": input_ref},
    }
    components["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": input_ref,
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
            "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }

    paths = Ordered()
    paths["/"] = {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok_any}}}
    paths["/health-check"] = {
        "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": ok_any}}
    }
    paths["/predictions"] = {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": _json_response({"$ref": "#/components/schemas/PredictionRequest"}),
            "responses": {
                "200": {
                    "description": "Successful Response",
                    **_json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                },
                "422": validation_error,
            },
        }
    }
    if streaming:
        paths["/predictions"]["post"]["x-cog-streaming"] = True
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {
                    "required": True,
                    "schema": {"title": title_case("prediction_id"), "type": "string"},
                    "name": "prediction_id",
                    "in": "path",
                }
            ],
            "responses": {"200": ok_any, "422": validation_error},
        }
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


def render(info=None) -> str:
    """The exact text of ``.cog/openapi_schema.json``."""
    return go_json(openapi_schema(info))


# -- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.cog_schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the predictor")
    parser.add_argument("--path", type=Path, default=SCHEMA_PATH, help=f"default {SCHEMA_PATH.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.exists() else None
        if current != text:
            state = "missing" if current is None else "stale (predict.py's inputs or outputs changed)"
            print(f"{args.path} is {state}: run `python -m commands.cog_schema` and commit the result", file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
