"""Hostile requests against the real Cog server: hand-written cases and schemathesis fuzzing from the
server's ``/openapi.json``, each answer judged (a correct result or a 4xx with a message, never a 5xx).
tests/test_hostile_inputs.py and benchmarks/bench_reliability.py run them."""

from __future__ import annotations

import base64
import io
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np
import requests
from PIL import Image

from testkit.cog_server import CogServer, image_data_uri
from testkit.inputs import EMBED
from testkit.predictions import TIMEOUT, check_result, result_of

# -- hand-written cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """A hand-written hostile request: the raw body, and what a correct answer is."""

    name: str
    body: bytes
    expect: int  # 200 (a correct result), or the 4xx status
    content_type: str = "application/json"
    check: str = ""  # for 200: a property of result.json to check


def _body(inputs: dict | None = None, **top) -> bytes:
    return json.dumps({"input": {**EMBED, "prompt": "a lighthouse", **(inputs or {})}, **top}).encode()


def _raw(input_text: str) -> bytes:
    """A body whose ``input`` object is written by hand (for what ``json.dumps`` will not write)."""
    return ('{"input": {"prompt": "a lighthouse", "mode": "embed", "prior_steps": 8, ' + input_text + "}}").encode()


# Prompts that would escape the output directory, or run something, if a file name came from them:
# tests/test_security.py runs each through the predictor in this process, tests/test_hostile_inputs.py
# and the reliability benchmark over HTTP.
TRAVERSAL_PROMPTS = [
    "../../../../etc/passwd",
    "/tmp/didp-owned",
    "..\\..\\..\\windows\\system32\\x",
    "a/../../b\u0000.png",
    "~/.ssh/id_rsa",
    "$(touch /tmp/didp-owned)",
    "result.json",
    "step_0001.png/../../../x",
    "..\\..\\..\\windows\\system32",
    "`id`; rm -rf /",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "file:///etc/passwd",
]

HOSTILE = [
    Hostile("prompt-100kB", _body({"prompt": "a lighthouse on a cliff " * 4200}), 200, check="prompt_truncated"),
    Hostile("prompt-78-tokens", _body({"prompt": " ".join(["cat"] * 80)}), 200, check="prompt_truncated"),
    Hostile("prompt-control-chars", _body({"prompt": "a\u0000b\u0007c\u001b[31mred\u001b[0m\r\n\t\u007f\u0085"}), 200),
    Hostile("prompt-emoji", _body({"prompt": "🦊🏔️ 👩‍👩‍👧‍👦 🏳️‍🌈 \U0001f9ea" * 20}), 200),
    Hostile("prompt-rtl", _body({"prompt": "منارة على جرف ليلا \u202eשלום\u202c \u200fabc\u200e"}), 200),
    Hostile("prompt-zero-width-only", _body({"prompt": "\u200b\u200c\u200d\ufeff"}), 200),
    Hostile("prompt-combining-marks", _body({"prompt": "Z\u0351\u036b\u0343\u036a\u0302" * 500}), 200),
    Hostile("prompt-lone-surrogate", _raw('"seed": 1, "prompt": "\\ud800"'), 400),
    Hostile("prompt-ascii-whitespace-only", _body({"prompt": " \t\n "}), 422),
    # the server's regex engine does not count U+3000 and U+00A0 as whitespace: an empty caption, a result
    Hostile("prompt-unicode-spaces-only", _body({"prompt": "\u3000\u00a0"}), 200),
    Hostile("prompt-not-a-string", _body({"prompt": ["a", "b"]}), 422),
    Hostile("prompt-null", _body({"prompt": None}), 422),
    Hostile("nan", _raw('"lr": NaN'), 400),
    Hostile("infinity", _raw('"lr": Infinity'), 400),
    Hostile("minus-infinity", _raw('"guidance_scale": -Infinity'), 400),
    Hostile("overflowing-float", _raw('"lr": 1e400'), 400),
    Hostile("negative-zero-float", _raw('"guidance_scale": -0.0, "lr": -0.0'), 200),
    Hostile("negative-zero-int", _raw('"seed": -0.0'), 200, check="seed=0"),
    Hostile("whole-float-for-int", _raw('"prior_steps": 8.0, "seed": 7.0'), 200, check="seed=7"),
    Hostile("fraction-for-int", _raw('"prior_steps": 8.5'), 422),
    Hostile("exponent-for-int", _raw('"seed": 7e0'), 200, check="seed=7"),
    Hostile("huge-int", _raw('"seed": 184467440737095516160000'), 422),
    Hostile("bool-for-int", _raw('"seed": true'), 422),
    Hostile("string-for-number", _raw('"lr": "1e-3"'), 422),
    Hostile("extra-unknown-fields", _body({"colour": "red", "__proto__": {"x": 1}, "constructor": None}), 200),
    Hostile("extra-top-level-fields", _body(output_file_prefix="../../x", zzz=[1, 2, 3]), 200),
    Hostile("duplicate-keys", _raw('"seed": 1, "seed": 2'), 200),
    Hostile("deeply-nested-extra", _raw('"extra": ' + "[" * 5000 + "]" * 5000), 400),
    Hostile("input-not-object", b'{"input": [1, 2, 3]}', 422),
    Hostile("input-string", b'{"input": "prompt=a lighthouse"}', 422),
    Hostile("body-array", b"[1, 2, 3]", 422),
    Hostile("body-not-json", b"{not json", 400),
    Hostile("body-empty", b"", 400),
    Hostile("body-trailing-garbage", _body() + b" trailing", 400),
    Hostile("body-utf8-bom", b"\xef\xbb\xbf" + _body(), 400),
    Hostile("body-invalid-utf8", b'{"input": {"prompt": "a \xff\xfe lighthouse", "mode": "embed"}}', 400),
    Hostile("body-form-encoded", b"prompt=a+lighthouse", 415, content_type="application/x-www-form-urlencoded"),
    Hostile("body-text-plain", _body(), 415, content_type="text/plain"),
] + [Hostile(f"traversal-{i}", _body({"prompt": prompt}), 200) for i, prompt in enumerate(TRAVERSAL_PROMPTS)]


@dataclass
class Verdict:
    name: str
    status: int
    problem: str | None  # None: a correct result or a clear 4xx


def send_hostile(server: CogServer, case: Hostile) -> Verdict:
    for attempt in range(20):  # a 409 right after the previous answer: coglet's slot not yet free
        try:
            response = requests.post(
                f"{server.url}/predictions",
                data=case.body,
                headers={"Content-Type": case.content_type},
                timeout=TIMEOUT,
            )
        except requests.RequestException as error:
            return Verdict(case.name, 0, f"no answer: {type(error).__name__}: {error}")
        if response.status_code != 409:
            break
        time.sleep(0.01 * 2 ** min(attempt, 6))
    status = response.status_code
    if status >= 500:
        return Verdict(case.name, status, f"server error: {response.text[:300]}")
    if status != case.expect:
        return Verdict(case.name, status, f"expected {case.expect}, got {status}: {response.text[:300]}")
    if status != 200:
        return Verdict(case.name, status, None if response.text.strip() else f"{status} without a message")
    body = response.json()
    inputs = json.loads(case.body)["input"] if case.name.startswith("traversal") else None
    problem = check_result(body, inputs) if inputs else None
    if problem is None and body.get("status") != "succeeded":
        problem = f"status {body.get('status')}: {body.get('error')}"
    if problem is None and case.check:
        result = result_of(body)
        if case.check == "prompt_truncated":
            if result.get("prompt_truncated") is not True or "truncated" not in (body.get("logs") or ""):
                problem = "truncation not reported in result.json and the logs"
        elif case.check.startswith("seed=") and result["seed"] != int(case.check.removeprefix("seed=")):
            problem = f"seed {result['seed']}, expected {case.check}"
    return Verdict(case.name, status, problem)


# -- schemathesis -----------------------------------------------------------------------------------


SMALL_PNG = image_data_uri(Image.new("RGB", (32, 24), (200, 120, 40)))


def _npy_data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode()


SMALL_NPY = _npy_data_uri(np.linspace(-1, 1, 64, dtype=np.float32))  # an embedding of the tiny CLIP's width


@dataclass
class Fuzz:
    cases: int = 0
    server_errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _tame(case, index: int, visualise_every: int, visualise_iterations: int) -> None:
    """Make a generated prediction safe and cheap without making a valid input invalid.

    - A generated ``id`` becomes ``fuzz-<n>``: coglet 0.23.1 makes ``/tmp/coglet/predictions/<id>``
      from it unchecked, so an id like ``/etc/x`` creates directories anywhere and one with a NUL
      byte leaves the server busy for good (tests/test_security.py keeps both as known failures).
    - No ``webhook``: nothing may leave the machine.
    - A generated file (``image``, ``init_image``; ``embedding``) that is a string becomes a small
      PNG (a small ``.npy``) as a ``data:`` URI: a URL would make the server download it. An init
      phase takes at most 2 steps.
    - Fewer prior steps and candidates, and ``mode=embed`` except every ``visualise_every``-th
      (then at most ``visualise_iterations`` steps of 256 px with 4 cutouts, at most 2 pictures
      at once). Invalid values stay.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if "id" in body:
        body["id"] = f"fuzz-{index}-{random.getrandbits(32):08x}"
    body.pop("webhook", None)
    inputs = body.get("input")
    if not isinstance(inputs, dict):
        return

    def valid_int(name: str, low: int, high: int) -> bool:
        value = inputs.get(name)
        return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high

    for name in ("image", "init_image"):
        if isinstance(inputs.get(name), str):
            inputs[name] = SMALL_PNG
    if isinstance(inputs.get("embedding"), str):
        inputs["embedding"] = SMALL_NPY
    if valid_int("init_steps", 1, 1000):
        inputs["init_steps"] = min(inputs["init_steps"], 2)
    elif "init_image" in inputs and "init_steps" not in inputs:
        inputs["init_steps"] = 2
    if valid_int("prior_steps", 1, 1000):
        inputs["prior_steps"] = min(inputs["prior_steps"], 8)
    if valid_int("num_samples_per_batch", 1, 10):
        inputs["num_samples_per_batch"] = min(inputs["num_samples_per_batch"], 2)
    if inputs.get("mode", "visualize") != "visualize":
        return
    if index % visualise_every:
        inputs["mode"] = "embed"
        return
    if valid_int("iterations", 0, 1000) or "iterations" not in inputs:
        inputs["iterations"] = min(inputs.get("iterations", 250), visualise_iterations)
    if inputs.get("size", 256) in (256, 512):
        inputs["size"] = 256
    if valid_int("num_cutouts", 4, 32) or "num_cutouts" not in inputs:
        inputs["num_cutouts"] = 4
    if valid_int("num_outputs", 1, 8):
        inputs["num_outputs"] = min(inputs["num_outputs"], 2)
    if valid_int("interpolation_steps", 2, 16):
        inputs["interpolation_steps"] = 2


def _judge(case, response) -> str | None:
    status = response.status_code
    if status >= 500:
        return f"{status} server error"
    text = response.text.strip()
    if 400 <= status < 500:
        if text and text not in ("{}", "null", '""'):
            return None
        if status == 404 and case.path == "/predictions/{prediction_id}/cancel":
            return None  # coglet's answer for an unknown prediction id: an empty JSON object
        return f"{status} without a message"
    if case.method.upper() == "POST" and case.path == "/predictions" and status == 200:
        body = response.json()
        if body.get("status") == "failed" and not body.get("error"):
            return "failed without an error message"
        if body.get("status") not in ("succeeded", "failed"):
            return f"status {body.get('status')}"
    return None


def schemathesis_fuzz(
    url: str,
    positive: int = 40,
    negative: int = 80,
    visualise_every: int = 5,
    visualise_iterations: int = 0,
    seed: int = 0,
) -> Fuzz:
    """Cases generated by schemathesis from the server's ``/openapi.json``, positive (valid by the
    schema) and negative, for every operation; each response judged by ``_judge``."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    fuzz = Fuzz()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in ((GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, negative)):
            strategy = operation.as_strategy(generation_mode=mode)

            @hypothesis_seed(seed)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case) -> None:
                _tame(case, fuzz.cases, visualise_every, visualise_iterations)
                fuzz.cases += 1
                try:
                    response = case.call(base_url=url, session=session, timeout=TIMEOUT)
                except requests.RequestException as error:
                    fuzz.problems.append(f"{case.method} {case.formatted_path}: no answer: {error}")
                    return
                fuzz.by_status[response.status_code] = fuzz.by_status.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    fuzz.server_errors += 1
                problem = _judge(case, response)
                if problem:
                    body = json.dumps(case.body, default=str)[:300] if case.body is not None else ""
                    fuzz.problems.append(f"{case.method} {case.formatted_path} {body}: {problem}")

            try:
                check()
            except Exception as error:  # noqa: BLE001 - e.g. no negative cases exist for a parameterless GET
                if "Unsatisfiable" not in type(error).__name__ and "negative" not in str(error).lower():
                    fuzz.problems.append(f"{operation.label} ({mode.value}): {type(error).__name__}: {error}")
    return fuzz
