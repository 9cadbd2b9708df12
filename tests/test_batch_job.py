"""``didp batch``: a captions file embedded on Ray Data into Parquet shards, resumably.

One local Ray is started for the module and shared by the jobs run in this process
(``commands.batch.main`` uses a Ray already started); the job killed with SIGKILL runs as a real
``didp batch`` process with its own Ray. Everything runs on the tiny models with 8 prior steps.

Tolerances: a caption's embeddings do not depend on its batch or worker up to the rounding of
matmuls of other shapes: 5e-3 per component for the prior in bf16 (this CPU's default), 1e-6
in float32, 1e-6 for CLIP's text embeddings (float32 either way); see tests/test_batch_core.py.
Where the batches are the same, the embeddings are the same bit for bit.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from commands.batch import main
from pipeline.captions import CaptionsError, read_captions
from pipeline.embeddings import PriorSettings, embed_captions, row_seed
from pipeline.shards import read_embeddings
from prior.weights import default_prior_dtype, load_models
from testkit.batch import kill_after_first_shard, vectors

ray = pytest.importorskip("ray")

STEPS = ["--weights", "tiny", "--prior-steps", "8"]
PRIOR_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 5e-3}[default_prior_dtype(torch.device("cpu"))]
TEXT_TOLERANCE = 1e-6
LONG = "a lighthouse " * 60  # well over CLIP's 77 tokens
WORDS = ["cat", "dog", "bird", "tree", "house", "river", "cloud", "lamp"]


def captions(n: int) -> list[str]:
    return [f"a photo of a {WORDS[i % 8]} number {i}" for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module's in-process jobs (2 CPUs, as the machine has)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A Parquet input of 150 rows: integer ids in a shuffled order, a null, a blank and a
    whitespace-only caption, and one caption longer than 77 tokens."""
    rows = [{"key": 1000 + (i * 37) % 150, "text": text} for i, text in enumerate(captions(150))]
    rows[10]["text"], rows[70]["text"], rows[71]["text"] = None, "", " \t "
    rows[100]["text"] = LONG
    path = tmp_path_factory.mktemp("mixed") / "captions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def run(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def small_batches(mixed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "out"
    assert run(mixed[0], "-o", out, *STEPS, "--id-column", "key", "--caption-column", "text",
               "--shard-size", 64, "--batch-size", 7, "--workers", 1) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def large_batches(mixed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("large") / "out"
    assert run(mixed[0], "-o", out, *STEPS, "--id-column", "key", "--caption-column", "text",
               "--shard-size", 64, "--batch-size", 64, "--workers", 2, "--npy") == 0  # fmt: skip
    return out


# -- what a job writes --------------------------------------------------------------------------------------


def test_a_job_writes_every_good_row_once_in_input_order_and_the_refused_ones_to_errors(mixed, small_batches):
    path, rows = mixed
    table = read_embeddings(small_batches)
    good = [r for r in rows if r["text"] and r["text"].strip()]
    assert table["id"].to_pylist() == [str(r["key"]) for r in good]
    assert table["caption"].to_pylist() == [r["text"] for r in good]
    assert sorted(p.name for p in (small_batches / "embeddings").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]  # 150 rows in shards of 64
    assert pq.read_table(small_batches / "embeddings" / "part-00000.parquet").num_rows == 64 - 1  # row 10 refused
    errors = pq.read_table(small_batches / "errors.parquet").to_pylist()
    assert errors == [
        {"id": str(rows[10]["key"]), "reason": "caption is missing (null)"},
        {"id": str(rows[70]["key"]), "reason": "caption is blank"},
        {"id": str(rows[71]["key"]), "reason": "caption is blank"},
    ]


def test_rows_hold_unit_embeddings_the_rows_seed_and_the_truncation_flag(mixed, small_batches):
    table = read_embeddings(small_batches)
    schema = table.schema
    assert schema.field("id").type == pa.string() and schema.field("seed").type == pa.int64()
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), 64)  # the tiny models' width
    assert schema.field("text_embedding").type == pa.list_(pa.float32(), 64)
    assert schema.field("similarity").type == pa.float32() and schema.field("truncated").type == pa.bool_()
    np.testing.assert_allclose(np.linalg.norm(vectors(table, "image_embedding"), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors(table, "text_embedding"), axis=1), 1.0, atol=1e-5)
    assert table["seed"].to_pylist() == [row_seed(0, i) for i in table["id"].to_pylist()]
    long_id = str(mixed[1][100]["key"])
    assert [i for i, t in zip(table["id"].to_pylist(), table["truncated"].to_pylist(), strict=True) if t] == [long_id]


def test_rows_equal_the_in_process_core_with_the_rows_seeds(small_batches):
    table = read_embeddings(small_batches)
    first = table.slice(0, 20)
    models = load_models("tiny")
    core = embed_captions(models, first["caption"].to_pylist(), first["seed"].to_pylist(), PriorSettings(prior_steps=8))
    np.testing.assert_allclose(vectors(first, "image_embedding"), core.image.numpy(), atol=PRIOR_TOLERANCE, rtol=0)
    np.testing.assert_allclose(vectors(first, "text_embedding"), core.text.numpy(), atol=TEXT_TOLERANCE, rtol=0)


def test_the_manifest_records_weights_settings_versions_and_counts(small_batches):
    manifest = json.loads((small_batches / "manifest.json").read_text())
    assert manifest["weights"] == load_models("tiny").identity.to_dict()
    assert manifest["settings"] == {
        "seed": 0,
        "candidates": 2,
        "guidance_scale": 1.0,
        "prior_steps": 8,
        "negative_prompt": None,
        "shard_size": 64,
        "id_column": "key",
        "caption_column": "text",
        "npy": False,
    }
    assert set(manifest["versions"]) == {"python", "torch", "ray", "pyarrow", "package"}
    assert manifest["versions"]["ray"] == ray.__version__
    assert manifest["counts"] == {"rows": 150, "embedded": 147, "errors": 3, "shards": 3, "shards_written": 3}
    assert manifest["complete"] is True


def test_npy_writes_clip_retrievals_layout_in_the_shards_order(large_batches):
    table = read_embeddings(large_batches)
    images = np.concatenate([np.load(p) for p in sorted((large_batches / "img_emb").glob("img_emb_*.npy"))])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, vectors(table, "image_embedding"))
    metadata = pa.concat_tables(pq.read_table(p) for p in sorted((large_batches / "metadata").glob("*.parquet")))
    assert metadata.to_pylist() == table.select(["id", "caption"]).to_pylist()


# -- the same rows whatever the batches and workers ------------------------------------------------------------


def test_embeddings_do_not_depend_on_batch_size_or_workers(small_batches, large_batches):
    small, large = read_embeddings(small_batches), read_embeddings(large_batches)
    assert small["id"].to_pylist() == large["id"].to_pylist()
    assert small["seed"].to_pylist() == large["seed"].to_pylist()
    np.testing.assert_allclose(
        vectors(small, "image_embedding"), vectors(large, "image_embedding"), atol=PRIOR_TOLERANCE, rtol=0
    )
    np.testing.assert_allclose(
        vectors(small, "text_embedding"), vectors(large, "text_embedding"), atol=TEXT_TOLERANCE, rtol=0
    )


# -- a rerun ----------------------------------------------------------------------------------------------------


def test_a_rerun_with_other_settings_is_refused_naming_them_before_any_work(mixed, small_batches, capsys):
    before = {p: p.stat().st_mtime_ns for p in small_batches.rglob("*")}
    code = run(mixed[0], "-o", small_batches, *STEPS, "--id-column", "key", "--caption-column", "text",
               "--shard-size", 64, "--seed", 5, "--candidates", 3)  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "holds another job" in err and "seed 0 (now 5)" in err and "candidates 2 (now 3)" in err
    assert {p: p.stat().st_mtime_ns for p in small_batches.rglob("*")} == before


def test_a_rerun_with_other_weights_is_refused_naming_them(mixed, tmp_path, capsys):
    from commands.batch import Job, new_manifest
    from pipeline.shards import JobSettings, input_sha256, write_manifest

    out = tmp_path / "out"
    out.mkdir()
    # an earlier job's manifest, this job's in everything but its weights
    rows = read_captions(mixed[0], "key", "text")
    settings = JobSettings(seed=0, candidates=2, guidance_scale=1.0, prior_steps=8, negative_prompt=None,
                           shard_size=64, id_column="key", caption_column="text", npy=False)  # fmt: skip
    fingerprint = input_sha256(rows.table["id"], rows.table["caption"])
    other = {"name": "laion", "sha256": "ab" * 32}
    write_manifest(out, new_manifest(Job(rows, settings, out, "laion"), other, fingerprint, 0, 0))
    code = run(mixed[0], "-o", out, *STEPS, "--id-column", "key", "--caption-column", "text", "--shard-size", 64)
    assert code == 2
    assert "weights laion sha256 abababababab (now tiny sha256" in capsys.readouterr().err
    assert not (out / "embeddings").exists() and not (out / "errors.parquet").exists()


def test_a_rerun_of_a_finished_job_does_nothing_and_changes_nothing(mixed, large_batches, capsys):
    parts = {p: p.read_bytes() for p in (large_batches / "embeddings").iterdir()}
    code = run(mixed[0], "-o", large_batches, *STEPS, "--id-column", "key", "--caption-column", "text",
               "--shard-size", 64, "--batch-size", 64, "--workers", 2, "--npy")  # fmt: skip
    assert code == 0
    assert "resuming: 3 of 3 shards already written" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (large_batches / "embeddings").iterdir()} == parts


def test_a_job_killed_midway_and_run_again_ends_with_exactly_the_rows_of_an_uninterrupted_one(tmp_path):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions(640)) + "\n")
    args = [source, *STEPS, "--shard-size", 32, "--batch-size", 8, "--workers", 1]

    killed = tmp_path / "killed"
    process = kill_after_first_shard(*args, "-o", killed)  # a real didp batch process, SIGKILL
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    written = sorted(p.name for p in (killed / "embeddings").glob("part-*.parquet"))
    assert 1 <= len(written) < 20, written  # killed midway: after a shard, before the end

    assert run(*args, "-o", killed) == 0  # the rerun resumes
    whole = tmp_path / "whole"
    assert run(*args, "-o", whole) == 0  # an uninterrupted job
    resumed, uninterrupted = read_embeddings(killed), read_embeddings(whole)
    assert resumed["id"].to_pylist() == [str(i) for i in range(1, 641)]  # no duplicate, no gap
    assert resumed["id"].to_pylist() == uninterrupted["id"].to_pylist()
    # the same batches (shards of 32 in batches of 8) give the same rows, bit for bit
    np.testing.assert_array_equal(vectors(resumed, "image_embedding"), vectors(uninterrupted, "image_embedding"))
    np.testing.assert_array_equal(vectors(resumed, "text_embedding"), vectors(uninterrupted, "text_embedding"))
    assert not list(killed.rglob(".*.tmp-*"))  # what the kill left half-written is gone
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["shards_written"] == 20


# -- inputs ---------------------------------------------------------------------------------------------------


FORMAT_ROWS = [("a1", "a red cube"), ("b2", 'a, quoted "caption"'), ("c3", "a blue sphere")]


def write_input(directory: Path, kind: str) -> Path:
    path = directory / f"captions.{kind}"
    if kind == "txt":
        path.write_text("".join(f"{caption}\n" for _, caption in FORMAT_ROWS))
    elif kind == "csv":
        escaped = [caption.replace('"', '""') for _, caption in FORMAT_ROWS]
        path.write_text(
            "id,caption\n" + "".join(f'{i},"{c}"\n' for (i, _), c in zip(FORMAT_ROWS, escaped, strict=True))
        )
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in FORMAT_ROWS))
    else:
        pq.write_table(pa.table({"id": [i for i, _ in FORMAT_ROWS], "caption": [c for _, c in FORMAT_ROWS]}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl", "parquet"])
def test_each_input_format_is_read_to_the_same_rows(tmp_path, kind):
    table = read_captions(write_input(tmp_path, kind)).table
    ids = ["1", "2", "3"] if kind == "txt" else [i for i, _ in FORMAT_ROWS]  # text files: the line number
    assert table["id"].to_pylist() == ids
    assert table["caption"].to_pylist() == [c for _, c in FORMAT_ROWS]
    assert table["problem"].null_count == 3


def test_each_input_format_runs_as_a_job(tmp_path):
    """All four kinds, end to end, as one directory each (a directory holds files of one kind)."""
    for kind in ("txt", "csv", "jsonl", "parquet"):
        out = tmp_path / f"out-{kind}"
        assert run(write_input(tmp_path, kind), "-o", out, *STEPS, "--shard-size", 2) == 0, kind
        assert read_embeddings(out)["caption"].to_pylist() == [c for _, c in FORMAT_ROWS], kind


def test_a_directory_of_one_kind_is_read_in_name_order_and_mixed_kinds_are_refused(tmp_path):
    (tmp_path / "b.txt").write_text("third\n")
    (tmp_path / "a.txt").write_text("first\nsecond\n")
    (tmp_path / "_SUCCESS").write_text("")
    table = read_captions(tmp_path).table
    assert table.select(["id", "caption"]).to_pylist() == [
        {"id": "1", "caption": "first"},
        {"id": "2", "caption": "second"},
        {"id": "3", "caption": "third"},
    ]
    (tmp_path / "c.csv").write_text("id,caption\n9,x\n")
    with pytest.raises(CaptionsError, match="files of several kinds"):
        read_captions(tmp_path)


def test_jsonl_rows_whose_caption_is_not_text_are_set_aside_and_a_null_id_is_refused(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"id": 1, "caption": "a cat"}\n{"id": 2, "caption": 5}\n{"id": 3}\n')
    table = read_captions(path).table
    assert table["problem"].to_pylist() == [None, "caption is not text (int)", "caption is missing (null)"]
    path.write_text('{"id": 1, "caption": "a cat"}\n{"id": null, "caption": "a dog"}\n')
    with pytest.raises(CaptionsError, match=r"1 rows have no id \(the first is row 2\)"):
        read_captions(path)


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("id,text\n1,a\n", [], r"no column 'caption' \(it has 'id', 'text'\)"),
        ("id,caption\n1,a\n2,b\n1,c\n", [], r"1 ids occur more than once \(id '1' 2 times\)"),
        ("id,caption\n1,a\n", ["--id-column", "key"], r"no column 'key'"),
        (b"\x89PNG\r\n\x1a\n\x00\x00garbage", [], r"unreadable as parquet"),
        ("id,caption\n1,a\n ,b\n", [], r"1 rows have a blank id \(the first is row 2\)"),
    ],
    ids=["missing-column", "duplicate-ids", "missing-id-column", "unreadable", "blank-id"],
)
def test_inputs_no_job_can_run_on_are_refused_before_any_work(tmp_path, capsys, content, args, message):
    path = tmp_path / ("captions.parquet" if isinstance(content, bytes) else "captions.csv")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    out = tmp_path / "out"
    started = time.perf_counter()
    assert run(path, "-o", out, *STEPS, *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing made
    assert time.perf_counter() - started < 5  # refused without starting any worker


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [
        ("--candidates", "11", "1 to 10"),  # Request.num_samples_per_batch
        ("--guidance-scale", "-1", "0 to 10"),  # Request.guidance_scale
        ("--prior-steps", "0", "1 to 1000"),  # Request.prior_steps
        ("--seed", "-1", "0 to 100000"),  # Request.seed, never drawn in a job
        ("--batch-size", "0", "at least 1"),
    ],
)
def test_settings_out_of_the_requests_ranges_are_refused(tmp_path, capsys, flag, value, rule):
    with pytest.raises(SystemExit) as exit_:
        main([str(write_input(tmp_path, "txt")), "-o", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: " in (err := capsys.readouterr().err) and rule in err
    assert not (tmp_path / "out").exists()


def test_didp_help_points_to_didp_batch(capsys):
    from commands.didp import main as didp

    with pytest.raises(SystemExit):
        didp(["--help"])
    assert "didp batch --help" in capsys.readouterr().out
