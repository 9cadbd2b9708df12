"""Every input is declared once, in the request model; Cog's signature, ``didp --help``, the README
and the server's schema file all say the same."""

from __future__ import annotations

import json

from commands.cog_schema import SCHEMA_PATH, predictor_specs
from commands.didp import _parser
from commands.input_docs import describe
from commands.readme_table import README, readme_table
from pipeline.inputs import inline_refs, server_input_schema
from pipeline.request import Request


def test_predict_signature_declares_exactly_the_request_models_inputs():
    """Name, order, type, default, range, choices, pattern and description, input by input."""
    model = {spec.name: spec for spec in Request.input_specs()}
    signature = {spec.name: spec for spec in predictor_specs()}
    assert list(signature) == list(model)
    for name, spec in model.items():
        assert signature[name] == spec, name


def test_the_schema_file_checks_what_the_model_checks():
    document = json.loads(SCHEMA_PATH.read_text())["components"]["schemas"]
    assert inline_refs(document["Input"], document) == server_input_schema(Request.input_specs())


def test_didp_help_describes_every_input_of_the_model():
    text = _parser().format_help()
    for spec in Request.input_specs():
        assert describe(spec) in text, spec.name


def test_the_readme_table_has_a_row_per_input_of_the_model():
    rows = readme_table(README.read_text()).splitlines()[2:]
    assert [row.split("|")[1].strip(" `") for row in rows] == [spec.name for spec in Request.input_specs()]
    for row, spec in zip(rows, Request.input_specs(), strict=True):
        assert row.rstrip(" |").endswith(spec.description), spec.name
