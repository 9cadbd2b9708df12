"""The predictor behind the real Cog 0.23 server (coglet), over HTTP, on the tiny random models.

Two predictions do real work (two 256 px steps each, a few seconds on a CPU); the rest are
``mode=embed`` or rejected before they start.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from commands.cog_schema import SCHEMA_PATH
from pipeline.validation import input_schema
from prior.weights import load_models
from testkit import inputs as shared_inputs
from testkit.cog_server import CogServer, WebhookReceiver, decode_data_uri
from testkit.predictions import JSON, NPY, PNG

EMBED_DIM = 64  # the tiny CLIP
SMALL = {"prompt": "a lighthouse on a cliff at night", **shared_inputs.SMALL, "iterations": 2, "seed": 7}
FAST = {"prompt": "a lighthouse", **shared_inputs.EMBED}  # no visualisation: well under a second


@pytest.fixture(scope="module")
def visualised(server):
    """One synchronous prediction: the response and its decoded outputs."""
    response = server.predict(**SMALL)
    return response, [decode_data_uri(uri) for uri in response["output"]]


@pytest.fixture(scope="module")
def streamed(server):
    """The same inputs again, with ``Accept: text/event-stream``."""
    return server.stream(**SMALL)


def files(outputs: list[tuple[str, bytes]], media_type: str) -> list[bytes]:
    return [data for kind, data in outputs if kind == media_type]


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def result_json(outputs: list[tuple[str, bytes]]) -> dict:
    (data,) = files(outputs, JSON)
    return json.loads(data)


# -- health and schema --------------------------------------------------------------------------------


def test_health_check_is_ready_after_setup(server):
    health = server.health()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"
    assert "Running setup" in health["setup"]["logs"]  # the setup log (setup()'s lines may arrive late)


def test_server_serves_the_committed_schema(server):
    response = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json() == json.loads(SCHEMA_PATH.read_text())


# -- a prediction ---------------------------------------------------------------------------------------


def test_outputs_are_data_uris_in_the_order_produced(visualised):
    response, outputs = visualised
    assert response["status"] == "succeeded"
    # tokens, text and image embeddings, one PNG per step (display_freq=1), then result.json;
    # data URIs carry no file names, only media types
    assert [kind for kind, _ in outputs] == [NPY, NPY, NPY, PNG, PNG, JSON]


def test_images_are_pngs_of_the_requested_size(visualised):
    _, outputs = visualised
    for data in files(outputs, PNG):
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG"
        assert (image.size, image.mode) == ((256, 256), "RGB")


def test_embeddings_are_npy_files_of_the_stated_shapes(visualised):
    _, outputs = visualised
    tokens, text, image = (npy(data) for data in files(outputs, NPY))
    assert (tokens.dtype, tokens.shape) == (np.int64, (1, 77))
    assert tokens[0, 0] == 49406 and 49407 in tokens[0]  # CLIP's start and end of text
    for embedding in (text, image):
        assert (embedding.dtype, embedding.shape) == (np.float32, (1, EMBED_DIM))
        assert np.linalg.norm(embedding, axis=-1) == pytest.approx(1.0, abs=1e-5)


def test_result_json_records_inputs_seed_device_timings_and_similarities(visualised):
    response, outputs = visualised
    result = result_json(outputs)
    defaults = {name: prop.get("default") for name, prop in input_schema()["properties"].items()}
    assert result["inputs"] == {**defaults, **SMALL}
    assert result["seed"] == SMALL["seed"]
    assert result["device"] == "cpu"  # CogServer hides any GPU
    # a name and a content hash, never a server path
    assert result["weights"] == {"name": "tiny", "sha256": load_models("tiny").identity.sha256}
    assert set(result["timings"]) >= {"prior_seconds", "dip_seconds", "iterations_per_second"}
    assert all(seconds > 0 for seconds in result["timings"].values())
    final = result["final"]
    assert final["step"] == SMALL["iterations"]
    for similarity in (final["similarity_to_target"], final["similarity_to_text"]):
        assert -1.0 <= similarity <= 1.0
    assert response["metrics"]["final_similarity"] == pytest.approx(final["similarity_to_target"])
    assert response["metrics"]["predict_time"] > 0


def test_streamed_images_arrive_before_completed(streamed):
    names = [name for name, _ in streamed]
    assert names[0] == "start" and names[-1] == "completed"
    outputs = [decode_data_uri(data["chunk"]) for name, data in streamed if name == "output"]
    assert [kind for kind, _ in outputs] == [NPY, NPY, NPY, PNG, PNG, JSON]
    first_png = next(i for i, (name, data) in enumerate(streamed) if name == "output" and "image/png" in data["chunk"])
    assert first_png < names.index("completed")
    completed = streamed[-1][1]
    assert completed["status"] == "succeeded"
    assert "visualise" in completed["logs"]  # tqdm progress reaches the logs (and "log" events)
    assert "log" in names and "metric" in names


def test_same_seed_gives_identical_outputs(visualised, streamed):
    """The streamed prediction had the same inputs as the synchronous one."""
    _, first = visualised
    second = [decode_data_uri(data["chunk"]) for name, data in streamed if name == "output"]
    assert files(first, NPY) == files(second, NPY)
    assert files(first, PNG) == files(second, PNG)
    a, b = result_json(first), result_json(second)
    for result in (a, b):
        result.pop("timings")
    assert a == b


def test_embed_mode_returns_only_the_embeddings_and_result_json(server):
    response = server.predict(**FAST)
    outputs = [decode_data_uri(uri) for uri in response["output"]]
    assert [kind for kind, _ in outputs] == [NPY, NPY, NPY, JSON]
    result = result_json(outputs)
    assert "final" not in result and "dip_seconds" not in result["timings"]


def test_seed_minus_one_draws_a_seed_and_reports_it(server):
    response = server.predict(**FAST, seed=-1)
    result = result_json([decode_data_uri(uri) for uri in response["output"]])
    assert result["inputs"]["seed"] == -1
    assert isinstance(result["seed"], int) and 0 <= result["seed"] <= 100_000


def test_a_whole_float_is_accepted_for_an_integer_input(server):
    # JSON Schema counts 8.0 as an integer: the server accepts it and passes the float to run()
    response = server.predict(**{**FAST, "prior_steps": 8.0})
    assert response["status"] == "succeeded", response.get("error")
    result = result_json([decode_data_uri(uri) for uri in response["output"]])
    assert result["inputs"]["prior_steps"] == 8 and result["prior"]["steps"] == 8


def test_unknown_inputs_are_dropped(server):
    response = server.predict(**FAST, colour="red")
    result = result_json([decode_data_uri(uri) for uri in response["output"]])
    assert "colour" not in result["inputs"]


def test_a_blank_prompt_is_rejected_with_422(server):
    response = server.post({"input": {**FAST, "prompt": "  \t "}})
    assert response.status_code == 422
    assert response.json() == {"detail": [detail("prompt", r'"  \t " does not match "\S"')]}


# -- rejected inputs --------------------------------------------------------------------------------------


def detail(field: str, msg: str, kind: str = "value_error") -> dict:
    return {"loc": ["body", "input", field], "msg": msg, "type": kind}


@pytest.mark.parametrize(
    "changes, expected",
    [
        pytest.param({"prompt": None}, detail("prompt", "Field required", "value_error.missing"), id="missing-prompt"),
        pytest.param({"prompt": ""}, detail("prompt", '"" is shorter than 1 character'), id="empty-prompt"),
        pytest.param(
            {"iterations": 5000}, detail("iterations", "5000 is greater than the maximum of 1000"), id="int-high"
        ),
        pytest.param({"num_cutouts": 2}, detail("num_cutouts", "2 is less than the minimum of 4"), id="int-low"),
        pytest.param({"seed": -2}, detail("seed", "-2 is less than the minimum of -1"), id="seed-low"),
        pytest.param({"lr_decay": 1.5}, detail("lr_decay", "1.5 is greater than the maximum of 1"), id="float-high"),
        pytest.param({"lr": -0.001}, detail("lr", "-0.001 is less than the minimum of 0"), id="float-low"),
        pytest.param(
            {"mode": "paint"}, detail("mode", '"paint" is not one of ["visualize","embed","search"]'), id="choice"
        ),
        pytest.param({"size": 300}, detail("size", "300 is not one of [256,512]"), id="int-choice"),
        pytest.param({"iterations": "ten"}, detail("iterations", '"ten" is not of type "integer"'), id="str-for-int"),
        pytest.param({"iterations": 2.5}, detail("iterations", '2.5 is not of type "integer"'), id="fraction-for-int"),
        pytest.param({"seed": True}, detail("seed", 'true is not of type "integer"'), id="bool-for-int"),
        pytest.param({"lr": "0.1"}, detail("lr", '"0.1" is not of type "number"'), id="str-for-float"),
        pytest.param({"prompt": 5}, detail("prompt", '5 is not of type "string"'), id="int-for-str"),
    ],
)
def test_bad_input_is_rejected_with_422_naming_the_field(server, changes, expected):
    inputs = {**FAST, **changes}
    inputs = {name: value for name, value in inputs.items() if value is not None}
    response = server.post({"input": inputs})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0] == expected


def test_every_problem_is_reported_fields_by_name_and_missing_ones_last(server):
    response = server.post({"input": {"size": "256", "mode": "x", "iterations": -5}})
    assert response.status_code == 422
    assert response.json()["detail"] == [
        detail("iterations", "-5 is less than the minimum of 0"),
        detail("mode", '"x" is not one of ["visualize","embed","search"]'),
        detail("size", '"256" is not one of [256,512]'),
        detail("size", '"256" is not of type "integer"'),
        detail("prompt", "Field required", "value_error.missing"),
    ]


def test_a_body_that_is_not_json_is_rejected_with_400(server):
    response = server.post("{not json")
    assert response.status_code == 400
    assert "Failed to parse the request body as JSON" in response.text


# -- cancellation -------------------------------------------------------------------------------------------


def test_cancelling_a_running_prediction(server, output_dir):
    with WebhookReceiver() as hooks:
        body = {"id": "to-cancel", "input": {**SMALL, "iterations": 200}, "webhook": hooks.url}
        response = server.post(body, headers={"Prefer": "respond-async"})
        assert response.status_code == 202 and response.json() == {"id": "to-cancel", "status": "starting"}
        # the three embeddings and a first picture: the visualiser is running
        hooks.wait_for(lambda event: len(event.get("output") or []) >= 4)
        assert server.cancel("to-cancel").status_code == 200
        final = hooks.wait_for(lambda event: event["status"] != "processing")
    assert final["status"] == "canceled"
    assert list(output_dir.iterdir()) == []  # run() removed the cancelled run's files
    assert server.settled_status() == "READY"  # once the cancelled run has unwound
    assert server.predict(**FAST)["status"] == "succeeded"


def test_cancelling_an_unknown_prediction_is_404(server):
    assert server.cancel("no-such-prediction").status_code == 404


# -- setup failure -------------------------------------------------------------------------------------------


def test_missing_weights_make_setup_fail_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-weights-here"
    with CogServer(weights=str(missing), log_path=tmp_path / "server.log") as failed:
        health = failed.health()
        response = failed.post({"input": FAST})
    assert health["status"] == "SETUP_FAILED"
    assert health["setup"]["status"] == "failed"
    # the setup log is the exception: its type and message name the missing path
    assert "WeightsUnavailable" in health["setup"]["logs"]
    assert str(missing) in health["setup"]["logs"]
    assert response.status_code == 503
