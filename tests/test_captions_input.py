"""Many captions in one request: ``mode=embed`` with a ``captions`` file, in-process, over HTTP
through the real Cog server, and through didp (tiny models: the embeddings mean nothing)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from commands.didp import main as didp
from pipeline import runner
from pipeline.embeddings import PriorSettings, embed_captions, row_seed
from pipeline.request import Request
from pipeline.runner import Pipeline
from testkit.cog_server import decode_data_uri

TEXT = "a red bicycle\n\n  \na lighthouse at night\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline("tiny", output_root=tmp_path_factory.mktemp("outputs"))


def run(pipeline: Pipeline, **inputs) -> dict[str, Path]:
    job = pipeline.prepare(Request.check(prompt="my captions", mode="embed", prior_steps=8, **inputs))
    return {path.name: path for path in pipeline.run(job, pipeline.new_run_directory())}


def test_a_text_file_gives_one_row_per_caption_and_sets_blank_lines_aside(pipeline, tmp_path):
    (tmp_path / "captions.txt").write_text(TEXT)
    files = run(pipeline, captions=tmp_path / "captions.txt", seed=11)
    assert list(files) == ["embeddings.parquet", "errors.parquet", "result.json"]
    rows = pq.read_table(files["embeddings.parquet"]).to_pylist()
    assert [(r["id"], r["caption"]) for r in rows] == [("1", "a red bicycle"), ("4", "a lighthouse at night")]
    assert [r["seed"] for r in rows] == [row_seed(11, "1"), row_seed(11, "4")]
    assert pq.read_table(files["errors.parquet"]).to_pylist() == [
        {"id": "2", "reason": "caption is blank"},
        {"id": "3", "reason": "caption is blank"},
    ]
    result = json.loads(files["result.json"].read_text())
    assert result["captions"] == {"rows": 4, "embedded": 2, "errors": 2, "truncated": 0}
    assert result["inputs"]["captions"] == "(a file)" and result["seed"] == 11


def test_each_row_is_the_batched_cores_embedding_with_its_rows_seed(pipeline, tmp_path):
    (tmp_path / "captions.txt").write_text(TEXT)
    files = run(pipeline, captions=tmp_path / "captions.txt", seed=11)
    table = pq.read_table(files["embeddings.parquet"])
    expected = embed_captions(
        pipeline.models,
        ["a red bicycle", "a lighthouse at night"],
        table["seed"].to_pylist(),
        PriorSettings(prior_steps=8),
    )
    image = np.array(table["image_embedding"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(image, expected.image.numpy())
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_csv_jsonl_and_parquet_files_name_their_ids(pipeline, tmp_path, kind):
    rows = {"id": ["b-7", "a-1"], "caption": ["a forest", "a river"]}
    path = tmp_path / f"captions.{kind}"
    if kind == "csv":
        path.write_text("id,caption\nb-7,a forest\na-1,a river\n")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "caption": c}) for i, c in zip(*rows.values(), strict=True)))
    else:
        pq.write_table(pa.table(rows), path)
    table = pq.read_table(run(pipeline, captions=path)["embeddings.parquet"])
    assert table["id"].to_pylist() == ["b-7", "a-1"] and table["caption"].to_pylist() == ["a forest", "a river"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"mode": "visualize"}, "captions makes embeddings only: it needs mode=embed"),
        ({"interpolate_to": "a cat"}, "captions cannot be combined with interpolate_to"),
        ({"edit_prompt": "at night"}, "captions cannot be combined with edit_prompt"),
    ],
)
def test_captions_go_only_with_what_embeds_many_captions(tmp_path, inputs, message):
    (tmp_path / "c.txt").write_text(TEXT)
    values = {"prompt": "x", "mode": "embed", "captions": tmp_path / "c.txt", **inputs}
    with pytest.raises(ValueError, match=message):
        Request.check(**values)


def test_files_no_request_can_run_on_are_refused_before_any_work(pipeline, tmp_path, monkeypatch):
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="captions: no row has a caption to embed"):
        run(pipeline, captions=tmp_path / "blank.txt")
    (tmp_path / "other.csv").write_text("id,text\n1,a forest\n")
    with pytest.raises(ValueError, match="captions: .*caption"):
        run(pipeline, captions=tmp_path / "other.csv")
    monkeypatch.setattr(runner, "MAX_CAPTION_ROWS", 3)
    (tmp_path / "many.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match="captions: 4 rows, over the limit of 3 a request; didp batch"):
        run(pipeline, captions=tmp_path / "many.txt")


def test_captions_over_http_through_the_real_cog_server(server):
    uri = "data:text/plain;base64," + base64.b64encode(TEXT.encode()).decode()
    body = server.predict(prompt="my captions", mode="embed", prior_steps=8, captions=uri)
    assert body["status"] == "succeeded", body.get("error")
    kinds = [decode_data_uri(uri)[0] for uri in body["output"]]
    assert len(kinds) == 3 and kinds[-1] == "application/json"
    embeddings = pq.read_table(pa.BufferReader(decode_data_uri(body["output"][0])[1]))
    assert embeddings["id"].to_pylist() == ["1", "4"]
    result = json.loads(decode_data_uri(body["output"][-1])[1])
    assert result["captions"] == {"rows": 4, "embedded": 2, "errors": 2, "truncated": 0}


def test_didp_embeds_a_captions_file_into_its_output_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "work"))
    (tmp_path / "captions.csv").write_text("id,caption\nx,a forest\ny,a river\n")
    args = [
        "-i",
        "prompt=job",
        "-i",
        "mode=embed",
        "-i",
        "prior_steps=8",
        "-i",
        f"captions=@{tmp_path / 'captions.csv'}",
    ]
    assert didp([*args, "--weights", "tiny", "-o", str(tmp_path / "out")]) == 0
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet")["id"].to_pylist() == ["x", "y"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["captions"]["embedded"] == 2
