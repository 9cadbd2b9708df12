"""Reliability of the served model: endurance, concurrency, hostile input and cancellation, over HTTP.

Everything runs against the real Cog server (``tests/http_server.py``) on the tiny random models,
on loopback only. The workloads are functions the tests reuse (tests/test_reliability.py,
tests/test_hostile_inputs.py); ``run`` gathers their figures:

- ``reliability.requests_ok`` of ``reliability.requests_total`` (200) sequential predictions;
  ``reliability.sequential_409_retries``: how often coglet still answered 409 for a request sent
  right after the previous response (the client retries those, as clients of a busy Cog server do);
- ``reliability.rss_growth_pct``: the server's and worker's resident memory after the last
  request against after request 20 (``reliability.rss_trend_pct``: the same along a line fitted
  through the samples after every tenth request);
  ``reliability.disk_growth_mb``: the output directory likewise; ``reliability.coglet_dirs_left``:
  the directories coglet 0.23.1 leaves in ``/tmp/coglet/predictions``, one per prediction;
- ``reliability.concurrent_ok_or_409`` of ``reliability.concurrent_requests`` (8 at once):
  served with its own outputs, or refused with 409;
- ``reliability.fuzz_cases`` / ``reliability.fuzz_5xx``: schemathesis cases plus hand-written
  hostile requests, and how many got a 5xx (must be 0); ``reliability.fuzz_unclear`` counts
  answers that were neither a correct result nor a 4xx with a message;
- ``reliability.cancel_canceled`` of ``reliability.cancel_runs`` runs cancelled at random points,
  ``reliability.cancel_leftover_files`` and ``reliability.cancel_next_ok``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from http_server import CogServer, WebhookReceiver  # noqa: E402

EMBED = dict(mode="embed", prior_steps=8)
VISUALISE = dict(iterations=1, display_freq=1, num_scales=4, num_cutouts=4, prior_steps=8, size=256)
NPY, PNG, JSON = "application/octet-stream", "image/png", "application/json"
TIMEOUT = 120  # seconds for one request: a hang fails instead of blocking forever
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # where coglet 0.23.1 makes a directory per prediction


# -- responses ------------------------------------------------------------------------------------


def decode(uri: str) -> tuple[str, bytes]:
    header, _, payload = uri.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64")):
        raise ValueError(f"not a base64 data URI: {uri[:60]!r}")
    try:
        return header[len("data:") : -len(";base64")], base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"bad base64 in data URI: {error}") from None


def outputs_of(body: dict) -> list[tuple[str, bytes]]:
    return [decode(uri) for uri in body.get("output") or []]


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


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# -- endurance ---------------------------------------------------------------------------------------


@dataclass
class Endurance:
    total: int = 0
    ok: int = 0
    conflicts: int = 0
    failures: list[str] = field(default_factory=list)
    rss: dict[int, int] = field(default_factory=dict)
    disk: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    coglet_dirs_left: int = 0  # /tmp/coglet/predictions/<id> directories coglet left behind

    def growth_pct(self, early: int, late: int) -> float:
        return 100.0 * (self.rss[late] - self.rss[early]) / self.rss[early]

    def trend_growth_pct(self, early: int, late: int) -> float:
        """Growth from ``early`` to ``late`` along a least-squares line through every sample between
        them: a leak shows as a trend, while single samples move by a few percent either way with
        whatever the allocator happens to hold at that moment."""
        points = [(i, rss) for i, rss in sorted(self.rss.items()) if early <= i <= late]
        slope, intercept = statistics.linear_regression([i for i, _ in points], [rss for _, rss in points])
        return 100.0 * slope * (late - early) / (slope * early + intercept)

    def disk_growth_mb(self, early: int, late: int) -> float:
        return (self.disk[late] - self.disk[early]) / 2**20


def endurance(server: CogServer, output_dir: Path, n: int = 200, visualise_every: int = 10) -> Endurance:
    """``n`` sequential predictions: ``mode=embed``, and a one-step visualisation every
    ``visualise_every``-th; memory and disk are sampled after every multiple of ``visualise_every``
    (so always after the same kind of request)."""
    report = Endurance(total=n)
    prefix = f"endurance-{random.getrandbits(48):012x}"
    started = time.perf_counter()
    for i in range(1, n + 1):
        kind = VISUALISE if i % visualise_every == 0 else EMBED
        inputs = {"prompt": f"a lighthouse, request {i}", "seed": i, **kind}
        response, conflicts = post_retrying(server, inputs, prediction_id=f"{prefix}-{i}")
        report.conflicts += conflicts
        if response.status_code == 200:
            problem = check_result(response.json(), inputs)
        else:
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
        if problem is None:
            report.ok += 1
        else:
            report.failures.append(f"request {i}: {problem}")
        if i % visualise_every == 0:
            report.rss[i] = server.rss_bytes()
            report.disk[i] = disk_bytes(output_dir)
    report.seconds = time.perf_counter() - started
    report.coglet_dirs_left = len(list(COGLET_PREDICTIONS.glob(f"{prefix}-*")))
    return report


# -- concurrency ------------------------------------------------------------------------------------


@dataclass
class Burst:
    sent: int = 0
    served: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok_or_409(self) -> int:
        return self.served + self.refused


def concurrent_burst(server: CogServer, n: int = 8, rounds: int = 1) -> Burst:
    """``n`` predictions at once (``rounds`` times): each must be served with its own outputs
    (checked against the same request run alone afterwards) or refused with 409."""
    burst = Burst()
    for round_ in range(rounds):
        inputs = [
            {"prompt": f"concurrent {round_}-{k}", "seed": 100 * round_ + k, **EMBED, "prior_steps": 64}
            for k in range(n)
        ]
        for k, response in enumerate(_at_once(server, inputs)):
            burst.sent += 1
            if isinstance(response, Exception):
                burst.problems.append(f"{inputs[k]['prompt']}: {type(response).__name__}: {response}")
            elif response.status_code == 409:
                if "busy" in response.text or "capacity" in response.text:
                    burst.refused += 1
                else:
                    burst.problems.append(f"409 without a message: {response.text!r}")
            elif response.status_code == 200:
                problem = check_result(response.json(), inputs[k]) or _same_as_alone(server, inputs[k], response.json())
                if problem:
                    burst.problems.append(f"{inputs[k]['prompt']}: {problem}")
                else:
                    burst.served += 1
            else:
                burst.problems.append(f"{inputs[k]['prompt']}: HTTP {response.status_code} {response.text[:200]}")
    health = server.settled_status()  # coglet reports BUSY for a moment after a response
    if health != "READY":
        burst.problems.append(f"health {health} after the burst")
    return burst


def _at_once(server: CogServer, inputs: list[dict]) -> list[requests.Response | Exception]:
    """One thread per request, released together by a barrier."""
    responses: list[requests.Response | Exception | None] = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def send(k: int) -> None:
        barrier.wait()
        try:
            responses[k] = server.post({"input": inputs[k]}, timeout=TIMEOUT, retry_busy=False)
        except Exception as error:  # noqa: BLE001 - a broken connection is a finding, not a crash
            responses[k] = error

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def _same_as_alone(server: CogServer, inputs: dict, body: dict) -> str | None:
    alone, _ = post_retrying(server, inputs)
    if alone.status_code != 200:
        return f"rerun alone: HTTP {alone.status_code}"
    first, second = outputs_of(body), outputs_of(alone.json())
    if [d for k, d in first if k == NPY] != [d for k, d in second if k == NPY]:
        return "embeddings differ from the same request run alone"
    return None


# -- hostile input -----------------------------------------------------------------------------------


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


TRAVERSAL_PROMPTS = [
    "../../../../etc/passwd",
    "/tmp/didp-owned",
    "..\\..\\..\\windows\\system32",
    "a/../../b\u0000.png",
    "~/.ssh/id_rsa",
    "result.json",
    "$(touch /tmp/didp-owned)",
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


def _small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


SMALL_PNG = _small_png()


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
    - A generated file (``image``) that is a string becomes a small PNG as a ``data:`` URI: a URL
      would make the server download it.
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

    if isinstance(inputs.get("image"), str):
        inputs["image"] = SMALL_PNG
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


# -- cancellation -----------------------------------------------------------------------------------


@dataclass
class Cancels:
    runs: int = 0
    canceled: int = 0
    leftover: int = 0
    next_ok: int = 0
    delays: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


CANCEL_INPUTS = dict(iterations=1000, display_freq=1, num_scales=4, num_cutouts=4, prior_steps=250, size=256)


def cancel_runs(server: CogServer, output_dir: Path, n: int = 20, max_delay: float = 3.0, seed: int = 0) -> Cancels:
    """``n`` runs, each cancelled after a random delay in ``[0, max_delay]`` s (from before the
    prior starts to well into the visualisation): every one must end ``canceled``, leave no file,
    and be followed by a successful run."""
    rng = random.Random(seed)
    report = Cancels()
    with WebhookReceiver() as hooks:
        for i in range(n):
            prediction_id = f"cancel-{seed}-{i}"
            before = {p.name for p in output_dir.iterdir()}
            body = {"id": prediction_id, "input": {"prompt": f"cancelled {i}", "seed": i, **CANCEL_INPUTS}}
            body["webhook"] = hooks.url
            report.runs += 1
            response = server.post(body, headers={"Prefer": "respond-async"}, timeout=TIMEOUT)
            if response.status_code != 202:
                report.problems.append(f"{prediction_id}: HTTP {response.status_code} {response.text[:200]}")
                continue
            delay = rng.uniform(0, max_delay)
            report.delays.append(delay)
            time.sleep(delay)
            cancelled = server.cancel(prediction_id)
            if cancelled.status_code != 200:
                report.problems.append(f"{prediction_id}: cancel answered {cancelled.status_code}")
            try:
                final = hooks.wait_for(
                    lambda e, pid=prediction_id: e.get("id") == pid and e["status"] not in ("starting", "processing"),
                    timeout=60,
                )
            except TimeoutError as error:
                report.problems.append(f"{prediction_id}: {error}")
                continue
            if final["status"] == "canceled":
                report.canceled += 1
            else:
                report.problems.append(f"{prediction_id} after {delay:.2f} s: ended {final['status']}")
            left = {p.name for p in output_dir.iterdir()} - before
            report.leftover += len(left)
            if left:
                report.problems.append(f"{prediction_id}: left {sorted(left)}")
            after, _ = post_retrying(server, {"prompt": f"after cancel {i}", **EMBED})
            if after.status_code == 200 and after.json().get("status") == "succeeded":
                report.next_ok += 1
            else:
                report.problems.append(f"run after {prediction_id}: HTTP {after.status_code} {after.text[:200]}")
    return report


# -- the benchmark ------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        output_dir = Path(tmp) / "outputs"
        with CogServer(weights="tiny", output_dir=output_dir, log_path=Path(tmp) / "server.log") as server:
            load = endurance(server, output_dir, n=200)
            for failure in load.failures[:5]:
                print(f"  endurance: {failure}", flush=True)
            figures["reliability.requests_total"] = float(load.total)
            figures["reliability.requests_ok"] = float(load.ok)
            figures["reliability.sequential_409_retries"] = float(load.conflicts)
            figures["reliability.rss_growth_pct"] = round(load.growth_pct(20, 200), 2)
            figures["reliability.rss_trend_pct"] = round(load.trend_growth_pct(20, 200), 2)
            figures["reliability.disk_growth_mb"] = round(load.disk_growth_mb(20, 200), 3)
            figures["reliability.rss_mb_after_20"] = round(load.rss[20] / 2**20, 1)
            figures["reliability.seconds_per_request"] = round(load.seconds / load.total, 3)
            figures["reliability.coglet_dirs_left"] = float(load.coglet_dirs_left)

            burst = concurrent_burst(server, n=8, rounds=2 if quick else 5)
            for problem in burst.problems[:5]:
                print(f"  concurrency: {problem}", flush=True)
            figures["reliability.concurrent_requests"] = float(burst.sent)
            figures["reliability.concurrent_ok_or_409"] = float(burst.ok_or_409)
            figures["reliability.concurrent_served"] = float(burst.served)

            verdicts = [send_hostile(server, case) for case in HOSTILE]
            fuzz = schemathesis_fuzz(
                server.url,
                positive=40 if quick else 150,
                negative=80 if quick else 300,
                visualise_iterations=0 if quick else 1,
            )
            for problem in [f"{v.name}: {v.problem}" for v in verdicts if v.problem] + fuzz.problems[:5]:
                print(f"  hostile: {problem}", flush=True)
            figures["reliability.hostile_cases"] = float(len(verdicts))
            figures["reliability.schemathesis_cases"] = float(fuzz.cases)
            figures["reliability.fuzz_cases"] = float(len(verdicts) + fuzz.cases)
            figures["reliability.fuzz_5xx"] = float(sum(v.status >= 500 for v in verdicts) + fuzz.server_errors)
            figures["reliability.fuzz_unclear"] = float(
                sum(v.problem is not None for v in verdicts) + len(fuzz.problems)
            )
            figures["reliability.ready_after_fuzz"] = float(server.health()["status"] == "READY")

            cancels = cancel_runs(server, output_dir, n=5 if quick else 20)
            for problem in cancels.problems[:5]:
                print(f"  cancel: {problem}", flush=True)
            figures["reliability.cancel_runs"] = float(cancels.runs)
            figures["reliability.cancel_canceled"] = float(cancels.canceled)
            figures["reliability.cancel_leftover_files"] = float(cancels.leftover)
            figures["reliability.cancel_next_ok"] = float(cancels.next_ok)
    return figures
