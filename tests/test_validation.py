"""``pipeline.validation`` says what the Cog server says about bad inputs, word for word."""

from __future__ import annotations

import logging

import pytest
from cog import _inspector

from pipeline.validation import InputError, input_errors, validate_inputs

# Invalid inputs: each problem once or several at a time, numbers and text in awkward spellings.
BAD_INPUTS = [
    {},
    None,
    {"prompt": ""},
    {"prompt": None},
    {"prompt": 5},
    {"prompt": ["a"]},
    {"prompt": {"b": 1, "a": [2.0, "x", None, True]}},
    {"prompt": "x", "iterations": 5000},
    {"prompt": "x", "iterations": -1, "lr": 11.5},
    {"prompt": "x", "iterations": 2.5},
    {"prompt": "x", "iterations": 5000.5},
    {"prompt": "x", "iterations": "ten"},
    {"prompt": "x", "iterations": "3"},
    {"prompt": "x", "seed": True},
    {"prompt": "x", "seed": -99999999999999999999},
    {"prompt": "x", "num_cutouts": 99999999999999999999},
    {"prompt": "x", "num_scales": -(2**63)},
    {"prompt": "x", "iterations": 2**64 - 1},
    {"prompt": "x", "lr": -1e-4, "lr_decay": -1e-5, "guidance_scale": -1e-6, "offset_lr_fac": -1.5e-6},
    {"prompt": "x", "lr": 1e21, "lr_decay": 1e16, "input_noise_strength": 1e15, "offset_lr_fac": 100.0},
    {"prompt": "x", "param_noise_strength": -123.456e-10, "guidance_scale": 1.2345678901234568e22},
    {"prompt": "x", "input_noise_strength": 1.0000001, "lr": -5e-324, "lr_decay": 1.7976931348623157e308},
    {"prompt": "x", "lr": "0.1"},
    {"prompt": "x", "mode": "paint"},
    {"prompt": "x", "mode": 5},
    {"prompt": "x", "mode": 'é\n\t\u0001"\\/<>&\x7f'},
    {"prompt": "x", "size": 300},
    {"prompt": "x", "size": "256"},
    {"prompt": "x", "size": 256.5},
    {"prompt": "x", "offset_type": None},
    {"size": "256", "mode": "x", "iterations": -5},
    {"zzz": 1, "iterations": -1},
    "abc",
    [1],
    5,
]


@pytest.mark.parametrize("values", BAD_INPUTS, ids=lambda values: repr(values)[:60])
def test_errors_match_the_servers_422_detail(server, values):
    response = server.post({"input": values})
    assert response.status_code == 422, response.text
    assert input_errors(values) == response.json()["detail"]


def test_validate_inputs_raises_a_value_error_listing_every_problem():
    with pytest.raises(InputError) as raised:
        validate_inputs({"prompt": "", "iterations": 5000})
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == (
        'iterations: 5000 is greater than the maximum of 1000; prompt: "" is shorter than 1 character; '
        'prompt: "" is blank: give some text'
    )
    assert raised.value.errors[-1]["msg"] == '"" does not match "\\S"'  # the server's words, kept in errors
    assert raised.value.errors[0] == {
        "loc": ["body", "input", "iterations"],
        "msg": "5000 is greater than the maximum of 1000",
        "type": "value_error",
    }


def test_validate_inputs_applies_the_predictors_defaults_in_signature_order():
    fields = _inspector.create_predictor("predict", "Predictor").inputs
    kwargs = validate_inputs({"prompt": "a lighthouse"})
    assert list(kwargs) == sorted(fields, key=lambda name: fields[name].order)
    assert kwargs == {"prompt": "a lighthouse"} | {
        name: field.default for name, field in fields.items() if name != "prompt"
    }


def test_whole_floats_become_ints_and_ints_floats_where_the_type_says():
    kwargs = validate_inputs({"prompt": "x", "iterations": 3.0, "size": 512.0, "lr": 1})
    assert (kwargs["iterations"], kwargs["size"], kwargs["lr"]) == (3, 512, 1.0)
    assert type(kwargs["iterations"]) is int and type(kwargs["size"]) is int and type(kwargs["lr"]) is float


def test_unknown_inputs_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="didp"):
        kwargs = validate_inputs({"prompt": "x", "colour": "red"})
    assert "colour" not in kwargs
    assert "unknown inputs ignored: colour" in caplog.text
