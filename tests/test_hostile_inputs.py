"""Hostile and odd input over HTTP: hand-written cases and schemathesis, against the real Cog server.

Every request gets a correct result or a 4xx with a message, never a 5xx, a crash or a hang,
and the server stays READY. The cases and the fuzzing loop live in ``testkit.hostile``, which
``benchmarks/bench_reliability.py`` also runs (its figures: ``reliability.fuzz_cases``, ``reliability.fuzz_5xx``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.hostile import HOSTILE, TRAVERSAL_PROMPTS, schemathesis_fuzz, send_hostile
from testkit.inputs import EMBED
from testkit.predictions import post_retrying, result_of

FIXED_NAMES = {"text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "result.json"}


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_request_gets_a_correct_result_or_a_clear_4xx(server, case):
    verdict = send_hostile(server, case)
    assert verdict.problem is None, verdict
    assert verdict.status < 500


def test_a_prompt_over_77_tokens_is_truncated_and_says_so_in_result_json_and_logs(server):
    response, _ = post_retrying(server, {**EMBED, "prompt": "a lighthouse on a cliff at night " * 30})
    body = response.json()
    assert body["status"] == "succeeded"
    assert result_of(body)["prompt_truncated"] is True
    assert "prompt longer than CLIP's 77 tokens: truncated" in body["logs"]
    short, _ = post_retrying(server, {**EMBED, "prompt": "a lighthouse"})
    assert result_of(short.json())["prompt_truncated"] is False


def test_path_traversal_prompts_write_only_fixed_names_inside_one_run_directory(server, output_dir):
    for prompt in TRAVERSAL_PROMPTS:
        response, _ = post_retrying(server, {**EMBED, "prompt": prompt})
        assert response.json()["status"] == "succeeded", prompt
        (run_dir,) = output_dir.iterdir()
        assert run_dir.name.startswith("run-") and run_dir.is_dir()
        assert {p.name for p in run_dir.iterdir()} == FIXED_NAMES, prompt
    assert not Path("/tmp/didp-owned").exists()


def test_schemathesis_finds_no_server_error_and_every_rejection_has_a_message(server):
    fuzz = schemathesis_fuzz(server.url, positive=30, negative=60, visualise_iterations=0)
    assert fuzz.cases >= 80
    assert fuzz.server_errors == 0, fuzz.problems
    assert fuzz.problems == []
    assert any(400 <= status < 500 for status in fuzz.by_status) and 200 in fuzz.by_status
    assert server.settled_status() == "READY"


@pytest.mark.slow
def test_schemathesis_at_length_with_one_step_visualisations(server):
    fuzz = schemathesis_fuzz(server.url, positive=150, negative=300, visualise_iterations=1, seed=1)
    assert fuzz.server_errors == 0, fuzz.problems
    assert fuzz.problems == []
    assert server.settled_status() == "READY"


def test_the_server_is_ready_after_all_of_it(server):
    assert server.settled_status() == "READY"
    response, _ = post_retrying(server, {**EMBED, "prompt": "still here"})
    assert response.json()["status"] == "succeeded"
    assert json.loads(response.text)["id"]
