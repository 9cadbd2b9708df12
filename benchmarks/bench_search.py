"""Image search: building and querying the FAISS index, its recall, and indexing image files.

Vectors: synthetic unit vectors of width 768 (ViT-L/14's), drawn around cluster centres as CLIP
embeddings cluster, not uniformly on the sphere (where every neighbour is about as far as any
other and an IVF index is useless): one centre per 10 vectors, the centres themselves on a
32-dimensional subspace (embeddings have a low intrinsic dimension, so clusters have near
neighbours), each vector its centre plus Gaussian noise of length 0.6 (cosine to its nearest
neighbour about 0.75), l2-normalised. Queries are fresh draws from the same distribution, not
items of the index. Full run: 100k and 1M
vectors (3 GB); ``--quick``: 20k and 100k.

- ``search.build_vectors_per_s``: the approximate index (``retrieval.store.build_index``, IVF
  trained on a sample, then every vector added) over the large set, vectors per second of the
  training and adding (``search.build_seconds``); ``search.exact_build_vectors_per_s`` the exact
  index's (a copy);
- ``search.query_ms_p50_<kind>_<size>`` and ``_p99_``: one query at a time (as a request makes
  them), ``kind`` exact or ivf, ``size`` 100k or 1m, the index opened from its file
  memory-mapped, as a server opens it; ``search.query_ms_p50`` / ``_p99`` are the approximate
  index's at the large size (the index ``didp index`` builds there);
- ``search.recall_at_10``: the approximate index's recall@10 against exact search at the large
  size, at the ``nprobe`` that ``didp index`` chose (``search.nprobe`` of ``search.nlist``
  lists) on its own held-out queries (``search.recall_at_10_at_build``), measured here on other
  queries; target 0.95;
- ``search.open_ms_<kind>`` / ``search.open_rss_mb_<kind>``: opening the large index file
  memory-mapped: the time and the anonymous memory it adds (the file's pages stay the page cache's);
- ``search.index_images_per_s_tiny`` / ``_b32``: reading, checking, thumbnailing, preprocessing and
  embedding JPEG files of 640x480 (``retrieval.images.items_table``, the Ray worker's work) in
  batches of 32, with the tiny CLIP and a ViT-B/32-size CLIP (random weights, float32), in this
  process; ``search.index_job_images_per_s_tiny``: the whole ``didp index`` command on the same
  files with the tiny models (Ray's start, the actor's, the shards and the index included).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from bench_dip import vit_b32_clip
from PIL import Image

from retrieval.identity import ClipIdentity
from retrieval.images import items_table
from retrieval.query import SearchIndex
from retrieval.store import (
    IndexCounts,
    IndexManifest,
    IndexSettings,
    build_index,
    import_faiss,
    recall_at,
    shard_schema,
    write_index,
    write_items,
    write_manifest,
)

DIM = 768
PER_CENTRE = 10  # vectors per cluster centre
LATENT = 32  # the centres' subspace
NOISE = 0.6  # length of a vector's noise before normalising
QUERIES = 200
EXACT_QUERIES_LARGE = 60  # exact search over 3 GB is slow: fewer single queries
IMAGES = 256


def centres_for(n: int, rng: np.random.Generator) -> np.ndarray:
    basis = rng.standard_normal((LATENT, DIM), dtype=np.float32)
    centres = rng.standard_normal((max(1, n // PER_CENTRE), LATENT), dtype=np.float32) @ basis
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, centres.shape[1]), np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        part = centres[rng.integers(0, len(centres), size)]
        part += rng.standard_normal(part.shape, dtype=np.float32) * np.float32(NOISE / np.sqrt(DIM))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        out[start : start + size] = part
    return out


def anonymous_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stored(directory: Path, index, info, n: int) -> Path:
    """``index`` written as ``didp index`` writes it (ids only; no thumbnails), for opening."""
    directory.mkdir(parents=True, exist_ok=True)
    write_index(directory, index)
    write_items(directory, pa.table({"id": pa.array(np.arange(n).astype(str))}), [b""] * n)
    manifest = IndexManifest(
        clip=ClipIdentity(name="synthetic", sha256="0" * 64, dim=DIM),
        input_sha256="0",
        settings=IndexSettings(shard_size=n, column=None, id_column=None, index=info.kind),
        versions={},
        counts=IndexCounts(items=n, indexed=n),
        index=info,
        complete=True,
    )
    write_manifest(directory, manifest)
    return directory


def query_ms(index: SearchIndex, queries: np.ndarray) -> np.ndarray:
    index.search(queries[0], 10)  # warm-up
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query, 10)
        times.append((time.perf_counter() - started) * 1e3)
    return np.array(times)


def vector_figures(sizes: tuple[int, int], work: Path) -> dict[str, float]:
    faiss = import_faiss()
    rng = np.random.default_rng(0)
    figures: dict[str, float] = {}
    for n, label in zip(sizes, ("100k", "1m") if sizes[1] == 1_000_000 else ("small", "large"), strict=True):
        centres = centres_for(n, rng)
        vectors = clustered(n, centres, rng)
        queries = clustered(QUERIES, centres, rng)
        large = n == sizes[1]
        _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
        for kind in ("exact", "ivf"):
            started = time.perf_counter()
            index, info = build_index(vectors, kind, seed=1)
            total = time.perf_counter() - started
            if large and kind == "ivf":
                figures["search.build_seconds"] = info.build_seconds
                figures["search.build_vectors_per_s"] = n / info.build_seconds
                figures["search.build_and_tune_seconds"] = total
                figures["search.nlist"] = info.nlist
                figures["search.nprobe"] = info.nprobe
                figures["search.recall_at_10_at_build"] = info.recall_at_10
            if large and kind == "exact":
                figures["search.exact_build_vectors_per_s"] = n / info.build_seconds
            directory = stored(work / f"{kind}-{label}", index, info, n)
            del index
            before = anonymous_mb()
            started = time.perf_counter()
            opened = SearchIndex.open(directory)
            if large:
                figures[f"search.open_ms_{kind}"] = (time.perf_counter() - started) * 1e3
                figures[f"search.open_rss_mb_{kind}"] = anonymous_mb() - before
            count = EXACT_QUERIES_LARGE if (large and kind == "exact") else QUERIES
            times = query_ms(opened, queries[:count])
            figures[f"search.query_ms_p50_{kind}_{label}"] = float(np.percentile(times, 50))
            figures[f"search.query_ms_p99_{kind}_{label}"] = float(np.percentile(times, 99))
            if large and kind == "ivf":
                _, found = opened.index.search(queries, 10)
                figures["search.recall_at_10"] = recall_at(found, truth)
                figures["search.query_ms_p50"] = figures[f"search.query_ms_p50_ivf_{label}"]
                figures["search.query_ms_p99"] = figures[f"search.query_ms_p99_ivf_{label}"]
            del opened
            with contextlib.suppress(OSError):
                for path in directory.iterdir():
                    path.unlink()
        del vectors, centres
    return figures


def photo_files(directory: Path, count: int) -> list[Path]:
    """``count`` JPEG files of 640x480: smooth colour fields with noise, as photographs compress."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0.002, 0.02, 3)
        base = np.stack([np.sin(a * x + i), np.cos(b * y + i), np.sin(c * (x + y))], axis=-1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = directory / f"photo-{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def images_per_s(clip, paths: list[Path], batch: int = 32) -> float:
    schema = shard_schema(clip.embed_dim)
    ids = pa.array([p.name for p in paths])
    items_table(clip, ids[:batch], [str(p) for p in paths[:batch]], schema)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        part = paths[start : start + batch]
        table = items_table(clip, ids[start : start + len(part)], [str(p) for p in part], schema)
        assert table["error"].null_count == len(part)
    return len(paths) / (time.perf_counter() - started)


def image_figures(count: int, work: Path) -> dict[str, float]:
    from commands.index import main as index_main
    from prior.weights import load_models

    paths = photo_files(work / "photos", count)
    figures = {
        "search.index_images_per_s_tiny": images_per_s(load_models("tiny", "cpu").clip, paths),
        "search.index_images_per_s_b32": images_per_s(vit_b32_clip(), paths),
    }
    started = time.perf_counter()
    with contextlib.redirect_stdout(None):
        code = index_main([str(work / "photos"), "-o", str(work / "index"), "--weights", "tiny", "--batch-size", "32"])
    assert code == 0, code
    figures["search.index_job_images_per_s_tiny"] = count / (time.perf_counter() - started)
    figures["search.index_job_indexed"] = json.loads((work / "index" / "manifest.json").read_text())["counts"][
        "indexed"
    ]
    return figures


def run(quick: bool) -> dict[str, float]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-search-") as temporary:
        work = Path(temporary)
        figures = image_figures(64 if quick else IMAGES, work)
        figures.update(vector_figures((20_000, 100_000) if quick else (100_000, 1_000_000), work))
    return figures
