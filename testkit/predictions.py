"""One prediction over HTTP as the reliability tests and benchmark send it: retried while the server
answers 409, its outputs decoded, and checked against what its inputs should give."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import requests

from testkit.cog_server import CogServer, decode_data_uri

NPY, PNG, JSON = "application/octet-stream", "image/png", "application/json"  # the outputs' media types
TIMEOUT = 120  # seconds for one request: a hang fails instead of blocking forever


def outputs_of(body: dict) -> list[tuple[str, bytes]]:
    """The decoded outputs of a prediction's response: (media type, bytes) pairs."""
    return [decode_data_uri(uri) for uri in body.get("output") or []]


def result_of(body: dict) -> dict:
    (data,) = [data for kind, data in outputs_of(body) if kind == JSON]
    return json.loads(data)


def check_result(body: dict, inputs: dict) -> str | None:
    """Why a succeeded prediction's outputs are not what ``inputs`` should give, or None if they are."""
    if body.get("status") != "succeeded":
        return f"status {body.get('status')}: {body.get('error')}"
    try:
        outputs = outputs_of(body)
    except ValueError as error:
        return str(error)
    kinds = [kind for kind, _ in outputs]
    if kinds[:3] != [NPY] * 3 or kinds[-1] != JSON or set(kinds[3:-1]) - {PNG}:
        return f"unexpected outputs {kinds}"
    if (inputs.get("mode") == "embed") != (PNG not in kinds):
        return f"mode {inputs.get('mode')} but outputs {kinds}"
    try:
        arrays = [np.load(io.BytesIO(data), allow_pickle=False) for _, data in outputs[:3]]
    except ValueError as error:
        return f"unreadable .npy: {error}"
    if arrays[0].shape != (1, 77) or not all(np.isfinite(a).all() for a in arrays[1:]):
        return "malformed embeddings"
    result = json.loads(outputs[-1][1])
    if result["inputs"].get("prompt") != inputs.get("prompt"):
        return "result.json belongs to another prompt"
    if inputs.get("seed", -1) != -1 and result["seed"] != inputs["seed"]:
        return f"result.json seed {result['seed']} for seed {inputs['seed']}"
    return None


def post_retrying(
    server: CogServer, inputs: dict, attempts: int = 20, prediction_id: str | None = None
) -> tuple[requests.Response, int]:
    """A synchronous prediction, retried while the server answers 409; (response, number of 409s)."""
    conflicts = 0
    body = {"input": inputs} if prediction_id is None else {"id": prediction_id, "input": inputs}
    for attempt in range(attempts):
        response = server.post(body, timeout=TIMEOUT, retry_busy=False)
        if response.status_code != 409:
            return response, conflicts
        conflicts += 1
        time.sleep(0.01 * 2 ** min(attempt, 6))
    return response, conflicts
