"""Batch embeddings: many captions per pass against one caption at a time.

Full run: the LAION-size prior (249 M parameters, random weights) in this CPU's default precision
and a ViT-L/14-size CLIP text tower (random weights, float32), 2 candidates, 64 steps. ``--quick``:
the tiny models (a pipeline check; its rates say nothing of full size).

- ``batch.captions_per_s``: the batched core (``pipeline.embeddings.embed_captions``) on
  ``batch.captions`` captions in batches of ``batch.batch_size``.
- ``batch.single_captions_per_s``: one caption at a time through the pipeline (``mode=embed``
  requests, their files written), on ``batch.single_captions`` captions.
- ``batch.peak_fraction`` / ``batch.single_peak_fraction``: the FLOPs done (torch's flop counter,
  per caption) over the time the same FLOPs take at this CPU's matmul peak in each part's
  precision (the prior's in its dtype, CLIP's in float32), divided by the time measured.
- ``batch.speedup_vs_requests``: captions per second batched over one at a time, same run.
- ``batch.speedup_ceiling``: ``1 / single_peak_fraction``, the most batching could give over one
  caption at a time: every caption at this CPU's matmul peak.
- ``batch.gflop_per_caption``: the prior's and CLIP's FLOPs per caption.

``ray_figures``, the Ray job (``didp batch``), in the same run, on a weights directory written
for it (``testkit.weights``: the LAION-size prior, random, converted to this CPU's precision as a
first start converts LAION's file, and a random CLIP with ViT-L/14's text tower); ``--quick``: the
tiny models:

- ``batch.core_captions_per_s``: ``pipeline.embeddings.embed_captions`` in this process on the
  same models loaded from the same directory, in the job's batch size, with all cores, as the
  local job's worker has them: the reference the Ray job is measured against; measured before
  and after the Ray job, the faster of the two kept (on a shared machine the rate swings with
  the other load; the faster one makes the overhead below the less flattering);
- ``batch.ray_captions_per_s``: the same captions through ``commands.batch.main`` (the command,
  in this process), over its whole wall time: Ray's start, the weights' identity, the worker's
  model load, the shards' writing included;
- ``batch.ray_overhead``: ``core_captions_per_s / ray_captions_per_s`` (target <= 1.3), both
  measured in this run;
- ``batch.ray_fixed_seconds``: the wall time of the same job on one caption: Ray's start, the
  weights' identity, the actor's start and model load, the files; ``batch.ray_marginal_captions_per_s``
  and ``batch.ray_overhead_marginal``: the rate and overhead of the captions beyond those fixed
  costs, ``(n - 1) / (job seconds - fixed seconds)``, i.e. of a long job;
- ``batch.resume_identical``: 1 when a real ``didp batch`` process killed with SIGKILL after its
  first shard and run again ends with the ids of an uninterrupted job in order and the same
  embeddings bit for bit (the batches align with the shards), else 0 (tiny models, in both modes:
  it checks the rows, not the speed).

Full run: 256 captions (those of ``batch.captions_per_s``), 64 prior steps (the default),
batches of 32; ``quick``: 256 captions, 16 steps, batches of 64. One worker, on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from bench_dip import matmul_peak_gflops
from torch.utils.flop_counter import FlopCounterMode

from backbone.clip import build_clip
from pipeline.embeddings import PriorSettings, embed_captions, row_seed
from pipeline.request import Request
from pipeline.runner import Pipeline
from pipeline.shards import read_embeddings
from prior.config import PriorConfig, named_config
from prior.factory import Models, Prior, WeightsIdentity
from prior.model import PriorNetwork
from prior.schedule import NoiseSchedule
from prior.weights import default_prior_dtype, load_models
from testkit.batch import kill_after_first_shard, vectors
from testkit.weights import write_laion_size_weights

WORDS = ["lighthouse", "forest", "bicycle", "harbour", "mountain", "teapot", "violin", "garden"]


def captions(n: int) -> list[str]:
    return [f"a photograph of a {WORDS[i % 8]} at dusk, number {i}" for i in range(n)]


def laion_size_models(dtype: torch.dtype) -> Models:
    """The LAION-size prior and a ViT-L/14 CLIP, random weights (the real files cannot be fetched here)."""
    torch.manual_seed(0)
    clip = build_clip(dict(open_clip.get_model_config("ViT-L-14"), quick_gelu=True))
    net = PriorNetwork(PriorConfig.from_dict(named_config("laion")["prior"])).cast(dtype)
    prior = Prior(net.eval().requires_grad_(False), NoiseSchedule.cosine(net.config.num_timesteps), "random:laion")
    return Models(clip.eval(), prior, "laion-size", WeightsIdentity("laion-size (random)", "0" * 64))


def flops_per_caption(models: Models, settings: PriorSettings) -> tuple[float, float]:
    """(prior FLOPs, CLIP FLOPs) per caption, counted on a batch of 2."""
    texts = captions(2)
    clip_counter = FlopCounterMode(display=False)
    with clip_counter, torch.inference_mode():
        models.clip.encode_text(models.clip.tokenize(texts).ids)
    counter = FlopCounterMode(display=False)
    with counter:
        embed_captions(models, texts, [1, 2], settings)
    clip_flops = clip_counter.get_total_flops() / 2
    return counter.get_total_flops() / 2 - clip_flops, clip_flops


def batched_rate(models: Models, n: int, batch_size: int, settings: PriorSettings) -> float:
    texts, seeds = captions(n), [row_seed(0, i) for i in range(n)]
    embed_captions(models, texts[:batch_size], seeds[:batch_size], settings)  # warm-up
    started = time.perf_counter()
    for i in range(0, n, batch_size):
        embed_captions(models, texts[i : i + batch_size], seeds[i : i + batch_size], settings)
    return n / (time.perf_counter() - started)


def single_rate(pipeline: Pipeline, n: int, settings: PriorSettings) -> float:
    """Captions per second as ``mode=embed`` requests, one after another, files written."""

    def request(i: int) -> None:
        job = pipeline.prepare(
            Request.check(
                prompt=captions(n)[i], mode="embed", num_samples_per_batch=settings.candidates, seed=row_seed(0, i)
            )
        )
        out = pipeline.new_run_directory()
        for _ in pipeline.run(job, out):
            pass
        out.discard()

    request(0)  # warm-up
    started = time.perf_counter()
    for i in range(n):
        request(i)
    return n / (time.perf_counter() - started)


def core_figures(quick: bool) -> dict[str, float]:
    dtype = default_prior_dtype(torch.device("cpu"))
    models = load_models("tiny") if quick else laion_size_models(dtype)
    settings = PriorSettings(candidates=2, prior_steps=64)
    n, batch_size, singles = (64, 32, 8) if quick else (256, 32, 6)
    prior_flops, clip_flops = flops_per_caption(models, settings)
    peak = {dtype: matmul_peak_gflops(dtype) * 1e9, torch.float32: matmul_peak_gflops(torch.float32) * 1e9}
    seconds_at_peak = prior_flops / peak[dtype] + clip_flops / peak[torch.float32]  # per caption
    batched = batched_rate(models, n, batch_size, settings)
    with tempfile.TemporaryDirectory() as root:
        single = single_rate(Pipeline(models, output_root=Path(root), device="cpu"), singles, settings)
    return {
        "batch.captions": float(n),
        "batch.batch_size": float(batch_size),
        "batch.single_captions": float(singles),
        "batch.gflop_per_caption": (prior_flops + clip_flops) / 1e9,
        "batch.captions_per_s": batched,
        "batch.single_captions_per_s": single,
        "batch.peak_fraction": seconds_at_peak * batched,
        "batch.single_peak_fraction": seconds_at_peak * single,
        "batch.speedup_vs_requests": batched / single,
        # what batching could give at most: every caption at this CPU's peak, over one at a time
        "batch.speedup_ceiling": 1 / (seconds_at_peak * single),
        "batch.prior_dtype_is_bf16": float(dtype == torch.bfloat16),
        "batch.matmul_peak_gflops": peak[torch.float32] / 1e9,  # the peaks the fractions are of, this run
        "batch.prior_dtype_matmul_peak_gflops": peak[dtype] / 1e9,
    }


# -- the Ray job ------------------------------------------------------------------------------------------


def core_rate(models: Models, texts: list[str], steps: int, batch_size: int) -> float:
    """The in-process core's captions/s, the models already loaded, in this process's torch threads
    (all cores, as the local job's worker has them)."""
    settings = PriorSettings(prior_steps=steps)
    ids = [str(i + 1) for i in range(len(texts))]
    embed_captions(models, texts[:batch_size], [row_seed(0, i) for i in ids[:batch_size]], settings)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        embed_captions(models, texts[i : i + batch_size], [row_seed(0, x) for x in ids[i : i + batch_size]], settings)
    return len(texts) / (time.perf_counter() - started)


def ray_job(source: Path, out: Path, weights: str, steps: int, shard: int, batch_size: int) -> float:
    """The whole job's wall time in seconds."""
    import ray

    from commands.batch import main

    args = [str(source), "-o", str(out), "--weights", weights, "--prior-steps", str(steps)]
    args += ["--shard-size", str(shard), "--batch-size", str(batch_size), "--workers", "1"]
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
    # full: the 256 captions of the core figures (about 4 minutes a pass at full size on this CPU)
    n, steps, shard, batch_size = (256, 16, 64, 64) if quick else (256, 64, 64, 32)
    texts = captions(n)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as name:
        tmp = Path(name)
        dtype = default_prior_dtype(torch.device("cpu"))
        weights = "tiny" if quick else str(write_laion_size_weights(tmp / "laion-size", dtype))
        models = load_models(weights)
        source = tmp / "captions.parquet"
        pq.write_table(pa.table({"id": [str(i + 1) for i in range(n)], "caption": texts}), source)
        before = core_rate(models, texts, steps, batch_size)
        seconds = ray_job(source, tmp / "out", weights, steps, shard, batch_size)
        one = tmp / "one.parquet"
        pq.write_table(pq.read_table(source).slice(0, 1), one)
        fixed = ray_job(one, tmp / "out-one", weights, steps, shard, batch_size)  # one caption: the fixed costs
        core = max(before, core_rate(models, texts, steps, batch_size))
        del models
        figures["batch.ray_captions"] = float(n)
        figures["batch.ray_batch_size"] = float(batch_size)
        figures["batch.core_captions_per_s"] = round(core, 3)
        figures["batch.ray_captions_per_s"] = round(n / seconds, 3)
        figures["batch.ray_overhead"] = round(core / (n / seconds), 3)
        figures["batch.ray_fixed_seconds"] = round(fixed, 2)
        figures["batch.ray_marginal_captions_per_s"] = round((n - 1) / (seconds - fixed), 3)
        figures["batch.ray_overhead_marginal"] = round(core * (seconds - fixed) / (n - 1), 3)
        figures["batch.resume_identical"] = resume_identical(tmp, quick)
    return figures


def run(quick: bool) -> dict[str, float]:
    figures = core_figures(quick)
    figures.update(ray_figures(quick))
    return figures
