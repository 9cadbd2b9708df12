"""Workloads against the real Cog server: endurance (many sequential predictions, memory and disk
sampled), concurrency (a burst at once: served or refused cleanly) and cancellation at random points.
tests/test_reliability.py runs short versions, benchmarks/bench_reliability.py the full counts."""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from testkit.cog_server import CogServer, WebhookReceiver
from testkit.inputs import EMBED, SMALL
from testkit.predictions import NPY, TIMEOUT, check_result, outputs_of, post_retrying

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # where coglet 0.23.1 makes a directory per prediction


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
        kind = SMALL if i % visualise_every == 0 else EMBED
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
