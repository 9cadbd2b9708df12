"""The real Cog server (``python -m cog.server.http``, coglet) on a free loopback port, for tests and
benchmarks; a webhook receiver; data URIs and server-sent events as the server sends them.

    with CogServer(weights="tiny", output_dir=tmp) as server:
        server.predict(prompt="a lighthouse", mode="embed")

It runs in the repository root (``testkit.ROOT``), where ``predict.py`` and
``.cog/openapi_schema.json`` (which turns input validation on) are. coglet starts its worker as
``python`` from ``PATH``, so this interpreter's directory goes first on ``PATH``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import requests
from PIL import Image

from testkit import ROOT

READY_TIMEOUT = 120.0  # seconds: importing torch and a tiny setup() take a few on a loaded machine


def cog_yaml_environment() -> dict[str, str]:
    """``environment`` of cog.yaml (``NAME=value`` items), which Cog sets in the container at run time."""
    import yaml

    config = yaml.safe_load((ROOT / "cog.yaml").read_text()) or {}
    return dict(item.split("=", 1) for item in config.get("environment") or [])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    """``data:image/png;base64,...`` -> (``image/png``, bytes); ``ValueError`` if it is not a base64
    data URI (a test fails on it, a benchmark counts it)."""
    header, _, payload = uri.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64")):
        raise ValueError(f"not a base64 data URI: {uri[:60]!r}")
    try:
        return header[len("data:") : -len(";base64")], base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"bad base64 in data URI: {error}") from None


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """A PIL image as a ``data:image/<fmt>;base64,...`` URI, as a client sends a file input."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Server-sent events as (event, data) pairs; coglet's data are JSON objects."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


class CogServer:
    """One ``python -m cog.server.http`` process (and its worker), stopped on exit."""

    def __init__(
        self,
        weights: str = "tiny",
        output_dir: Path | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.weights = weights
        self.output_dir = output_dir
        self.log_path = log_path or Path(os.devnull)
        self.extra_env = env or {}  # more environment for the server, e.g. DIDP_MEMORY_BUDGET_MB
        self.process: subprocess.Popen | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> CogServer:
        env = {
            **os.environ,
            **cog_yaml_environment(),
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "DIDP_WEIGHTS": self.weights,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            # the CPU also on a GPU machine: the same seed gives the same bytes, and tests stay comparable
            "CUDA_VISIBLE_DEVICES": "",
        }
        if self.output_dir is not None:
            env["DIDP_OUTPUT_DIR"] = str(self.output_dir)
        env.update(self.extra_env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own: stop() ends the server and its worker together, and nothing else.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_for_setup(self, timeout: float = READY_TIMEOUT) -> dict:
        """Poll ``/health-check`` until setup has finished (READY or SETUP_FAILED); the last payload."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                health = requests.get(f"{self.url}/health-check", timeout=5).json()
            except requests.ConnectionError:
                health = None
            if health and health["status"] != "STARTING":
                return health
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # the worker may outlive the server by a moment
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()

    def __enter__(self) -> CogServer:
        self.start()
        try:
            self.wait_for_setup()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """Resident memory of the server and its worker (their process group), from ``/proc``."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.process.pid:  # the process group: fields[2] is pgrp
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
            except (OSError, IndexError, ValueError):
                continue  # a process that ended meanwhile
        return total

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- requests -----------------------------------------------------------------------------------

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def settled_status(self, timeout: float = 15.0) -> str:
        """The health status once the worker has settled: coglet 0.23.1 reports BUSY for a moment
        after it has sent a prediction's response (more often on a loaded machine), so a check
        right after a response polls until READY, or returns whatever it still says at ``timeout``."""
        deadline = time.monotonic() + timeout
        status = self.health()["status"]
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = self.health()["status"]
        return status

    def post(
        self, body: dict | str, headers: dict | None = None, timeout: float = 300, retry_busy: bool = True
    ) -> requests.Response:
        """``POST /predictions`` with a JSON body (or raw text), retried while the server answers 409
        unless ``retry_busy`` is off: coglet 0.23.1 sometimes frees its slot a moment after sending the
        previous response, so even a strictly sequential client can get a 409 ("At capacity"; a few
        percent of requests that follow another, more on a loaded machine)."""
        for attempt in range(20):
            response = self._post_once(body, headers, timeout)
            if response.status_code != 409 or not retry_busy:
                return response
            time.sleep(0.01 * 2 ** min(attempt, 6))
        return response

    def _post_once(self, body: dict | str, headers: dict | None, timeout: float) -> requests.Response:
        if isinstance(body, str):
            headers = {"Content-Type": "application/json", **(headers or {})}
            return requests.post(f"{self.url}/predictions", data=body, headers=headers, timeout=timeout)
        return requests.post(f"{self.url}/predictions", json=body, headers=headers, timeout=timeout)

    def predict(self, **inputs) -> dict:
        """A synchronous prediction; the response JSON (asserts HTTP 200)."""
        response = self.post({"input": inputs})
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, **inputs) -> list[tuple[str, dict]]:
        """A prediction with ``Accept: text/event-stream``: the events in arrival order."""
        response = self.post({"input": inputs}, headers={"Accept": "text/event-stream"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        return parse_sse(response.content.decode("utf-8"))  # no charset in the content type: not Latin-1

    def cancel(self, prediction_id: str) -> requests.Response:
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)


@contextlib.contextmanager
def running(*servers: CogServer):
    """Start several servers at once, so that their start-ups overlap; wait for every set-up; stop
    them all on exit."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_for_setup()
        yield servers
    finally:
        for server in servers:
            if server.process is not None:
                server.stop()


class WebhookReceiver:
    """A loopback HTTP endpoint collecting coglet's webhook calls (``GET /predictions/{id}`` is 405)."""

    def __init__(self):
        self.events: list[dict] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    receiver.events.append(json.loads(body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/webhook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        """The first event satisfying ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching webhook in {timeout} s; got {[e.get('status') for e in self.events]}"
                    )
                self._changed.wait(remaining)
