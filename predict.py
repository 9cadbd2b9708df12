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
import ctypes
import ctypes.util
import json
import logging
import os
import platform
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

from dip.loop import default_precision, visualise
from dip.network import CHANNELS
from dip.settings import DipSettings, resolve_seed
from prior.sampling import sample_image_embeds
from prior.weights import load_models

log = logging.getLogger("didp")

OUTPUT_ROOT = LocalPath(os.environ.get("DIDP_OUTPUT_DIR", LocalPath(tempfile.gettempdir()) / "didp-outputs"))
MAX_SEED = 100_000

# Peak memory of one visualisation step in float32, from the CPU's peak resident memory and the
# bytes autograd keeps for the backward pass, rounded up (tests/test_faults.py checks the estimate
# against a measurement):
DIP_FLOATS_PER_PIXEL = 12 * CHANNELS  # per pixel of each level of the network (levels: 1, 1/4, ...)
CUTOUT_FLOATS_PER_PIXEL = 48 * 3  # per pixel of each cutout: cropping, resizing, augmentations
VIT_FLOATS_PER_TOKEN = 16  # per token, unit of width and layer of CLIP's vision transformer
AUTOCAST_FACTOR = 0.65  # fp16/bf16 autocast keeps most activations in half precision
BACKWARD_HEADROOM = 1.25  # gradients of the activations alive while the backward pass runs
DEFAULT_BUDGET_FRACTION = 0.8


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
) -> int:
    """A cheap upper estimate of a visualisation's peak memory: weights plus one step's activations."""
    levels = sum(4.0**-level for level in range(num_scales + 1))
    floats = DIP_FLOATS_PER_PIXEL * size * size * levels
    floats += num_cutouts * CUTOUT_FLOATS_PER_PIXEL * clip_image_size**2
    floats += num_cutouts * VIT_FLOATS_PER_TOKEN * vit_tokens * vit_width * vit_layers
    activations = 4 * floats * BACKWARD_HEADROOM * (1.0 if precision == "fp32" else AUTOCAST_FACTOR)
    return int(resident_bytes + activations)


def total_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The device's memory and what it is: the GPU's, else the machine's (or its cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):  # a container's limit, where there is one
        limit = LocalPath("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
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


def _load_libc():
    with contextlib.suppress(OSError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "malloc_trim"):  # glibc
            return libc
    return None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Hand memory that the run freed back to the system.

    The server runs predictions on threads of their own, and glibc keeps what a thread freed in
    that thread's arena (up to 8 per core): untreated, the resident memory grew by about 70% over
    200 requests on the tiny models; with this trim after every run it stays within a few percent
    (``reliability.rss_growth_pct``; ``MALLOC_ARENA_MAX=2`` in the environment flattens it further).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


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


def _integral(value):
    """``3.0`` -> ``3``: the server validates against the JSON schema, where 3.0 is an integer, and passes it on."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load CLIP and the prior once. Weights: ``DIDP_WEIGHTS`` (``laion``, ``tiny`` or a path)."""
        if torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
            log.warning("no CUDA device: running on the CPU, which is slow at full size")
        self.weights = os.environ.get("DIDP_WEIGHTS", "laion")
        started = time.perf_counter()
        self.models = load_models(self.weights, self.device)
        self.setup_seconds = time.perf_counter() - started
        if self.weights == "tiny":
            log.warning("DIDP_WEIGHTS=tiny: random models, a pipeline check whose images mean nothing")
        self.run_dir: LocalPath | None = None
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
            description="Depth of the network (6 suits 256 px, 7 suits 512 px).", default=6, ge=1, le=10
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
    ) -> Iterator[Path]:
        """Stream the embeddings (.npy), the images (PNG) and result.json."""
        num_scales, size, display_freq, iterations = map(_integral, (num_scales, size, display_freq, iterations))
        num_samples_per_batch, num_cutouts, prior_steps, seed = map(
            _integral, (num_samples_per_batch, num_cutouts, prior_steps, seed)
        )
        inputs = {k: v for k, v in locals().items() if k != "self"}
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
            self._check_memory(settings)
        timings: dict[str, float] = {}
        result: dict = {"inputs": inputs, "seed": settings.seed, "device": str(self.device), "weights": self.weights}
        cancelled = False
        try:
            out = self._fresh_run_dir()
            timings["prior_seconds"] = yield from self._embed(
                prompt, settings.seed, num_samples_per_batch, guidance_scale, prior_steps, out, result
            )
            if mode == "visualize":
                yield from self._visualise(settings, out, result, timings)
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

    def estimate_peak_bytes(self, size: int, num_cutouts: int, num_scales: int) -> int:
        visual = self.models.clip.model.visual
        return estimate_peak_bytes(
            size,
            num_cutouts,
            num_scales,
            clip_image_size=self.models.clip.image_size,
            vit_tokens=int(visual.grid_size[0] * visual.grid_size[1]) + 1,
            vit_width=int(visual.transformer.width),
            vit_layers=int(visual.transformer.layers),
            precision=default_precision(self.device),
            resident_bytes=self.resident_bytes,
        )

    def _check_memory(self, settings: DipSettings) -> None:
        """Refuse, before any work, a visualisation whose estimated peak exceeds the memory budget."""
        size, cutouts, scales = settings.size, settings.num_cutouts, settings.num_scales
        needed = self.estimate_peak_bytes(size, cutouts, scales)
        if needed <= self.memory_budget:
            return
        budget = self.memory_budget
        fitting = [n for n in range(cutouts - 1, 3, -1) if self.estimate_peak_bytes(size, n, scales) <= budget]
        if fitting:
            hint = f"num_cutouts={fitting[0]} fits at size={size}"
        elif size > 256 and self.estimate_peak_bytes(256, 4, min(scales, 6)) <= self.memory_budget:
            hint = "use size=256"
        else:
            hint = "nothing fits: raise DIDP_MEMORY_BUDGET_MB or use a bigger device"
        raise ValueError(
            f"size={size} with num_cutouts={cutouts} and num_scales={scales} needs about "
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

    def _embed(self, prompt, seed, candidates, guidance_scale, prior_steps, out, result) -> Iterator[Path]:
        """Tokens, text embedding and the prior's image embedding; returns the seconds taken."""
        clip, prior = self.models.clip, self.models.prior
        started = time.perf_counter()
        tokens = clip.tokenize(prompt)
        if tokens.truncated[0]:
            log.warning("prompt longer than CLIP's 77 tokens: truncated")
        text = clip.encode_text(tokens.ids.to(self.device))
        generator = torch.Generator(self.device).manual_seed(seed)
        with tqdm(total=prior_steps, desc="prior", file=sys.stderr) as bar:
            sample = sample_image_embeds(
                prior.net,
                prior.schedule,
                text,
                generator,
                candidates=candidates,
                steps=prior_steps,
                cond_scale=guidance_scale,
                callback=lambda i, total: bar.update(1),
            )
        self.text_embed = text.embed
        self.target = F.normalize(sample.image_embeds, dim=-1)
        seconds = time.perf_counter() - started
        result["prompt_truncated"] = tokens.truncated[0]
        result["prior"] = {
            "candidate_similarities": sample.similarities[0].tolist(),
            "chosen_candidate": int(sample.best[0]),
            "steps": prior_steps,
        }
        yield self._write_npy(out / "text_tokens.npy", tokens.ids.numpy().astype(np.int64))
        yield self._write_npy(out / "text_embedding.npy", text.embed.cpu().numpy().astype(np.float32))
        yield self._write_npy(out / "image_embedding.npy", self.target.cpu().numpy().astype(np.float32))
        return seconds

    def _visualise(self, settings: DipSettings, out: LocalPath, result: dict, timings: dict) -> Iterator[Path]:
        started = time.perf_counter()
        frames = visualise(self.target, self.models.clip, settings, device=self.device)
        last = None
        try:
            with tqdm(total=settings.iterations, desc="visualise", file=sys.stderr) as bar:
                for frame in frames:
                    bar.update(frame.step - bar.n)
                    last = frame
                    yield self._write_png(out / f"step_{frame.step:04d}.png", frame.image)
        finally:
            frames.close()  # frees the network and optimiser at once, also when cancelled
        seconds = time.perf_counter() - started
        timings["dip_seconds"] = seconds
        timings["iterations_per_second"] = settings.iterations / seconds if seconds > 0 else 0.0
        image_embed = self.models.clip.embed_image(last.image[None].to(self.device))
        result["final"] = {
            "step": last.step,
            "loss": last.metrics["loss"],
            "similarity_to_target": last.metrics["similarity"],
            "similarity_to_text": float((image_embed @ self.text_embed.T).item()),
        }
        self.record_metric("final_similarity", result["final"]["similarity_to_target"])

    # -- files -----------------------------------------------------------------------------------

    def _fresh_run_dir(self) -> LocalPath:
        """A new ``run-<random hex>`` directory for this run; the previous run's files are removed first.

        The name is recorded before the directory is made, so a cancellation at any point leaves
        nothing that ``_discard_run`` does not know about.
        """
        self._discard_run()
        with _writing(OUTPUT_ROOT):
            OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
            while True:
                self.run_dir = OUTPUT_ROOT / f"run-{secrets.token_hex(8)}"
                with contextlib.suppress(FileExistsError):
                    self.run_dir.mkdir(mode=0o700)
                    return self.run_dir

    def _discard_run(self) -> None:
        """Remove the current run's directory, if any."""
        if self.run_dir is not None:
            self._remove(self.run_dir)
            self.run_dir = None

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
    def _write_json(path: LocalPath, data: dict) -> Path:
        data = {**data, "versions": {"python": platform.python_version(), "torch": torch.__version__}}
        with _writing(path):
            path.write_text(json.dumps(data, indent=2))
        return Path(path)


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's failure (a plain ``RuntimeError``)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        type(error) is RuntimeError and "can't allocate memory" in str(error)
    )
