"""Speed, efficiency and precision of the DIP visualiser on this machine's CPU.

At 256 px with 8 cutouts, with the tiny random CLIP and a random CLIP of ViT-B/32 size:

- ``dip.it_per_s_tiny``, ``dip.it_per_s_b32``: optimisation steps per second in fp32, with a
  frame emitted every ``k`` steps (``k = 6``, ``--quick`` 3): ``k`` over the time from one frame
  to the next, the fastest such span seen;
- ``dip.gflop_per_it_b32``: FLOPs of one step (forward and backward), ``torch.utils.flop_counter``;
- ``dip.peak_fraction_b32``: achieved fp32 FLOP/s over the fp32 matmul peak measured in this run
  (``dip.matmul_peak_gflops``, the best of large square matmuls on the BLAS and on oneDNN). The
  FLOPs are those of the timed span: ``k`` steps and the frame's CLIP embedding of the picture;
- ``dip.peak_fraction_network``, ``dip.peak_fraction_clip_b32``: the same for each half of a step
  on its own (forward and backward): the network rendering the image, CLIP on the cutouts;
- ``dip.bf16_speedup_b32``: steps per second with bf16 autocast over fp32;
- ``dip.bf16_matmul_peak_gflops``, ``dip.bf16_peak_fraction_b32``: the same peak in bf16, and the
  bf16 step's FLOP/s over it (the step's FLOPs as counted in fp32). They account for
  ``dip.bf16_speedup_b32``, which equals the bf16 peak over the fp32 peak times the bf16 step's
  peak fraction over the fp32 step's;
- ``dip.bf16_similarity_gap``: |final similarity fp32 - bf16| after 30 steps, tiny CLIP, same seed;
- ``dip.batched_speedup_n4``: best-of-4 (one target, four seeds) with ``visualise_batch``
  against four ``visualise`` runs one after another, ViT-B/32-sized CLIP, default precision:
  4 x the fastest single-picture span over the fastest batched span;
- ``dip.peak_rss_mb``: the process's peak resident memory during this benchmark (``VmHWM``, reset at
  its start, so that a benchmark run before it in the same process does not count).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from backbone.clip import ClipEncoder, build_clip
from dip import DipSettings, default_precision, visualise, visualise_batch
from dip.network import INPUT_CHANNELS, build_network
from prior.factory import random_models

SETTINGS = DipSettings(size=256, num_scales=6, num_cutouts=8, seed=0)
GAP_STEPS = 30


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """The best GFLOP/s of large square matmuls in ``dtype``, by either of PyTorch's CPU GEMM libraries.

    ``torch.mm`` runs on the BLAS (MKL) in fp32, a 1x1 convolution of a ``[1, n, n, 1]``
    channels-last image on oneDNN, which also runs the network's convolutions. In fp32 they can
    differ by 2x: MKL takes its AVX2 code path on AMD CPUs, oneDNN its AVX-512 one. The better
    is the peak. (In bf16 both run on oneDNN.)
    """
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        image = a.reshape(1, n, 1, n).permute(0, 3, 1, 2)  # a's rows as pixels: [1, n (channels), n, 1], NHWC
        weight = b.t()[:, :, None, None].contiguous()  # [n out, n in, 1, 1]
        for gemm in (partial(torch.mm, a, b), partial(F.conv2d, image, weight)):
            gemm()  # warm-up
            for _ in range(repeats):
                started = time.perf_counter()
                gemm()
                best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


def vit_b32_clip() -> ClipEncoder:
    config = dict(open_clip.get_model_config("ViT-B-32"), quick_gelu=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_clip(config)


def random_target(clip: ClipEncoder) -> torch.Tensor:
    return torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(0))


def span_seconds(clip: ClipEncoder, precision: str, steps: int, seeds: list[int] | None = None) -> float:
    """Seconds from one emitted frame to the next, ``steps`` steps apart, the second frame's work
    included: steps ``steps + 1 .. 2 * steps`` of a run (its step 1 sets up oneDNN's kernels).
    One picture (``visualise``), or one per seed optimised together."""
    settings = SETTINGS.replace(iterations=2 * steps, display_freq=steps)
    if seeds is None:
        frames = visualise(random_target(clip), clip, settings, precision=precision)
    else:
        frames = visualise_batch(random_target(clip), clip, settings, seeds, precision=precision)
    with contextlib.closing(frames):
        next(frames)
        started = time.perf_counter()
        next(frames)
        return time.perf_counter() - started


def fastest_spans(runs: dict[str, tuple[ClipEncoder, str]], steps: int, rounds: int) -> dict[str, float]:
    """The fastest ``span_seconds`` of each configuration, the configurations run in turn ``rounds`` times.

    The fastest, because other processes on a shared machine only ever slow a run down; in
    turn, so that a busy spell does not fall on one configuration only.
    """
    fastest = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (clip, precision) in runs.items():
            fastest[name] = min(fastest[name], span_seconds(clip, precision, steps))
    return fastest


def batched_speedup(clip: ClipEncoder, n: int, steps: int, rounds: int) -> float:
    """n x the fastest single-picture span over the fastest span of n pictures together (default precision)."""
    precision = default_precision(torch.device("cpu"))
    single = batched = float("inf")
    for _ in range(rounds):
        single = min(single, span_seconds(clip, precision, steps))
        batched = min(batched, span_seconds(clip, precision, steps, list(range(n))))
    return n * single / batched


def part_gflops(clip: ClipEncoder, rounds: int) -> dict[str, float]:
    """fp32 GFLOP/s of each half of a step on its own, forward and backward, fastest of ``rounds``:
    the network rendering 256 px (``network``) and CLIP on 8 cutouts (``clip``)."""
    net = build_network(SETTINGS.num_scales, seed=0).to(memory_format=torch.channels_last)
    noise = torch.randn(1, INPUT_CHANNELS, SETTINGS.size, SETTINGS.size).contiguous(memory_format=torch.channels_last)
    cutouts = torch.rand(SETTINGS.num_cutouts, 3, clip.image_size, clip.image_size, requires_grad=True)

    def network():
        image = net(noise)
        image.backward(torch.ones_like(image))

    def clip_part():
        clip.encode_image(cutouts).sum().backward()

    figures = {}
    for name, part in (("network", network), ("clip", clip_part)):
        with FlopCounterMode(display=False) as counter:
            part()
        fastest = float("inf")
        for _ in range(rounds + 1):  # the first sets up oneDNN's kernels
            started = time.perf_counter()
            part()
            fastest = min(fastest, time.perf_counter() - started)
        figures[name] = counter.get_total_flops() / fastest / 1e9
    return figures


def gflop_per_step(clip: ClipEncoder) -> float:
    """FLOPs of a 2-step run minus a 1-step run: one step, without setup or the emitted frame."""
    counts = []
    for iterations in (1, 2):
        with FlopCounterMode(display=False) as counter:
            list(visualise(random_target(clip), clip, SETTINGS.replace(iterations=iterations), precision="fp32"))
        counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) / 1e9


def gflop_per_frame(clip: ClipEncoder) -> float:
    """FLOPs of an emitted frame's own work: CLIP's embedding of the picture, for its similarity."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clip.embed_image(torch.rand(1, 3, SETTINGS.size, SETTINGS.size))
    return counter.get_total_flops() / 1e9


def final_similarity(clip: ClipEncoder, precision: str) -> float:
    settings = SETTINGS.replace(iterations=GAP_STEPS, display_freq=0)
    (frame,) = visualise(random_target(clip), clip, settings, precision=precision)
    return frame.metrics["similarity"]


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux's ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):  # without it, the peak covers the whole process
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(quick: bool) -> dict[str, float]:
    reset_peak_rss()
    steps, rounds = (3, 2) if quick else (6, 3)
    peaks, bf16_peaks = [matmul_peak_gflops()], [matmul_peak_gflops(torch.bfloat16)]
    tiny = random_models("tiny").clip
    b32 = vit_b32_clip()
    spans = fastest_spans({"tiny": (tiny, "fp32"), "b32": (b32, "fp32"), "b32_bf16": (b32, "bf16")}, steps, rounds)
    peaks.append(matmul_peak_gflops())
    bf16_peaks.append(matmul_peak_gflops(torch.bfloat16))
    speedup_n4 = batched_speedup(b32, 4, steps, rounds)
    gflop = gflop_per_step(b32)
    gflop_span = steps * gflop + gflop_per_frame(b32)
    parts = part_gflops(b32, rounds)
    gap = abs(final_similarity(tiny, "fp32") - final_similarity(tiny, "bf16"))
    peaks.append(matmul_peak_gflops())
    bf16_peaks.append(matmul_peak_gflops(torch.bfloat16))
    peak, bf16_peak = max(peaks), max(bf16_peaks)
    if 1.5 * min(peaks) < peak:
        print(f"  (the matmul peak varied {min(peaks):.0f}..{peak:.0f} GFLOP/s: other processes are using the CPU)")
    return {
        "dip.it_per_s_tiny": steps / spans["tiny"],
        "dip.it_per_s_b32": steps / spans["b32"],
        "dip.gflop_per_it_b32": gflop,
        "dip.matmul_peak_gflops": peak,
        "dip.peak_fraction_b32": gflop_span / spans["b32"] / peak,
        "dip.peak_fraction_network": parts["network"] / peak,
        "dip.peak_fraction_clip_b32": parts["clip"] / peak,
        "dip.bf16_speedup_b32": spans["b32"] / spans["b32_bf16"],
        "dip.bf16_matmul_peak_gflops": bf16_peak,
        "dip.bf16_peak_fraction_b32": gflop_span / spans["b32_bf16"] / bf16_peak,
        "dip.bf16_similarity_gap": gap,
        "dip.batched_speedup_n4": speedup_n4,
        "dip.peak_rss_mb": peak_rss_mb(),
    }
