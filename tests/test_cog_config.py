"""cog.yaml, its requirements and the committed ``.cog/openapi_schema.json`` agree with the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from commands import cog_schema

ROOT = Path(__file__).resolve().parent.parent
# the cog tool's JSON schema for cog.yaml (replicate/cog, pkg/config/data/, commit of 2026-08-21)
COG_CONFIG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"
# The CUDA versions (major.minor) Cog has an nvidia/cuda base image for: replicate/cog,
# pkg/config/cuda_compatibility.json (commit 6110c912 of 2026-08-21; every 13.0 image there has
# cuDNN 9). For any other build.cuda, Cog's Complete() stops with "CUDA x.y is not supported by Cog".
COG_CUDA_BASE_IMAGES = frozenset(
    ["11.0", "11.1", "11.2", "11.3", "11.4", "11.5", "11.6", "11.7", "11.8"]
    + ["12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.8", "12.9"]
    + ["13.0", "13.1", "13.2"]
)


@pytest.fixture(scope="module")
def cog_yaml() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def document() -> dict:
    """The schema as generated now from predict.py."""
    return json.loads(cog_schema.render())


def pins(lines: list[str]) -> dict[str, str]:
    """``["Pillow==13.0.0", ...]`` -> ``{"pillow": "==13.0.0"}`` (names normalised as pip does)."""
    result = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(==\s*[^\s;#]+)\s*", line)
        assert match, f"not an exact pin: {line!r}"
        result[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2].replace(" ", "")
    return result


# -- cog.yaml -----------------------------------------------------------------------------------------


def test_cog_yaml_is_valid_for_the_cog_tool(cog_yaml):
    validator = jsonschema.Draft7Validator(json.loads(COG_CONFIG_SCHEMA.read_text()))
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(cog_yaml)
    ]
    assert not problems, "cog.yaml does not match Cog's schema:\n" + "\n".join(problems)


def test_cog_yaml_runs_the_predictor_on_a_gpu_with_python_3_11(cog_yaml, pyproject):
    assert cog_yaml["run"] == "predict.py:Predictor"
    assert "predict" not in cog_yaml  # the deprecated spelling of run
    assert cog_yaml["build"]["gpu"] is True
    assert cog_yaml["build"]["python_version"] == "3.11"
    assert pyproject["project"]["requires-python"] == ">=3.11,<3.12"


def major_minor(version: str) -> str:
    """``"13.0.2"`` or ``"13.0"`` -> ``"13.0"``."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", version.strip())
    assert match, f"not a CUDA version: {version!r}"
    return f"{match[1]}.{match[2]}"


def test_cog_yaml_pins_the_cuda_the_torch_wheel_is_built_for(cog_yaml, pyproject):
    # Cog's torch table (replicate/cog, pkg/config/torch_compatibility.json) stops at torch 2.11,
    # so without build.cuda `cog build` stops: "cog doesn't know what CUDA version is compatible
    # with torch==2.14.1". With build.cuda set it installs the plain `torch==x.y.z` from PyPI,
    # the wheel this environment has (the Makefile installs it the same way).
    pinned = pins(pyproject["project"]["dependencies"])["torch"].removeprefix("==")
    installed = torch.__version__.split("+")[0]
    assert installed == pinned, f"the environment has torch {installed}, the image pins {pinned}: run `make install`"
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} here is a CPU build; nothing to compare build.cuda with")
    wheel_cuda = major_minor(torch.version.cuda)
    cuda = cog_yaml["build"].get("cuda")
    assert isinstance(cuda, str) and major_minor(cuda) == wheel_cuda, (
        f"cog.yaml has build.cuda {cuda!r}, but torch {torch.__version__} is built for CUDA {wheel_cuda}: "
        f'set build.cuda: "{wheel_cuda}" in cog.yaml (quoted, major.minor) and update the CUDA and '
        "driver paragraph under Hardware in README.md"
    )
    assert wheel_cuda in COG_CUDA_BASE_IMAGES, (
        f"Cog (replicate/cog pkg/config/cuda_compatibility.json) has no base image for CUDA {wheel_cuda}: "
        "use a torch wheel for a CUDA Cog knows, or a Cog release that knows this one "
        "(and add it to COG_CUDA_BASE_IMAGES)"
    )


def test_image_requirements_pin_the_same_versions_as_pyproject(cog_yaml, pyproject):
    requirements = ROOT / cog_yaml["build"]["python_requirements"]
    lines = [line.split("#")[0] for line in requirements.read_text().splitlines()]
    image = pins([line for line in lines if line.strip()])
    # Cog installs its SDK itself, in build.sdk_version
    image["cog"] = f"=={cog_yaml['build']['sdk_version']}"
    assert image == pins(pyproject["project"]["dependencies"])


# -- .cog/openapi_schema.json -------------------------------------------------------------------------------


def test_committed_openapi_schema_is_current():
    expected = cog_schema.render()
    committed = cog_schema.SCHEMA_PATH.read_text() if cog_schema.SCHEMA_PATH.exists() else None
    assert committed == expected, (
        ".cog/openapi_schema.json is missing or stale (predict.py's inputs or outputs changed): "
        "run `python -m commands.cog_schema` and commit the result"
    )


def test_check_command_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "openapi_schema.json"
    stale.write_text(cog_schema.render().replace('"maximum":1000', '"maximum":999'))
    assert cog_schema.main(["--check", "--path", str(stale)]) == 1
    assert "run `python -m commands.cog_schema`" in capsys.readouterr().err
    assert cog_schema.main(["--path", str(stale)]) == 0
    assert cog_schema.main(["--check", "--path", str(stale)]) == 0


def test_inputs_are_in_signature_order_with_ranges_defaults_and_one_required(document):
    schemas = document["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert [prop["x-order"] for prop in properties.values()] == list(range(len(properties)))
    assert list(properties)[:2] == ["prompt", "mode"]
    assert schemas["Input"]["required"] == ["prompt"]
    assert properties["prompt"] == {
        "description": "Caption to visualise: what CLIP should see.",
        "minLength": 1,
        "pattern": "\\S",
        "title": "Prompt",
        "type": "string",
        "x-order": 0,
    }
    assert properties["iterations"]["minimum"] == 0 and properties["iterations"]["maximum"] == 1000
    assert properties["seed"]["default"] == -1


def test_choices_refer_to_enum_schemas_named_after_the_input(document):
    schemas = document["components"]["schemas"]
    size = schemas["Input"]["properties"]["size"]
    assert size["allOf"] == [{"$ref": "#/components/schemas/size"}] and "type" not in size
    assert schemas["size"] == {"description": "An enumeration.", "enum": [256, 512], "title": "size", "type": "integer"}
    assert schemas["mode"]["enum"] == ["visualize", "embed", "search"]


def test_output_is_a_streamed_iterator_of_files(document):
    assert document["components"]["schemas"]["Output"] == {
        "items": {"format": "uri", "type": "string"},
        "title": "Output",
        "type": "array",
        "x-cog-array-type": "iterator",
    }
    # what coglet reads to allow Accept: text/event-stream (run() is @streaming)
    assert document["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def test_numbers_and_text_are_written_as_go_writes_them():
    assert cog_schema.go_json([1.0, 0.0, 0.001, 1e-7, 1e21, 100000.0]) == "[1,0,0.001,1e-7,1e+21,100000]"
    assert cog_schema.go_json("a<b & c>d é") == '"a\\u003cb \\u0026 c\\u003ed é"'
    assert cog_schema.go_json({"b": 1, "a": {"y": 2, "x": 3}}) == '{"a":{"x":3,"y":2},"b":1}'
    assert cog_schema.go_json(cog_schema.Ordered(b=1, a=2)) == '{"b":1,"a":2}'
