"""``mode=search`` through the real Cog server (coglet) started with ``DIDP_INDEX``, on the tiny
models (whose rankings mean nothing: the checks search with a picture of the index and look for
it). The index is built in this process without Ray (``testkit.images.index_here``).

Tolerance: an indexed picture sent back as a query scores 1 within 1e-4 (re-encoded as PNG by
the test, which is lossless, then read and embedded again).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from prior.weights import load_models
from testkit.cog_server import CogServer, decode_data_uri, image_data_uri
from testkit.images import image_folder, index_here
from testkit.predictions import JSON, NPY, PNG
from testkit.predictor import run_predictor, tiny_predictor

pytest.importorskip("faiss")

NAMES = ["red", "green-disc", "blue-stripes", "yellow-checks", "white", "black-disc"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    written = image_folder(root, NAMES)
    index = index_here(root, tmp_path_factory.mktemp("index") / "index", load_models("tiny", "cpu"))
    return index, written


@pytest.fixture(scope="module")
def search_server(indexed, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {"DIDP_INDEX": str(indexed[0])}
    with CogServer(weights="tiny", output_dir=tmp_path_factory.mktemp("out"), log_path=log_path, env=env) as server:
        yield server


def outputs(response: dict) -> list[tuple[str, bytes]]:
    return [decode_data_uri(uri) for uri in response["output"]]


def test_a_picture_of_the_index_finds_itself_first_over_http(search_server, indexed):
    _, written = indexed
    name = "sub/blue-stripes.png"
    with Image.open(written[name]) as picture:
        uri = image_data_uri(picture.convert("RGB"))
    response = search_server.predict(prompt="stripes", mode="search", image=uri, k=4)
    assert response["status"] == "succeeded", response
    files = outputs(response)
    assert [kind for kind, _ in files] == [NPY, PNG, JSON]
    result = json.loads(files[2][1])
    matches = result["search"]["matches"]
    assert matches[0]["id"] == name and matches[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [m["rank"] for m in matches] == [1, 2, 3, 4] and result["search"]["index_items"] == len(NAMES)
    query = np.load(io.BytesIO(files[0][1]), allow_pickle=False)
    np.testing.assert_allclose(result["search"]["query_embedding"], query, atol=1e-6)
    assert query.shape == (64,) and np.linalg.norm(query) == pytest.approx(1.0, abs=1e-5)
    with Image.open(io.BytesIO(files[1][1])) as sheet:
        assert sheet.size == (4 * 132 + 4, 128 + 28 + 8)
    text = json.dumps(response)
    assert str(indexed[0]) not in text and "photos/" not in text  # ids only, no server paths


def test_a_caption_and_an_embedding_file_are_queries_too(search_server, indexed, tmp_path):
    caption = search_server.predict(prompt="a red square", mode="search", prior_steps=8, seed=1, text_weight=0.25)
    result = json.loads(outputs(caption)[2][1])
    assert result["search"]["query"] == "mix" and result["prior"]["steps"] == 8
    assert len(result["search"]["matches"]) == len(NAMES)  # k (20) is more than the index holds
    buffer = io.BytesIO()
    np.save(buffer, np.array(result["search"]["query_embedding"], np.float32))
    uri = "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode()
    again = json.loads(outputs(search_server.predict(prompt="q", mode="search", embedding=uri))[2][1])
    assert again["search"]["query"] == "embedding"
    assert again["search"]["matches"] == result["search"]["matches"]


def test_a_bad_embedding_fails_the_prediction_with_a_message_naming_it(search_server):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(64, np.float32))
    uri = "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = search_server.post({"input": {"prompt": "q", "mode": "search", "embedding": uri}}).json()
    assert response["status"] == "failed" and "embedding: row(s) [0] are zero vectors" in response["error"]


def test_without_an_index_mode_search_fails_at_once_saying_how_to_configure_one(monkeypatch):
    monkeypatch.delenv("DIDP_INDEX", raising=False)
    predictor = tiny_predictor()
    with pytest.raises(ValueError, match=r"mode=search needs an index.*DIDP_INDEX=INDEX_DIR"):
        run_predictor(predictor, mode="search")
    assert predictor.last_run is None  # refused before a run directory was made
