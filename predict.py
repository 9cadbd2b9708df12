"""Cog runner: a caption -> CLIP text embedding -> prior image embedding -> deep-image-prior picture.

``setup()`` loads CLIP and the prior once (``DIDP_WEIGHTS``: ``laion`` by default, ``tiny`` for
the offline pipeline check, or a directory of converted weights). ``run()`` validates every input
before doing any work, then streams the embeddings as ``.npy`` files, a PNG every
``display_freq`` steps (always the last one) and finally ``result.json``.

Failure handling: a visualisation whose estimated peak memory exceeds the budget
(``DIDP_MEMORY_BUDGET_MB``, default 80% of the GPU's or the machine's memory) is refused before
any work; an out-of-memory error during a run, an output directory (``DIDP_OUTPUT_DIR``) that
cannot be written, a cancellation or any other failure removes the run's files, and the next
run starts clean. Output paths never derive from the inputs: ``run-<random hex>/`` holding
fixed file names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path as LocalPath

import numpy as np
import torch
import torch.nn.functional as F
from cog import BaseRunner, CancelationException, Input, Path, streaming
from PIL import Image
from tqdm import tqdm

from backbone.clip import TextEncoding, takes_cpu_bf16_attention
from backbone.hardware import configure_backends, default_device
from dip import visualise_batch
from dip.loop import PRECISION_DTYPES, default_precision, visualise
from dip.network import CHANNELS
from dip.settings import DipSettings, resolve_seed
from pipeline import locks
from pipeline.allocator import keep_freed_memory, release_freed_memory
from pipeline.media import clip_image_tensor, load_image, write_animation
from pipeline.request import Request
from prior.manipulate import interpolation_targets, text_diff_direction, text_diff_targets
from prior.sampling import sample_image_embeds
from prior.weights import load_models

log = logging.getLogger("didp")

OUTPUT_ROOT = LocalPath(os.environ.get("DIDP_OUTPUT_DIR", LocalPath(tempfile.gettempdir()) / "didp-outputs"))
# A run's directory in OUTPUT_ROOT. It is held (pipeline.locks) while it exists; one left by a killed
# process is removed at the next setup.
RUN_DIR = re.compile(r"run-[0-9a-f]{16}")
MAX_SEED = 100_000
# Pixels of a progress animation's frames held at once while it is encoded (about 300 MB as RGB):
# 1,500 frames of one 256 px picture, 47 of eight 512 px pictures side by side.
MAX_ANIMATION_PIXELS = 100_000_000

# Peak memory of one visualisation step in float32, from the CPU's peak resident memory and the
# bytes autograd keeps for the backward pass, rounded up (tests/test_faults.py checks the estimate
# against a measurement):
DIP_FLOATS_PER_PIXEL = 12 * CHANNELS  # per pixel of each level of the network (levels: 1, 1/4, ...)
CUTOUT_FLOATS_PER_PIXEL = 48 * 3  # per pixel of each cutout: cropping, resizing, augmentations
VIT_FLOATS_PER_TOKEN = 16  # per token, unit of width and layer of CLIP's vision transformer
# bf16 attention on the CPU (backbone.clip.takes_cpu_bf16_attention) keeps each layer's scores for
# the backward pass, tokens x tokens per head: the fp32 softmax and its bf16 copy, and room for
# the logits in flight (flash kernels, on CUDA and in fp32, keep none)
ATTENTION_BYTES_PER_SCORE = 4 + 2 + 2
AUTOCAST_FACTOR = 0.65  # fp16/bf16 autocast keeps most activations in half precision
BACKWARD_HEADROOM = 1.25  # gradients of the activations alive while the backward pass runs
DEFAULT_BUDGET_FRACTION = 0.8
# A container's memory limit: cgroup v2, then v1 (older Docker hosts).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


class OutputError(RuntimeError):
    """The output directory cannot be written (missing, not a directory, read-only, full)."""


def estimate_peak_bytes(
    size: int,
    num_cutouts: int,
    num_scales: int,
    clip_image_size: int,
    vit_tokens: int,
    vit_width: int,
    vit_layers: int,
    precision: str = "fp32",
    resident_bytes: int = 0,
    members: int = 1,
    kept_score_heads: int = 0,
) -> int:
    """A cheap upper estimate of a visualisation's peak memory: weights plus one step's activations
    (of ``members`` images optimised together). ``kept_score_heads``: the heads of an attention
    that keeps its scores for the backward pass (``ATTENTION_BYTES_PER_SCORE``), 0 for none."""
    levels = sum(4.0**-level for level in range(num_scales + 1))
    floats = DIP_FLOATS_PER_PIXEL * size * size * levels
    floats += num_cutouts * CUTOUT_FLOATS_PER_PIXEL * clip_image_size**2
    floats += num_cutouts * VIT_FLOATS_PER_TOKEN * vit_tokens * vit_width * vit_layers
    activations = 4 * floats * BACKWARD_HEADROOM * (1.0 if precision == "fp32" else AUTOCAST_FACTOR)
    activations += num_cutouts * vit_layers * kept_score_heads * vit_tokens**2 * ATTENTION_BYTES_PER_SCORE
    return int(resident_bytes + members * activations)


def total_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The device's memory and what it is: the GPU's, else the machine's (or its cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:  # a container's limit, where there is one
        with contextlib.suppress(OSError, ValueError):
            limit = LocalPath(path).read_text().strip()
            if limit != "max":  # cgroup v1 writes a huge number for "no limit" instead
                total = min(total, int(limit))
    return total, "RAM"


def memory_budget_bytes(device: torch.device) -> tuple[int, str]:
    """``DIDP_MEMORY_BUDGET_MB``, else 80% of the device's memory; with a description for messages."""
    setting = os.environ.get("DIDP_MEMORY_BUDGET_MB", "").strip()
    if setting:
        try:
            budget = float(setting)
        except ValueError:
            raise ValueError(f"DIDP_MEMORY_BUDGET_MB must be a number of megabytes, got {setting!r}") from None
        if not budget > 0:
            raise ValueError(f"DIDP_MEMORY_BUDGET_MB must be positive, got {setting!r}")
        return int(min(budget, 2.0**40) * 2**20), f"DIDP_MEMORY_BUDGET_MB={setting}"  # "inf": no limit
    total, kind = total_memory_bytes(device)
    return int(total * DEFAULT_BUDGET_FRACTION), f"{DEFAULT_BUDGET_FRACTION:.0%} of {total / 2**30:.1f} GB {kind}"


def _with_progress(frames, iterations: int, desc: str):
    """The visualiser's frames with a progress bar on stderr. Closing this generator (use
    ``contextlib.closing``: the end, an error, a cancellation) closes ``frames``, which frees the
    networks and optimisers at once."""
    try:
        with tqdm(total=iterations, desc=desc, file=sys.stderr) as bar:
            for frame in frames:
                bar.update(frame.step - bar.n)
                yield frame
    finally:
        frames.close()


@contextlib.contextmanager
def _writing(path: LocalPath):
    """Turn an ``OSError`` while writing ``path`` into an ``OutputError`` that says what to fix."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise OutputError(
            f"cannot write the outputs: {path}: {reason}. DIDP_OUTPUT_DIR ({OUTPUT_ROOT}) must be a writable "
            "directory with free space; this run's files were removed"
        ) from None


# Cog downloads a URL or data: URI input with tempfile.NamedTemporaryFile(suffix=<its file name>):
# "tmp", 8 random characters, then the name.
_COG_DOWNLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}.*", re.DOTALL)  # a URL may have no file name


def uploaded_file(path: LocalPath, name: str) -> LocalPath:
    """A file input as Cog hands it over, refused unless it is one that Cog downloaded.

    Cog saves a URL or ``data:`` URI input directly in the temporary directory, but hands a bare
    string over unchanged, so ``"/etc/passwd"`` would arrive as a path on the server. Only files
    directly in the temporary directory and named as Cog names its downloads are read (not the
    outputs below it, nor anything a symbolic link leads out to, nor another program's file
    there whose name is known).
    """
    resolved = LocalPath(path).resolve()
    if (
        resolved.parent != LocalPath(tempfile.gettempdir()).resolve()
        or not _COG_DOWNLOAD_NAME.fullmatch(resolved.name)
        or not resolved.is_file()
    ):
        raise ValueError(f"{name}: give a URL or a data: URI; a path on the server is not accepted")
    return resolved


def _integral(value):
    """``3.0`` -> ``3``: the server validates against the JSON schema, where 3.0 is an integer, and passes it on."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load CLIP and the prior once. Weights: ``DIDP_WEIGHTS`` (``laion``, ``tiny`` or a path)."""
        self.device = default_device()  # cuda:N, as CLIP's parameters will report it, not a bare cuda
        configure_backends(self.device)
        if self.device.type == "cpu":
            log.warning("no CUDA device: running on the CPU, which is slow at full size")
            keep_freed_memory()  # the visualiser's large tensors reuse the heap instead of page-faulting
        self.weights = os.environ.get("DIDP_WEIGHTS", "laion")
        started = time.perf_counter()
        self.models = load_models(self.weights, self.device)
        self.setup_seconds = time.perf_counter() - started
        if self.weights == "tiny":
            log.warning("DIDP_WEIGHTS=tiny: random models, a pipeline check whose images mean nothing")
        if getattr(self, "run_dir", None) is not None:  # set up again: the last run's files go first
            self._discard_run()
        self.run_dir: LocalPath | None = None
        self.run_lock: locks.Held | None = None
        with contextlib.suppress(OSError):
            if abandoned := locks.remove_abandoned(OUTPUT_ROOT, RUN_DIR):
                log.info("removed %d directories left in %s by ended processes", len(abandoned), OUTPUT_ROOT)
        self.memory_budget, self.memory_budget_source = memory_budget_bytes(self.device)
        modules = (self.models.clip, self.models.prior.net)
        self.resident_bytes = sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))
        log.info("memory budget %.1f GB (%s)", self.memory_budget / 2**30, self.memory_budget_source)

    @streaming
    def run(
        self,
        prompt: str = Input(description="Caption to visualise: what CLIP should see.", min_length=1, regex=r"\S"),
        mode: str = Input(
            description="visualize: embeddings and images; embed: only the embeddings (fast).",
            default="visualize",
            choices=["visualize", "embed"],
        ),
        offset_type: str = Input(
            description="Deformable convolutions: none, 1x1 (stable) or full (wants a lower offset_lr_fac).",
            default="none",
            choices=["none", "1x1", "full"],
        ),
        num_scales: int = Input(
            description="Depth of the network (at most 6 at 256 px, 7 at 512 px).", default=6, ge=1, le=10
        ),
        size: int = Input(description="Side of the square image in pixels.", default=256, choices=[256, 512]),
        input_noise_strength: float = Input(
            description="Fresh noise blended into the network's input, ramped down over the run.",
            default=0.0,
            ge=0,
            le=1,
        ),
        lr: float = Input(description="MADGRAD learning rate.", default=1e-3, ge=0, le=10),
        offset_lr_fac: float = Input(
            description="Learning-rate factor for the offset layers.", default=1.0, ge=0, le=10
        ),
        lr_decay: float = Input(
            description="Learning rate multiplied by this after every step.", default=0.995, ge=0, le=1
        ),
        param_noise_strength: float = Input(
            description="Noise added to the weights after each step, ramped down.", default=0.0, ge=0, le=1
        ),
        display_freq: int = Input(
            description="Emit an image every N steps (the last step always; 0: only the last).",
            default=25,
            ge=0,
            le=100,
        ),
        iterations: int = Input(description="Optimisation steps.", default=250, ge=0, le=1000),
        num_samples_per_batch: int = Input(
            description="Prior candidates; the one closest to the caption is kept.", default=2, ge=1, le=10
        ),
        num_cutouts: int = Input(description="CLIP cutouts per step.", default=8, ge=4, le=32),
        guidance_scale: float = Input(
            description="Prior classifier-free guidance (1: none).", default=1.0, ge=0, le=10
        ),
        prior_steps: int = Input(
            description="Prior sampling steps (1000: the full ancestral loop of the reference).",
            default=64,
            ge=1,
            le=1000,
        ),
        seed: int = Input(
            description="Random seed; -1 draws one (reported in result.json).", default=-1, ge=-1, le=MAX_SEED
        ),
        image: Path | None = Input(
            description="A picture (PNG, JPEG or WebP, up to 40 megapixels and 100:1) whose CLIP image embedding "
            "becomes the target instead of the prior's: how CLIP sees it. The prompt then describes it.",
            default=None,
        ),
        interpolate_to: str | None = Input(
            description="A second caption: one image per step of the slerp from the prompt's image embedding "
            "to this caption's, and an animation of them.",
            default=None,
        ),
        edit_prompt: str | None = Input(
            description="Text diff: turn the target towards (edit_prompt - prompt) in CLIP space.", default=None
        ),
        edit_strength: float = Input(
            description="How far an edit turns the target (0: not at all, 1: all the way).", default=0.5, ge=0, le=1
        ),
        interpolation_steps: int | None = Input(
            description="Targets in an interpolation (default 8) or an edit sequence (an edit without it: one).",
            default=None,
            ge=2,
            le=16,
        ),
        negative_prompt: str | None = Input(
            description="What the picture should not be: steers the prior's guidance (guidance_scale > 1) "
            "and, with negative_weight, the visualiser away from it.",
            default=None,
        ),
        negative_weight: float = Input(
            description="How hard the visualiser pushes away from negative_prompt (0: only the prior uses it).",
            default=0.0,
            ge=0,
            le=1,
        ),
        num_outputs: int = Input(
            description="Images optimised from different seeds, ranked by similarity to the prompt, best first.",
            default=1,
            ge=1,
            le=8,
        ),
        save_animation: bool = Input(description="Also write an animation of every emitted frame.", default=False),
        animation_format: str = Input(description="Format of the animations.", default="webp", choices=["webp", "gif"]),
    ) -> Iterator[Path]:
        """Stream the embeddings (.npy), the images (PNG), any animation and result.json."""
        num_scales, size, display_freq, iterations = map(_integral, (num_scales, size, display_freq, iterations))
        num_samples_per_batch, num_cutouts, prior_steps, seed = map(
            _integral, (num_samples_per_batch, num_cutouts, prior_steps, seed)
        )
        interpolation_steps, num_outputs = map(_integral, (interpolation_steps, num_outputs))
        inputs = {k: v for k, v in locals().items() if k not in ("self", "image")}
        inputs["image"] = None if image is None else "(a file)"
        request = Request.check(
            mode=mode,
            interpolate_to=interpolate_to,
            edit_prompt=edit_prompt,
            edit_strength=edit_strength,
            interpolation_steps=interpolation_steps,
            negative_prompt=negative_prompt,
            negative_weight=negative_weight,
            num_outputs=num_outputs,
            save_animation=save_animation,
            animation_format=animation_format,
        )
        inputs.update({name: getattr(request, name) for name in Request.CAPTIONS})  # a blank one as None
        picture = load_image(uploaded_file(image, "image")) if image is not None else None
        settings = DipSettings(
            num_scales=num_scales,
            offset_type=offset_type,
            input_noise_strength=input_noise_strength,
            lr=lr,
            offset_lr_fac=offset_lr_fac,
            lr_decay=lr_decay,
            param_noise_strength=param_noise_strength,
            display_freq=display_freq,
            iterations=iterations,
            num_cutouts=num_cutouts,
            size=size,
            seed=resolve_seed(seed),
        ).validate()
        if mode == "visualize":
            self._check_memory(settings, request.members)
        timings: dict[str, float] = {}
        result: dict = {"inputs": inputs, "seed": settings.seed, "device": str(self.device), "weights": self.weights}
        if picture is not None:
            result["image"] = {"width": picture.width, "height": picture.height}
        cancelled = False
        try:
            out = self._fresh_run_dir()
            prior_args = (settings.seed, num_samples_per_batch, guidance_scale, prior_steps)
            targets = yield from self._targets(prompt, picture, request, *prior_args, out, result, timings)
            if mode == "visualize":
                if len(targets) == 1 and request.num_outputs == 1:
                    yield from self._visualise(settings, targets, request, out, result, timings)
                else:
                    yield from self._visualise_many(settings, targets, request, out, result, timings)
            result["timings"] = timings
            for name, value in timings.items():
                self.record_metric(name, value)
            yield self._write_json(out / "result.json", result)
        except BaseException as error:  # cancelled, out of memory, unwritable outputs, anything: keep nothing
            self._discard_run()
            if isinstance(error, CancelationException):
                cancelled = True
                raise
            if _is_out_of_memory(error):
                raise self._out_of_memory(error, settings, mode) from None
            raise
        finally:
            if not cancelled:  # a cancellation answers at once; the next run's end trims
                release_freed_memory()

    # -- memory ----------------------------------------------------------------------------------

    def estimate_peak_bytes(self, size: int, num_cutouts: int, num_scales: int, members: int = 1) -> int:
        visual = self.models.clip.model.visual
        precision = default_precision(self.device)
        keeps_scores = takes_cpu_bf16_attention(self.device, PRECISION_DTYPES[precision])
        return estimate_peak_bytes(
            size,
            num_cutouts,
            num_scales,
            clip_image_size=self.models.clip.image_size,
            vit_tokens=self.models.clip.image_tokens,
            vit_width=int(visual.transformer.width),
            vit_layers=int(visual.transformer.layers),
            precision=precision,
            resident_bytes=self.resident_bytes,
            members=members,
            kept_score_heads=int(visual.transformer.resblocks[0].attn.num_heads) if keeps_scores else 0,
        )

    def _check_memory(self, settings: DipSettings, members: int = 1) -> None:
        """Refuse, before any work, a visualisation whose estimated peak exceeds the memory budget."""
        size, cutouts, scales = settings.size, settings.num_cutouts, settings.num_scales
        needed = self.estimate_peak_bytes(size, cutouts, scales, members)
        if needed <= self.memory_budget:
            return
        budget = self.memory_budget

        def fits(size: int, cutouts: int, scales: int) -> bool:
            return self.estimate_peak_bytes(size, cutouts, scales, members) <= budget

        fitting = [n for n in range(cutouts - 1, 3, -1) if fits(size, n, scales)]
        if fitting:
            hint = f"num_cutouts={fitting[0]} fits at size={size}"
        elif size > 256 and fits(256, 4, min(scales, 6)):
            hint = "use size=256"
        elif members > 1:
            hint = "fewer images at once (num_outputs or interpolation_steps) would fit"
        else:
            hint = "nothing fits: raise DIDP_MEMORY_BUDGET_MB or use a bigger device"
        images = f" for {members} images at once" if members > 1 else ""
        raise ValueError(
            f"size={size} with num_cutouts={cutouts} and num_scales={scales}{images} needs about "
            f"{needed / 2**30:.2f} GB on {self.device.type}, over the memory budget of "
            f"{self.memory_budget / 2**30:.2f} GB ({self.memory_budget_source}); {hint}"
        )

    def _out_of_memory(self, error: BaseException, settings: DipSettings, mode: str) -> RuntimeError:
        """Free what the failed run held and describe the failure; the next run starts clean."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        traceback.clear_frames(error.__traceback__)  # the frames still hold the run's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        what = f"size={settings.size}, num_cutouts={settings.num_cutouts}" if mode == "visualize" else "the prior"
        return RuntimeError(
            f"out of memory on {self.device.type} during this run ({what}): {first_line}. The run's memory and "
            "files were released; lower num_cutouts or size, or lower DIDP_MEMORY_BUDGET_MB so that such "
            "requests are refused up front"
        )

    # -- steps ---------------------------------------------------------------------------------

    def _encode(self, caption: str, name: str, result: dict) -> tuple[torch.Tensor, TextEncoding]:
        """Tokens and CLIP's text encoding of one caption; a truncation is logged and recorded."""
        tokens = self.models.clip.tokenize(caption)
        if tokens.truncated[0]:
            log.warning("%s longer than CLIP's 77 tokens: truncated", name)
            result.setdefault("truncated_inputs", []).append(name)
        return tokens.ids, self.models.clip.encode_text(tokens.ids.to(self.device))

    def _sample_prior(self, text, negative, seed, candidates, guidance_scale, prior_steps, name) -> tuple:
        """The prior's l2-normalised image embedding ``[1, d]`` for ``text``, and what the choice was."""
        prior = self.models.prior
        generator = torch.Generator(self.device).manual_seed(seed)
        with tqdm(total=prior_steps, desc=f"prior ({name})", file=sys.stderr) as bar:
            sample = sample_image_embeds(
                prior.net,
                prior.schedule,
                text,
                generator,
                candidates=candidates,
                steps=prior_steps,
                cond_scale=guidance_scale,
                negative=negative,
                callback=lambda i, total: bar.update(1),
            )
        info = {
            "candidate_similarities": sample.similarities[0].tolist(),
            "chosen_candidate": int(sample.best[0]),
            "steps": prior_steps,
        }
        return F.normalize(sample.image_embeds, dim=-1), info

    def _targets(
        self, prompt, picture, request: Request, seed, candidates, guidance_scale, prior_steps, out, result, timings
    ) -> Iterator[Path]:
        """Tokens, text embedding and image embedding (the prior's, or the picture's), then any
        sequence of targets; returns the targets ``[k, d]`` (l2-normalised). ``prior_seconds``: the
        time this took before the first file was handed over."""
        clip = self.models.clip
        started = time.perf_counter()
        ids, text = self._encode(prompt, "prompt", result)
        if request.edit_prompt:  # an edit that cannot work fails before the prior runs
            _, edit_text = self._encode(request.edit_prompt, "edit_prompt", result)
            text_diff_direction(text.embed[0], edit_text.embed[0])
        negative = None
        if request.negative_prompt:
            _, negative = self._encode(request.negative_prompt, "negative_prompt", result)
        prior_args = (negative, seed, candidates, guidance_scale, prior_steps)
        if picture is None:
            base, result["prior"] = self._sample_prior(text, *prior_args, "prompt")
        else:
            with torch.no_grad():
                base = clip.embed_image(clip_image_tensor(picture, clip).to(self.device))
            result["prior"] = None  # the picture's embedding is the target
        result["prompt_truncated"] = "prompt" in result.get("truncated_inputs", [])
        targets = base
        if request.interpolate_to:
            _, other_text = self._encode(request.interpolate_to, "interpolate_to", result)
            other, result["prior_interpolate_to"] = self._sample_prior(other_text, *prior_args, "interpolate_to")
            targets = interpolation_targets(base[0], other[0], request.target_count)
        elif request.edit_prompt:
            targets = text_diff_targets(
                base[0], text.embed[0], edit_text.embed[0], request.edit_strength, request.target_count
            )
            targets = targets.reshape(-1, base.shape[-1])
        self.text_embed = text.embed
        self.negative_embed = None if negative is None else negative.embed[0]
        timings["prior_seconds"] = time.perf_counter() - started
        yield self._write_npy(out / "text_tokens.npy", ids.numpy().astype(np.int64))
        yield self._write_npy(out / "text_embedding.npy", text.embed.cpu().numpy().astype(np.float32))
        yield self._write_npy(out / "image_embedding.npy", base.cpu().numpy().astype(np.float32))
        if request.interpolate_to or request.edit_prompt:
            yield self._write_npy(out / "target_embeddings.npy", targets.cpu().numpy().astype(np.float32))
        return targets

    def _visualise(
        self, settings: DipSettings, target: torch.Tensor, request: Request, out: LocalPath, result: dict, timings
    ) -> Iterator[Path]:
        """One picture of ``target`` (``[1, d]``): a PNG every ``display_freq`` steps."""
        started = time.perf_counter()
        frames = visualise(
            target,
            self.models.clip,
            settings,
            device=self.device,
            negative=self.negative_embed,
            negative_weight=request.negative_weight,
        )
        last, written = None, []
        with contextlib.closing(_with_progress(frames, settings.iterations, "visualise")) as progress:
            for frame in progress:
                last = frame
                written.append(self._write_png(out / f"step_{frame.step:04d}.png", frame.image))
                yield written[-1]
        self._time(settings, started, timings)
        result["final"] = self._scores(last.image[None], [last.metrics])[0] | {"step": last.step}
        self.record_metric("final_similarity", result["final"]["similarity_to_target"])
        if request.save_animation:
            yield self._write_animation(out / "progress", [[path] for path in written], request)

    def _visualise_many(
        self, settings: DipSettings, targets: torch.Tensor, request: Request, out: LocalPath, result: dict, timings
    ) -> Iterator[Path]:
        """Several pictures optimised together: ``num_outputs`` seeds of one target (ranked, best
        first), or one picture per target of a sequence, all from one initialisation and noise."""
        best_of = request.num_outputs > 1
        n = request.num_outputs if best_of else targets.shape[0]
        # seed, seed+1, ... wrapping past MAX_SEED, so that every reported seed can be given back as `seed`
        seeds = [(settings.seed + i) % (MAX_SEED + 1) for i in range(n)] if best_of else [settings.seed] * n
        started = time.perf_counter()
        frames = visualise_batch(
            targets.expand(n, -1) if best_of else targets,
            self.models.clip,
            settings,
            seeds,
            device=self.device,
            negative=self.negative_embed,
            negative_weight=request.negative_weight,
        )
        last, written = None, []
        with contextlib.closing(_with_progress(frames, settings.iterations, f"visualise x{n}")) as progress:
            for frame in progress:
                last = frame
                if frame.step == settings.iterations:
                    continue  # the final pictures are written below, named by rank or position
                written.append([out / f"step_{frame.step:04d}_{j + 1:02d}.png" for j in range(n)])
                for path, image in zip(written[-1], frame.images, strict=True):
                    yield self._write_png(path, image)
        self._time(settings, started, timings)
        scores = self._scores(last.images, last.metrics)
        for j, score in enumerate(scores):
            score["seed"] = seeds[j]
        if best_of:
            order = sorted(range(n), key=lambda j: scores[j]["similarity_to_text"], reverse=True)
            names = {j: f"best_{rank + 1:02d}.png" for rank, j in enumerate(order)}
        else:
            order = list(range(n))
            names = {j: f"frame_{j + 1:02d}.png" for j in order}
        final = []
        for j in order:
            final.append(out / names[j])
            yield self._write_png(final[-1], last.images[j])
        result["outputs"] = [{"file": names[j], **scores[j]} for j in order]
        result["final"] = {"step": last.step, **scores[order[0]]}
        self.record_metric("final_similarity", result["final"]["similarity_to_target"])
        if not best_of:
            kind = "interpolation" if request.interpolate_to else "edit"
            yield self._write_animation(out / kind, [[path] for path in final], request)
        if request.save_animation:
            yield self._write_animation(out / "progress", [*written, [out / names[j] for j in range(n)]], request)

    def _time(self, settings: DipSettings, started: float, timings: dict) -> None:
        seconds = time.perf_counter() - started
        timings["dip_seconds"] = seconds
        timings["iterations_per_second"] = settings.iterations / seconds if seconds > 0 else 0.0

    @torch.no_grad()
    def _scores(self, images: torch.Tensor, metrics: list[dict]) -> list[dict]:
        """Per picture: its loss, and its CLIP embedding's similarity to its target and to the prompt."""
        embeds = self.models.clip.embed_image(images.to(self.device))
        to_text = (embeds @ self.text_embed.T)[:, 0].tolist()
        scores = []
        for metric, similarity in zip(metrics, to_text, strict=True):
            score = {"loss": metric["loss"], "similarity_to_target": metric["similarity"]}
            score["similarity_to_text"] = similarity
            if "similarity_to_negative" in metric:
                score["similarity_to_negative"] = metric["similarity_to_negative"]
            scores.append(score)
        return scores

    # -- files -----------------------------------------------------------------------------------

    def _fresh_run_dir(self) -> LocalPath:
        """A new ``run-<random hex>`` directory for this run; the previous run's files are removed first.

        The name is recorded before the directory is made, so a cancellation at any point leaves
        nothing that ``_discard_run`` does not know about. The directory is held while it exists,
        so that a process killed before removing it leaves it to the next setup to remove.
        """
        self._discard_run()
        with _writing(OUTPUT_ROOT):
            OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
            while True:
                self.run_dir = OUTPUT_ROOT / f"run-{secrets.token_hex(8)}"
                with contextlib.suppress(FileExistsError):
                    self.run_dir.mkdir(mode=0o700)
                    self.run_lock = locks.hold(self.run_dir)
                    return self.run_dir

    def discard_outputs(self) -> None:
        """Remove the last run's files now (the server keeps them until the next prediction; a
        caller that has copied them out, like ``didp``, calls this)."""
        self._discard_run()

    def _discard_run(self) -> None:
        """Remove the current run's directory, if any."""
        if self.run_dir is not None:
            self._remove(self.run_dir)
            self.run_dir = None
        locks.release(self.run_lock)
        self.run_lock = None

    @staticmethod
    def _remove(path: LocalPath) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _write_npy(path: LocalPath, array: np.ndarray) -> Path:
        with _writing(path):
            np.save(path, array)
        return Path(path)

    @staticmethod
    def _write_png(path: LocalPath, image: torch.Tensor) -> Path:
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with _writing(path):
            Image.fromarray(pixels).save(path)
        return Path(path)

    @staticmethod
    def _write_animation(stem: LocalPath, frames: list[list[LocalPath]], request: Request) -> Path:
        """An animation of PNGs already written: one frame per entry, its pictures side by side.

        The encoders hold every frame at once, so a long run's frames are thinned out to at most
        ``MAX_ANIMATION_PIXELS`` in all, evenly spaced, the first and the last always kept.
        """
        with Image.open(frames[0][0]) as first:  # the header only
            frame_pixels = first.width * first.height * len(frames[0])
        frames = evenly_spaced(frames, max(2, MAX_ANIMATION_PIXELS // frame_pixels))

        def tiled(paths: list[LocalPath]) -> Image.Image:
            pictures = [Image.open(path).convert("RGB") for path in paths]
            if len(pictures) == 1:
                return pictures[0]
            width, height = pictures[0].size
            sheet = Image.new("RGB", (width * len(pictures), height))
            for i, picture in enumerate(pictures):
                sheet.paste(picture, (i * width, 0))
            return sheet

        path = stem.with_suffix(f".{request.animation_format}")
        with _writing(path):
            write_animation([tiled(paths) for paths in frames], path, request.animation_format)
        return Path(path)

    @staticmethod
    def _write_json(path: LocalPath, data: dict) -> Path:
        """``data`` as strict JSON: a NaN or infinite number (a diverged run's loss) becomes ``null``."""
        data = {**data, "versions": {"python": platform.python_version(), "torch": torch.__version__}}
        with _writing(path):
            path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False))
        return Path(path)


def _finite(value):
    """``value`` with every non-finite float, however deeply nested, replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# How an allocation failure reads when it does not come as torch.OutOfMemoryError: the CPU
# allocator's, and cuBLAS's or cuDNN's own workspace allocations on a full GPU.
_OUT_OF_MEMORY_MESSAGES = (
    "can't allocate memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def evenly_spaced(items: list, n: int) -> list:
    """At most ``n`` (>= 2) of ``items``, evenly spaced, the first and the last among them."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or an allocation failure reported as a plain ``RuntimeError``
    (or ``torch.AcceleratorError``): the CPU allocator's, cuBLAS's or cuDNN's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        type(error) in (RuntimeError, torch.AcceleratorError)
        and any(message in str(error) for message in _OUT_OF_MEMORY_MESSAGES)
    )
