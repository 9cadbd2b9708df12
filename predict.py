"""Cog runner: a caption -> CLIP text embedding -> prior image embedding -> deep-image-prior picture.

``setup()`` loads CLIP and the prior once (``DIDP_WEIGHTS``: ``laion`` by default, ``tiny`` for
the offline pipeline check, or a directory of converted weights). ``run()`` validates every input
before doing any work, then streams the embeddings as ``.npy`` files, a PNG every
``display_freq`` steps (always the last one) and finally ``result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path as LocalPath

import numpy as np
import torch
import torch.nn.functional as F
from cog import BaseRunner, CancelationException, Input, Path, streaming
from PIL import Image
from tqdm import tqdm

from dip.loop import visualise
from dip.settings import DipSettings, resolve_seed
from prior.sampling import sample_image_embeds
from prior.weights import load_models

log = logging.getLogger("didp")

OUTPUT_ROOT = LocalPath(os.environ.get("DIDP_OUTPUT_DIR", LocalPath(tempfile.gettempdir()) / "didp-outputs"))
MAX_SEED = 100_000


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
        out = self._fresh_run_dir()
        timings: dict[str, float] = {}
        result: dict = {"inputs": inputs, "seed": settings.seed, "device": str(self.device), "weights": self.weights}
        try:
            timings["prior_seconds"] = yield from self._embed(
                prompt, settings.seed, num_samples_per_batch, guidance_scale, prior_steps, out, result
            )
            if mode == "visualize":
                yield from self._visualise(settings, out, result, timings)
            result["timings"] = timings
            for name, value in timings.items():
                self.record_metric(name, value)
            yield self._write_json(out / "result.json", result)
        except CancelationException:
            self._remove(out)
            raise

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
        """A new directory for this run; the previous run's files are removed first."""
        if self.run_dir is not None:
            self._remove(self.run_dir)
        OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
        self.run_dir = LocalPath(tempfile.mkdtemp(prefix="run-", dir=OUTPUT_ROOT))
        return self.run_dir

    @staticmethod
    def _remove(path: LocalPath) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _write_npy(path: LocalPath, array: np.ndarray) -> Path:
        np.save(path, array)
        return Path(path)

    @staticmethod
    def _write_png(path: LocalPath, image: torch.Tensor) -> Path:
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(path)
        return Path(path)

    @staticmethod
    def _write_json(path: LocalPath, data: dict) -> Path:
        data = {**data, "versions": {"python": platform.python_version(), "torch": torch.__version__}}
        path.write_text(json.dumps(data, indent=2))
        return Path(path)
