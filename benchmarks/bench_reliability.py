"""Reliability of the served model: endurance, concurrency, hostile input and cancellation, over HTTP.

Everything runs against the real Cog server (``testkit.cog_server``) on the tiny random models,
on loopback only. The workloads live in ``testkit.workloads`` and ``testkit.hostile``, which the
tests also run (tests/test_reliability.py, tests/test_hostile_inputs.py); ``run`` gathers their
figures:

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

import tempfile
from pathlib import Path

from testkit.cog_server import CogServer
from testkit.hostile import HOSTILE, schemathesis_fuzz, send_hostile
from testkit.workloads import cancel_runs, concurrent_burst, endurance


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
