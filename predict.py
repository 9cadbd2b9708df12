"""Cog runner: a caption -> CLIP text embedding -> prior image embedding -> deep-image-prior picture.

A thin adapter over ``pipeline`` (which knows nothing of Cog): it declares the inputs as Cog reads
them, hands Cog's files and cancellations over, and reads the environment:

- ``DIDP_WEIGHTS``: ``laion`` (default), ``tiny`` (the offline pipeline check) or a directory;
- ``DIDP_OUTPUT_DIR``: where runs write (default ``$TMPDIR/didp-outputs``);
- ``DIDP_MEMORY_BUDGET_MB``: what a run may use (default 80% of the GPU's or the machine's memory);
- ``DIDP_INDEX``: an index directory built by ``didp index``, searched by ``mode=search``.

The inputs' types, ranges, defaults and descriptions are declared once, in
``pipeline.request.Request``; Cog reads them from ``run``'s signature, so they stand here too, and
``tests/test_inputs.py`` keeps the two equal. A run's files stay until the next prediction (Cog
hands them on after ``run`` yields them); a failed or cancelled run keeps none.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path as LocalPath

from cog import BaseRunner, Input, Path, streaming

from pipeline.request import Request
from pipeline.rundir import RunDirectory
from pipeline.runner import Pipeline

# Cog downloads a URL or data: URI input with tempfile.NamedTemporaryFile(suffix=<its file name>):
# "tmp", 8 random characters, then the name.
_COG_DOWNLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}.*", re.DOTALL)  # a URL may have no file name


def output_root() -> LocalPath:
    return LocalPath(os.environ.get("DIDP_OUTPUT_DIR", LocalPath(tempfile.gettempdir()) / "didp-outputs"))


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


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load CLIP and the prior once (``DIDP_WEIGHTS``); the last run's files, if any, go first."""
        self.discard_outputs()
        self.pipeline = Pipeline(
            os.environ.get("DIDP_WEIGHTS", "laion"),
            output_root=output_root(),
            memory_budget=os.environ.get("DIDP_MEMORY_BUDGET_MB"),
            on_metric=lambda name, value: self.record_metric(name, value),
            index=os.environ.get("DIDP_INDEX") or None,
        )

    @streaming
    def run(
        self,
        prompt: str = Input(description="Caption to visualise: what CLIP should see.", min_length=1, regex=r"\S"),
        mode: str = Input(
            description="visualize: embeddings and images; embed: only the embeddings (fast); "
            "search: the images of the server's index (DIDP_INDEX) nearest the query.",
            default="visualize",
            choices=["visualize", "embed", "search"],
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
            description="Random seed; -1 draws one (reported in result.json).", default=-1, ge=-1, le=100_000
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
        weighted_prompts: str | None = Input(
            description="More captions, each with a weight, added to the prompt (weight 1): caption:weight parts "
            "separated by vertical bars, as in VQGAN+CLIP. A weight is read only where the text after a part's last "
            "colon is a number ('a 3:2 photo' stays a caption); a backslash before a bar makes it literal. A positive "
            "caption gets its own prior embedding; a negative one pushes the picture away from its text embedding.",
            default=None,
        ),
        image_weight: float | None = Input(
            description="With image: mix instead of replace. The picture's CLIP embedding joins the prompt's prior "
            "embedding as one more target, with this weight (the prompt's is 1).",
            default=None,
            ge=-10,
            le=10,
        ),
        embedding: Path | None = Input(
            description="A CLIP image embedding to show instead of the prior's: a .npy file of float32 [d] or "
            "[1, d]; [k, d] gives k pictures optimised together (frame_NN.png). The prompt still names the picture "
            "for scoring. With mode=search: the query ([d] or [1, d]) instead of the caption's.",
            default=None,
        ),
        init_image: Path | None = Input(
            description="A picture (PNG, JPEG or WebP) that the network first learns to reproduce, for init_steps "
            "steps; the CLIP-guided iterations then start from it.",
            default=None,
        ),
        init_steps: int | None = Input(
            description="Steps fitting the network to init_image before the CLIP-guided iterations (default 50).",
            default=None,
            ge=1,
            le=1000,
        ),
        k: int = Input(
            description="mode=search: how many of the index's nearest images to return, best first.",
            default=20,
            ge=1,
            le=100,
        ),
        text_weight: float = Input(
            description="mode=search: the query mixes the prior's image embedding with the caption's text embedding "
            "by this weight (0: the prior's alone, 1: the text embedding alone).",
            default=0.0,
            ge=0,
            le=1,
        ),
        captions: Path | None = Input(
            description="Many captions to embed in one request (mode=embed): text with one caption a line, or CSV, "
            "JSONL or Parquet with id and caption columns, up to 10,000 rows. Gives embeddings.parquet; the "
            "prompt then only names the request.",
            default=None,
        ),
    ) -> Iterator[Path]:
        """Stream the embeddings (.npy, or embeddings.parquet for captions), the images (PNG), any
        animation and result.json."""
        inputs = {name: value for name, value in locals().items() if name != "self"}
        for name in ("image", "captions", "embedding", "init_image"):
            if inputs[name] is not None:
                inputs[name] = uploaded_file(inputs[name], name)
        job = self.pipeline.prepare(Request.check(**inputs))  # everything checked before any work
        self.discard_outputs()
        self.last_run = self.pipeline.new_run_directory()
        for path in self.pipeline.run(job, self.last_run):  # a cancellation discards the run's files
            yield Path(path)

    def discard_outputs(self) -> None:
        """Remove the last run's files now (the server keeps them until the next prediction)."""
        last: RunDirectory | None = getattr(self, "last_run", None)
        if last is not None:
            last.discard()
        self.last_run = None
