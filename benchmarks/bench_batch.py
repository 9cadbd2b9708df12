"""Batch embeddings: the batched core in this process, and ``didp batch`` on a local Ray.

``ray_figures`` (the Ray job; ``run`` gathers every figure of this file):

- ``batch.core_captions_per_s``: ``pipeline.embeddings.embed_captions`` in this process, in
  batches of 64, the models already loaded (the reference the Ray job is measured against);
  measured before and after the Ray job, the faster of the two kept (on a shared machine the
  rate swings with the other load; the faster one makes the overhead below the less flattering);
- ``batch.ray_captions_per_s``: the same captions through ``commands.batch.main`` (the command,
  in this process), over its whole wall time: Ray's start, the actor's model load, the shards'
  writing included;
- ``batch.ray_overhead``: ``core_captions_per_s / ray_captions_per_s`` (target <= 1.3), both
  measured in this run; the Ray job's fixed costs (Ray's start, the actor's start and model
  load, about 10 s here) are amortised over the captions;
- ``batch.resume_identical``: 1 when a real ``didp batch`` process killed with SIGKILL after its
  first shard and run again ends with the ids of an uninterrupted job in order and the same
  embeddings bit for bit (the batches align with the shards), else 0.

Models: **the tiny random models in both modes**, not the LAION-size prior with a ViT-L/14 text
tower: on this machine's 2 CPU cores (shared) the LAION-size prior embeds about 1-2 captions a
second, so enough captions to amortise Ray's start would take well over the ~10 minutes a full
run may spend, and random LAION-size weights would first have to be written as a weights
directory for the workers to load. The overhead figures therefore bound Ray's cost from above:
with heavier models the same fixed costs weigh less. Full run: 2048 captions, 64 prior steps (the
default); ``quick``: 256 captions, 16 steps. One worker, batches of 64, on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embeddings import PriorSettings, embed_captions, row_seed
from pipeline.shards import read_embeddings
from prior.weights import load_models
from testkit.batch import kill_after_first_shard, vectors

WORDS = ["cat", "dog", "bird", "tree", "house", "river", "cloud", "lamp", "boat", "hill"]
BATCH = 64


def captions(n: int) -> list[str]:
    return [f"a photo of a {WORDS[i % 10]} by a {WORDS[(i // 10) % 10]}, number {i}" for i in range(n)]


def core_rate(texts: list[str], steps: int) -> float:
    models = load_models("tiny")
    settings = PriorSettings(prior_steps=steps)
    ids = [str(i + 1) for i in range(len(texts))]
    embed_captions(models, texts[:BATCH], [row_seed(0, i) for i in ids[:BATCH]], settings)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        embed_captions(models, texts[i : i + BATCH], [row_seed(0, x) for x in ids[i : i + BATCH]], settings)
    return len(texts) / (time.perf_counter() - started)


def ray_job(source: Path, out: Path, steps: int, shard: int) -> float:
    """The whole job's wall time in seconds."""
    import ray

    from commands.batch import main

    args = [str(source), "-o", str(out), "--weights", "tiny", "--prior-steps", str(steps)]
    args += ["--shard-size", str(shard), "--batch-size", str(BATCH), "--workers", "1"]
    started = time.perf_counter()
    assert main(args) == 0, "the Ray job failed"
    seconds = time.perf_counter() - started
    assert not ray.is_initialized()
    assert read_embeddings(out).num_rows == pq.read_metadata(source).num_rows
    return seconds


def resume_identical(tmp: Path, quick: bool) -> float:
    from commands.batch import main

    source = tmp / "resume.txt"
    source.write_text("\n".join(captions(320 if quick else 640)) + "\n")
    args = [str(source), "--weights", "tiny", "--prior-steps", "8", "--shard-size", "32", "--batch-size", "8"]
    killed, whole = tmp / "killed", tmp / "whole"
    process = kill_after_first_shard(*args, "-o", killed)
    written = len(list((killed / "embeddings").glob("part-*.parquet")))
    shards = -(-len(source.read_text().splitlines()) // 32)
    if process.returncode != -9 or not 1 <= written < shards:
        print(f"  resume: not killed midway (exit {process.returncode}, {written} of {shards} shards)", flush=True)
        return 0.0
    if main([*args, "-o", str(killed)]) != 0 or main([*args, "-o", str(whole)]) != 0:
        return 0.0
    resumed, uninterrupted = read_embeddings(killed), read_embeddings(whole)
    same = resumed["id"].to_pylist() == uninterrupted["id"].to_pylist() == [str(i + 1) for i in range(shards * 32)]
    for column in ("image_embedding", "text_embedding"):
        same = same and np.array_equal(vectors(resumed, column), vectors(uninterrupted, column))
    return float(same)


def ray_figures(quick: bool) -> dict[str, float]:
    n, steps, shard = (256, 16, 64) if quick else (2048, 64, 256)
    texts = captions(n)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as name:
        tmp = Path(name)
        source = tmp / "captions.parquet"
        pq.write_table(pa.table({"id": [str(i + 1) for i in range(n)], "caption": texts}), source)
        before = core_rate(texts, steps)
        seconds = ray_job(source, tmp / "out", steps, shard)
        core = max(before, core_rate(texts, steps))
        figures["batch.core_captions_per_s"] = round(core, 2)
        figures["batch.ray_captions_per_s"] = round(n / seconds, 2)
        figures["batch.ray_overhead"] = round(core / (n / seconds), 3)
        figures["batch.resume_identical"] = resume_identical(tmp, quick)
    return figures


def run(quick: bool) -> dict[str, float]:
    figures: dict[str, float] = {}
    figures.update(ray_figures(quick))
    return figures
