"""``didp index`` on Ray Data and searching what it built: ``didp search``, ``mode=search`` in the
pipeline, and a visualisation's nearest images. Everything runs on the tiny models, whose
rankings mean nothing: the checks plant pictures and embeddings and look for them.

One local Ray is started for the module and shared by the jobs run in this process.
Tolerances: an indexed picture searched with itself (read, preprocessed and embedded again, in a
batch of another size) scores 1 within 1e-4; a resumed job's embeddings equal an uninterrupted
one's within 1e-6 (CLIP in float32, batches of other sizes).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from commands.didp import main as didp
from commands.index import main as index_main
from pipeline.request import Request
from pipeline.runner import Pipeline
from prior.weights import load_models
from retrieval.query import SearchIndex
from testkit.batch import kill_after_first_shard
from testkit.images import HOSTILE, image_folder

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")

NAMES = [f"{colour}{kind}" for colour in ("red", "green", "blue", "yellow") for kind in ("", "-stripes", "-disc")]
SEARCH = {"prior_steps": 8, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("photos") / "photos"
    return root, image_folder(root, NAMES)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    assert (
        index_main([str(folder[0]), "-o", str(out), "--weights", "tiny", "--shard-size", "8", "--batch-size", "5"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def models():
    return load_models("tiny", "cpu")


@pytest.fixture(scope="module")
def pipeline(models, built, tmp_path_factory) -> Pipeline:
    return Pipeline(models, output_root=tmp_path_factory.mktemp("runs"), device="cpu", index=built)


def run(pipeline: Pipeline, **inputs) -> tuple[dict, list[Path]]:
    out = pipeline.new_run_directory()
    paths = list(pipeline.run(pipeline.prepare(Request.check(prompt="a red disc", mode="search", **inputs)), out))
    return json.loads(paths[-1].read_text()), paths


# -- the job -----------------------------------------------------------------------------------------


def test_every_image_is_indexed_and_every_hostile_file_set_aside_with_its_reason(folder, built):
    root, written = folder
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {
        "items": len(NAMES) + len(HOSTILE), "indexed": len(NAMES), "errors": len(HOSTILE), "shards": 3,
        "shards_written": 3,
    }  # fmt: skip
    assert manifest["clip"]["name"] == "tiny" and manifest["clip"]["dim"] == 64
    assert manifest["index"]["kind"] == "exact"
    assert sorted(pq.read_table(built / "items.parquet")["id"].to_pylist()) == sorted(written)
    errors = {row["id"]: row["reason"] for row in pq.read_table(built / "errors.parquet").to_pylist()}
    assert set(errors) == set(HOSTILE)
    assert errors["bad/bomb.png"].startswith("refused as a possible decompression bomb")
    assert errors["bad/truncated.jpg"].startswith("the file is truncated or corrupt")
    assert errors["bad/text.png"] == "not a PNG, JPEG or WebP file (unrecognised format)"
    assert errors["bad/empty.webp"].startswith("the file is empty")
    assert errors["bad/animation.gif"] == "not a PNG, JPEG or WebP file (found GIF)"


def test_a_stopped_job_resumes_with_the_shards_it_had_and_ends_as_an_uninterrupted_one(built, folder, tmp_path, capsys):
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    for name in ("index.faiss", "items.parquet", "thumbnails.bin", "thumbnail_offsets.npy", "errors.parquet"):
        (copy / name).unlink()
    (copy / "shards" / "part-00002.parquet").unlink()  # as if killed before its last shard
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(complete=False, index=None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert index_main([str(folder[0]), "-o", str(copy), "--weights", "tiny", "--shard-size", "8"]) == 0
    output = capsys.readouterr()
    assert "resuming: 2 of 3 shards already written" in output.err
    assert "part-00002.parquet" in output.out and "part-00000.parquet" not in output.out
    for name in ("items.parquet", "errors.parquet"):
        assert pq.read_table(copy / name).equals(pq.read_table(built / name))
    a, b = SearchIndex.open(built), SearchIndex.open(copy)
    import faiss

    vectors = [faiss.rev_swig_ptr(i.index.get_xb(), i.index.ntotal * i.index.d).copy() for i in (a, b)]
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-6)
    assert (
        json.loads((copy / "manifest.json").read_text())["counts"]
        == json.loads((built / "manifest.json").read_text())["counts"]
    )
    assert index_main([str(folder[0]), "-o", str(copy), "--weights", "tiny", "--shard-size", "8"]) == 0
    assert "done already: 12 images indexed" in capsys.readouterr().err


def test_a_rerun_on_changed_input_or_settings_is_refused_before_any_work(built, folder, tmp_path, capsys):
    assert index_main([str(folder[0]), "-o", str(built), "--weights", "tiny", "--shard-size", "16"]) == 2
    assert "holds another index: its shard_size 8 (now 16)" in capsys.readouterr().err
    other = tmp_path / "other"
    image_folder(other, NAMES[:3], hostile=False)
    assert index_main([str(other), "-o", str(built), "--weights", "tiny", "--shard-size", "8"]) == 2
    assert "the input's items (another input, or files added, removed or renamed)" in capsys.readouterr().err
    assert index_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x"), "--weights", "tiny"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# -- searching it ------------------------------------------------------------------------------------


def test_each_planted_picture_finds_itself_first(pipeline, folder):
    _, written = folder
    for name, path in written.items():
        result, paths = run(pipeline, image=path, k=3)
        matches = result["search"]["matches"]
        assert matches[0]["id"] == name and matches[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert result["search"]["query"] == "image" and len(matches) == 3
    assert [p.name for p in paths] == ["query_embedding.npy", "contact_sheet.png", "result.json"]


def test_a_planted_embedding_finds_its_picture_and_the_result_carries_the_query(pipeline, built, tmp_path):
    index = SearchIndex.open(built)
    import faiss

    vectors = faiss.rev_swig_ptr(index.index.get_xb(), index.index.ntotal * index.index.d).reshape(-1, 64)
    target = 7
    np.save(tmp_path / "q.npy", vectors[target] * 3.0)  # any length: normalised
    result, paths = run(pipeline, embedding=tmp_path / "q.npy", k=len(index))
    found = result["search"]
    assert found["matches"][0]["id"] == index.ids[target].as_py() and found["query"] == "embedding"
    assert [m["rank"] for m in found["matches"]] == list(range(1, 13)) and found["index_items"] == 12
    np.testing.assert_allclose(found["query_embedding"], vectors[target], atol=1e-6)
    np.testing.assert_allclose(np.load(paths[0]), vectors[target], atol=1e-6)
    assert result["inputs"]["embedding"] == "(a file)" and str(tmp_path) not in paths[-1].read_text()


def test_caption_queries_use_the_prior_the_text_or_a_mix(pipeline):
    prior, _ = run(pipeline, **SEARCH)
    text, _ = run(pipeline, **SEARCH, text_weight=1.0)
    mixed, _ = run(pipeline, **SEARCH, text_weight=0.5)
    assert [r["search"]["query"] for r in (prior, text, mixed)] == ["prior", "text", "mix"]
    assert prior["prior"]["steps"] == 8 and text["prior"] is None
    p, t, m = (np.array(r["search"]["query_embedding"]) for r in (prior, text, mixed))
    np.testing.assert_allclose(m, (p + t) / np.linalg.norm(p + t), atol=1e-5)
    again, _ = run(pipeline, **SEARCH)
    assert again["search"]["matches"] == prior["search"]["matches"]  # the seed fixes the prior's embedding
    embed = Request.check(prompt="a red disc", mode="embed", **SEARCH)
    files = list(pipeline.run(pipeline.prepare(embed), pipeline.new_run_directory()))
    image = np.load(next(f for f in files if f.name == "image_embedding.npy"))[0]
    np.testing.assert_allclose(p, image, atol=1e-6)  # the query is mode=embed's image embedding


def test_search_refusals_name_the_problem_before_any_work(models, built, tmp_path):
    bare = Pipeline(models, output_root=tmp_path / "runs", device="cpu")
    with pytest.raises(ValueError, match=r"mode=search needs an index.*didp index.*DIDP_INDEX=INDEX_DIR"):
        bare.prepare(Request.check(prompt="a red disc", mode="search"))
    other = tmp_path / "other-clip"
    shutil.copytree(built, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["clip"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    wrong = Pipeline(models, output_root=tmp_path / "runs", device="cpu", index=other)
    with pytest.raises(ValueError, match=r"built with CLIP 'tiny' \(sha256 000000000000.*query with the weights"):
        wrong.prepare(Request.check(prompt="a red disc", mode="search"))
    np.save(tmp_path / "narrow.npy", np.ones(32, np.float32))
    good = Pipeline(models, output_root=tmp_path / "runs", device="cpu", index=built)
    with pytest.raises(ValueError, match=r"embedding: rows of width 32, .* 64 wide"):
        good.prepare(Request.check(prompt="a red disc", mode="search", embedding=tmp_path / "narrow.npy"))


def test_a_visualisation_with_an_index_lists_the_images_nearest_its_picture(pipeline):
    request = Request.check(prompt="a red disc", iterations=1, num_scales=4, num_cutouts=4, prior_steps=8)
    paths = list(pipeline.run(pipeline.prepare(request), pipeline.new_run_directory()))
    nearest = json.loads(paths[-1].read_text())["nearest"]
    assert nearest["query"] == "picture" and len(nearest["matches"]) == 5 and "query_embedding" not in nearest


# -- the command line --------------------------------------------------------------------------------


def test_didp_search_prints_the_matches_and_writes_the_sheet(built, folder, tmp_path, capsys):
    _, written = folder
    out = tmp_path / "found"
    image = written["sub/blue-disc.png"] if "sub/blue-disc.png" in written else next(iter(written.values()))
    name = next(k for k, v in written.items() if v == image)
    code = didp(["search", str(built), "-i", "prompt=a disc", "-i", f"image=@{image}", "-i", "k=4",
                 "--weights", "tiny", "-o", str(out)])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [str(out / n) for n in ("query_embedding.npy", "contact_sheet.png", "result.json")]
    assert lines[3].split() == ["1", "1.0000", name] and len(lines) == 7
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (4 * 132 + 4, 128 + 28 + 8)


def test_didp_refuses_a_search_without_an_index_before_loading_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIDP_INDEX", raising=False)
    assert didp(["-i", "prompt=a disc", "-i", "mode=search", "--weights", "laion", "-o", str(tmp_path / "o")]) == 2
    assert "mode=search needs an index" in capsys.readouterr().err
    assert didp(["search", str(tmp_path / "nowhere"), "-i", "prompt=a disc", "-o", str(tmp_path / "o")]) == 2
    assert "no such directory; build one with didp index" in capsys.readouterr().err
    assert didp(["search", str(tmp_path), "-i", "prompt=a", "-i", "mode=embed"]) == 2
    assert "didp search runs mode=search, not embed" in capsys.readouterr().err


@pytest.mark.slow
def test_a_job_killed_with_sigkill_resumes_to_the_same_index(folder, built, tmp_path):
    out = tmp_path / "killed"
    args = (folder[0], "-o", out, "--weights", "tiny", "--shard-size", "8", "--batch-size", "5")
    kill_after_first_shard(*args, command="index")
    assert (out / "shards" / "part-00000.parquet").exists() and not (out / "index.faiss").exists()
    assert index_main([str(a) for a in args]) == 0
    assert pq.read_table(out / "items.parquet").equals(pq.read_table(built / "items.parquet"))
