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
- ``batch.gflop_per_caption``: the prior's and CLIP's FLOPs per caption.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import open_clip
import torch
from bench_dip import matmul_peak_gflops
from torch.utils.flop_counter import FlopCounterMode

from backbone.clip import build_clip
from pipeline.embeddings import PriorSettings, embed_captions, row_seed
from pipeline.request import Request
from pipeline.runner import Pipeline
from prior.config import PriorConfig, named_config
from prior.factory import Models, Prior, WeightsIdentity
from prior.model import PriorNetwork
from prior.schedule import NoiseSchedule
from prior.weights import default_prior_dtype, load_models

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


def run(quick: bool) -> dict[str, float]:
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
    }
