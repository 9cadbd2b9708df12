"""The pipeline: CLIP and the prior loaded once, then one request at a time as a stream of files.

    pipeline = Pipeline("tiny", output_root=Path("/tmp/didp-outputs"))
    job = pipeline.prepare(Request.check(prompt="a lighthouse", iterations=10))
    out = pipeline.new_run_directory()
    for path in pipeline.run(job, out):
        ...  # the embeddings (.npy), a PNG every display_freq steps, any animation, result.json
    out.discard()  # once the files have been handed on

Everything is given to the constructor; nothing is read from the environment. No state is kept
between requests: a run's targets, scores and result live in the run's own frame.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from backbone.clip import TextEncoding
from backbone.hardware import configure_backends, default_device, resolve_device
from backbone.preprocess import clip_image_tensor
from dip import visualise_batch
from dip.memory import visualisation_peak_bytes
from dip.settings import MAX_DRAWN_SEED, DipSettings, resolve_seed
from prior.factory import Models
from prior.manipulate import interpolation_targets, text_diff_direction, text_diff_targets
from prior.sampling import sample_image_embeds
from prior.weights import load_models

from .allocator import keep_freed_memory, release_freed_memory
from .captions import Captions, read_captions
from .embeddings import PriorSettings, embed_captions, row_seed
from .media import load_image
from .memory import MemoryBudget, is_out_of_memory, out_of_memory_error
from .request import Request
from .results import (
    CaptionCounts,
    FinalScore,
    OutputPicture,
    PictureSize,
    PriorChoice,
    Result,
    Score,
    SearchResult,
)
from .rundir import RunDirectory, remove_abandoned
from .search import SearchSetup, mix, search, sheet
from .shards import embeddings_table, errors_table

log = logging.getLogger("didp")

MetricCallback = Callable[[str, float], None]
MAX_CAPTION_ROWS = 10_000  # rows of a request's captions file; didp batch takes any number
NEAREST = 5  # a visualisation with an index: the images nearest its final picture
CAPTION_BATCH = 32  # captions per pass of the prior (benchmarks/bench_batch.py measured this size)


@dataclass(frozen=True)
class Job:
    """A request checked against this pipeline, before any work: its visualiser settings (the
    seed drawn), and its picture decoded."""

    request: Request
    settings: DipSettings
    picture: Image.Image | None = None
    captions: Captions | None = None
    embedding: np.ndarray | None = None  # mode=search: the embedding input, l2-normalised


@dataclass
class Targets:
    """What a run's pictures are optimised towards (``targets [k, d]``, l2-normalised) and what
    they are scored against, with how the prior chose its embeddings."""

    ids: torch.Tensor  # [1, 77] the prompt's tokens
    text: torch.Tensor  # [1, d] the prompt's CLIP text embedding
    base: torch.Tensor  # [1, d] the prior's (or the picture's) image embedding
    targets: torch.Tensor
    negative: torch.Tensor | None = None  # [d] the negative prompt's text embedding
    prior: PriorChoice | None = None
    prior_interpolate_to: PriorChoice | None = None
    truncated: list[str] = field(default_factory=list)


@dataclass
class Pictures:
    """A visualisation's outcome: its final score, and each final picture's (several at once)."""

    final: FinalScore
    outputs: list[OutputPicture] | None = None
    best: torch.Tensor | None = None  # [3, H, W] the final (or best) picture


class Pipeline:
    """CLIP and the prior on ``device`` (default: the current CUDA device, else the CPU), loaded
    from ``weights`` (``tiny``, ``laion`` or a path; or models already loaded there), runs writing
    below ``output_root``.

    ``memory_budget``: megabytes a run may use (``"inf"``: no limit), default 80% of the device's
    memory. ``on_metric(name, value)`` receives each run's figures (timings, final similarity).
    ``index``: a directory built by ``didp index``, searched by ``mode=search`` (``pipeline.search``).
    """

    def __init__(
        self,
        weights: str | Path | Models = "laion",
        *,
        output_root: Path,
        device: torch.device | str | None = None,
        memory_budget: str | None = None,
        on_metric: MetricCallback | None = None,
        index: Path | None = None,
    ):
        self.device = default_device() if device is None else resolve_device(device)
        self.memory = MemoryBudget.for_device(self.device, memory_budget)  # a bad setting fails before loading
        configure_backends(self.device)
        if self.device.type == "cpu":
            log.warning("no CUDA device: running on the CPU, which is slow at full size")
            keep_freed_memory()  # the visualiser's large tensors reuse the heap instead of page-faulting
        started = time.perf_counter()
        self.models = weights if isinstance(weights, Models) else load_models(weights, self.device)
        self.setup_seconds = time.perf_counter() - started
        if str(weights) == "tiny":
            log.warning("weights=tiny: random models, a pipeline check whose images mean nothing")
        self.output_root = Path(output_root)
        with contextlib.suppress(OSError):
            if abandoned := remove_abandoned(self.output_root):
                log.info("removed %d directories left in %s by ended processes", len(abandoned), self.output_root)
        modules = (self.models.clip, self.models.prior.net)
        self.resident_bytes = sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))
        self.on_metric = on_metric or (lambda name, value: None)
        self.search = SearchSetup(index, self.models)
        log.info("memory budget %.1f GB (%s)", self.memory.bytes / 2**30, self.memory.source)

    # -- a request ---------------------------------------------------------------------------------

    def prepare(self, request: Request) -> Job:
        """Check what needs the models but no work: the picture decodes, and a visualisation fits
        the memory budget. Draws the seed for ``seed=-1``."""
        picture = load_image(request.image) if request.image is not None else None
        captions = _captions(request.captions) if request.captions is not None else None
        settings = request.dip_settings(resolve_seed(request.seed))
        embedding = None
        if request.mode == "search":
            self.search.require()  # no index: refused at once, saying how to configure one
            if request.embedding is not None:
                embedding = self.search.load_embedding(request.embedding)
        if request.mode == "visualize":
            self.memory.check(
                lambda size, cutouts, scales: self.peak_bytes(size, cutouts, scales, request.members),
                settings.size,
                settings.num_cutouts,
                settings.num_scales,
                request.members,
            )
        return Job(request, settings, picture, captions, embedding)

    def peak_bytes(self, size: int, num_cutouts: int, num_scales: int, members: int = 1) -> int:
        """A visualisation's estimated peak memory on this pipeline's device, weights included."""
        return visualisation_peak_bytes(
            self.models.clip,
            self.device,
            size,
            num_cutouts,
            num_scales,
            members=members,
            resident_bytes=self.resident_bytes,
        )

    def new_run_directory(self) -> RunDirectory:
        return RunDirectory.create(self.output_root)

    def run(self, job: Job, out: RunDirectory) -> Iterator[Path]:
        """Stream the embeddings (.npy), the images (PNG), any animation and result.json into ``out``.

        On any failure, a cancellation included, ``out`` is discarded: a run keeps all its
        files or none. An out-of-memory error is reported as what to change.
        """
        interrupted = False
        try:
            yield from self._run(job, out)
        except BaseException as error:
            out.discard()
            interrupted = not isinstance(error, Exception)  # cancelled: answer at once, trim after the next run
            if is_out_of_memory(error):
                settings = job.settings
                what = "the prior"
                if job.request.mode == "visualize":
                    what = f"size={settings.size}, num_cutouts={settings.num_cutouts}"
                raise out_of_memory_error(error, self.device, what) from None
            raise
        finally:
            if not interrupted:
                release_freed_memory()

    def _run(self, job: Job, out: RunDirectory) -> Iterator[Path]:
        timings: dict[str, float] = {}
        if job.captions is not None:
            counts = yield from self._embed_captions(job, out, timings)
            result = Result(
                inputs=job.request.echo(),
                seed=job.settings.seed,
                device=str(self.device),
                weights=self.models.identity.to_dict(),
                captions=counts,
                timings=timings,
                versions=_versions(),
            )
            yield out.write_text("result.json", result.to_json())
            return
        if job.request.mode == "search":
            yield from self._search(job, out, timings)
            return
        started = time.perf_counter()
        targets = self.targets(job)
        timings["prior_seconds"] = time.perf_counter() - started
        yield out.write_npy("text_tokens.npy", targets.ids.numpy().astype(np.int64))
        yield out.write_npy("text_embedding.npy", _array(targets.text))
        yield out.write_npy("image_embedding.npy", _array(targets.base))
        if job.request.interpolate_to or job.request.edit_prompt:
            yield out.write_npy("target_embeddings.npy", _array(targets.targets))
        pictures, nearest = None, None
        if job.request.mode == "visualize":
            pictures = yield from self._visualise(job, targets, out, timings)
            self.on_metric("final_similarity", pictures.final.similarity_to_target)
            nearest = self._nearest(pictures)
        for name, value in timings.items():
            self.on_metric(name, value)
        result = self._result(job, targets, pictures, timings)
        if job.request.mode == "visualize" and nearest is not None:
            result.nearest = nearest
        yield out.write_text("result.json", result.to_json())

    def _nearest(self, pictures: Pictures) -> SearchResult | None:
        """With an index: its images nearest the final (or best) picture's CLIP embedding."""
        index = self.search.index
        if index is None or pictures.best is None:
            return None
        with torch.no_grad():
            embed = self.models.clip.embed_image(pictures.best.unsqueeze(0).to(self.device))
        found, _ = search(index, _array(embed)[0], NEAREST, "picture", None, with_embedding=False)
        return found

    def _search(self, job: Job, out: RunDirectory, timings: dict) -> Iterator[Path]:
        """``mode=search``: the query embedding (the ``embedding`` file, the ``image``'s, or the
        caption's prior and text embeddings mixed by ``text_weight``), the index's ``k`` nearest
        images, their contact sheet and ``result.json``."""
        request, index = job.request, self.search.require()
        started = time.perf_counter()
        prior, truncated, weight = None, [], None
        if job.embedding is not None:
            kind, query = "embedding", job.embedding
        elif job.picture is not None:
            with torch.no_grad():
                embed = self.models.clip.embed_image(clip_image_tensor(job.picture, self.models.clip).to(self.device))
            kind, query = "image", _array(embed)[0]
        else:
            weight = request.text_weight
            kind = {0.0: "prior", 1.0: "text"}.get(weight, "mix")
            _, text = self._encode(request.prompt, "prompt", truncated)
            image = None
            if weight < 1:
                negative = None
                if request.negative_prompt:
                    _, negative = self._encode(request.negative_prompt, "negative_prompt", truncated)
                image, prior = self._sample_prior(text, negative, job, "prompt")
                image = _array(image)[0]
            query = mix(image, _array(text.embed)[0], weight)
        timings["query_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        found, matches = search(index, query, request.k, kind, weight)
        timings["search_seconds"] = time.perf_counter() - started
        yield out.write_npy("query_embedding.npy", query.astype(np.float32))
        yield out.write_png("contact_sheet.png", sheet(index, matches))
        for name, value in timings.items():
            self.on_metric(name, value)
        result = Result(
            inputs=request.echo(),
            seed=job.settings.seed,
            device=str(self.device),
            weights=self.models.identity.to_dict(),
            prior=prior,
            prompt_truncated="prompt" in truncated,
            search=found,
            timings=timings,
            versions=_versions(),
        )
        if truncated:
            result.truncated_inputs = truncated
        yield out.write_text("result.json", result.to_json())

    def _result(self, job: Job, targets: Targets, pictures: Pictures | None, timings: dict) -> Result:
        optional = {  # left out of result.json where None
            "image": PictureSize(width=job.picture.width, height=job.picture.height) if job.picture else None,
            "truncated_inputs": targets.truncated or None,
            "prior_interpolate_to": targets.prior_interpolate_to,
            "final": pictures.final if pictures else None,
            "outputs": pictures.outputs if pictures else None,
        }
        return Result(
            inputs=job.request.echo(),
            seed=job.settings.seed,
            device=str(self.device),
            weights=self.models.identity.to_dict(),
            prior=targets.prior,  # None (written as null) when a picture gave the target
            prompt_truncated="prompt" in targets.truncated,
            timings=timings,
            versions=_versions(),
            **{name: value for name, value in optional.items() if value is not None},
        )

    def _embed_captions(self, job: Job, out: RunDirectory, timings: dict) -> Iterator[Path]:
        """``embeddings.parquet`` (and ``errors.parquet`` for the rows set aside) of a captions
        file, each row seeded by ``row_seed(seed, id)`` as ``didp batch --seed`` does; returns the counts."""
        request, table = job.request, job.captions.table
        good = table.filter(table["problem"].is_null())
        ids, texts = good["id"].to_pylist(), good["caption"].to_pylist()
        seeds = [row_seed(job.settings.seed, row_id) for row_id in ids]
        settings = PriorSettings(
            request.num_samples_per_batch, request.guidance_scale, request.prior_steps, request.negative_prompt
        )
        started, parts = time.perf_counter(), []
        with tqdm(total=len(ids), desc="captions", unit="caption", file=sys.stderr) as bar:
            for i in range(0, len(ids), CAPTION_BATCH):
                batch = slice(i, i + CAPTION_BATCH)
                parts.append(
                    embeddings_table(
                        ids[batch],
                        texts[batch],
                        seeds[batch],
                        embed_captions(self.models, texts[batch], seeds[batch], settings),
                    )
                )
                bar.update(len(parts[-1]))
        timings["prior_seconds"] = time.perf_counter() - started
        embedded = pa.concat_tables(parts)
        yield out.write_parquet("embeddings.parquet", embedded)
        bad = table.filter(table["problem"].is_valid())
        if bad.num_rows:
            yield out.write_parquet("errors.parquet", errors_table(bad["id"].to_pylist(), bad["problem"].to_pylist()))
        truncated = int(pc.sum(embedded["truncated"]).as_py() or 0)
        return CaptionCounts(rows=table.num_rows, embedded=embedded.num_rows, errors=bad.num_rows, truncated=truncated)

    # -- the prior -----------------------------------------------------------------------------------

    def _encode(self, caption: str, name: str, truncated: list[str]) -> tuple[torch.Tensor, TextEncoding]:
        """Tokens and CLIP's text encoding of one caption; a truncation is logged and recorded."""
        tokens = self.models.clip.tokenize(caption)
        if tokens.truncated[0]:
            log.warning("%s longer than CLIP's 77 tokens: truncated", name)
            truncated.append(name)
        return tokens.ids, self.models.clip.encode_text(tokens.ids.to(self.device))

    def _sample_prior(
        self, text: TextEncoding, negative: TextEncoding | None, job: Job, name: str
    ) -> tuple[torch.Tensor, PriorChoice]:
        """The prior's l2-normalised image embedding ``[1, d]`` for ``text``, and how it was chosen."""
        request, prior = job.request, self.models.prior
        generator = torch.Generator(self.device).manual_seed(job.settings.seed)
        with tqdm(total=request.prior_steps, desc=f"prior ({name})", file=sys.stderr) as bar:
            sample = sample_image_embeds(
                prior.net,
                prior.schedule,
                text,
                generator,
                candidates=request.num_samples_per_batch,
                steps=request.prior_steps,
                cond_scale=request.guidance_scale,
                negative=negative,
                callback=lambda i, total: bar.update(1),
            )
        choice = PriorChoice(
            candidate_similarities=sample.similarities[0].tolist(),
            chosen_candidate=int(sample.best[0]),
            steps=request.prior_steps,
        )
        return F.normalize(sample.image_embeds, dim=-1), choice

    def targets(self, job: Job) -> Targets:
        """Tokens, text embedding and image embedding (the prior's, or the picture's), then any
        sequence of targets."""
        request, clip, truncated = job.request, self.models.clip, []
        ids, text = self._encode(request.prompt, "prompt", truncated)
        if request.edit_prompt:  # an edit that cannot work fails before the prior runs
            _, edit_text = self._encode(request.edit_prompt, "edit_prompt", truncated)
            text_diff_direction(text.embed[0], edit_text.embed[0])
        negative = None
        if request.negative_prompt:
            _, negative = self._encode(request.negative_prompt, "negative_prompt", truncated)
        prior = None
        if job.picture is None:
            base, prior = self._sample_prior(text, negative, job, "prompt")
        else:
            with torch.no_grad():
                base = clip.embed_image(clip_image_tensor(job.picture, clip).to(self.device))
        negative_embed = None if negative is None else negative.embed[0]
        found = Targets(ids, text.embed, base, base, negative_embed, prior, truncated=truncated)
        if request.interpolate_to:
            _, other_text = self._encode(request.interpolate_to, "interpolate_to", truncated)
            other, found.prior_interpolate_to = self._sample_prior(other_text, negative, job, "interpolate_to")
            found.targets = interpolation_targets(base[0], other[0], request.target_count)
        elif request.edit_prompt:
            steps = text_diff_targets(
                base[0], text.embed[0], edit_text.embed[0], request.edit_strength, request.target_count
            )
            found.targets = steps.reshape(-1, base.shape[-1])
        return found

    # -- the visualiser ------------------------------------------------------------------------------

    def _visualise(self, job: Job, targets: Targets, out: RunDirectory, timings: dict) -> Iterator[Path]:
        """The pictures, optimised together: one picture of one target; ``num_outputs`` seeds of one
        target (ranked, best first); or one picture per target of a sequence, all from one
        initialisation and noise. Returns their ``Pictures``."""
        request, settings = job.request, job.settings
        best_of = request.num_outputs > 1
        n = request.num_outputs if best_of else targets.targets.shape[0]
        single = n == 1
        # seed, seed+1, ... wrapping past MAX_DRAWN_SEED, so that every reported seed can be given back as `seed`
        seeds = [(settings.seed + i) % (MAX_DRAWN_SEED + 1) for i in range(n)] if best_of else [settings.seed] * n
        started = time.perf_counter()
        frames = visualise_batch(
            targets.targets.expand(n, -1),
            self.models.clip,
            settings,
            seeds,
            device=self.device,
            negative=targets.negative,
            negative_weight=request.negative_weight,
        )
        last, written = None, []
        with contextlib.closing(
            _with_progress(frames, settings.iterations, "visualise" + ("" if single else f" x{n}"))
        ) as progress:
            for frame in progress:
                last = frame
                if single:
                    written.append([out.path / f"step_{frame.step:04d}.png"])
                elif frame.step == settings.iterations:
                    continue  # the final pictures are written below, named by rank or position
                else:
                    written.append([out.path / f"step_{frame.step:04d}_{j + 1:02d}.png" for j in range(n)])
                for path, image in zip(written[-1], frame.images, strict=True):
                    yield out.write_png(path.name, image)
        seconds = time.perf_counter() - started
        timings["dip_seconds"] = seconds
        timings["iterations_per_second"] = settings.iterations / seconds if seconds > 0 else 0.0
        scores = self._scores(last.images, last.metrics, targets.text)
        if single:
            pictures = Pictures(
                FinalScore(**scores[0].model_dump(exclude_unset=True), step=last.step), best=last.images[0]
            )
            if request.save_animation:
                yield out.write_animation("progress", written, request.animation_format)
            return pictures
        for score, seed in zip(scores, seeds, strict=True):
            score.seed = seed
        if best_of:
            order = sorted(range(n), key=lambda j: scores[j].similarity_to_text, reverse=True)
            names = {j: f"best_{rank + 1:02d}.png" for rank, j in enumerate(order)}
        else:
            order = list(range(n))
            names = {j: f"frame_{j + 1:02d}.png" for j in order}
        final = []
        for j in order:
            final.append(out.write_png(names[j], last.images[j]))
            yield final[-1]
        outputs = [OutputPicture(file=names[j], **scores[j].model_dump(exclude_unset=True)) for j in order]
        pictures = Pictures(
            FinalScore(step=last.step, **scores[order[0]].model_dump(exclude_unset=True)),
            outputs,
            last.images[order[0]],
        )
        if not best_of:
            kind = "interpolation" if request.interpolate_to else "edit"
            yield out.write_animation(kind, [[path] for path in final], request.animation_format)
        if request.save_animation:
            progress_frames = [*written, [out.path / names[j] for j in range(n)]]
            yield out.write_animation("progress", progress_frames, request.animation_format)
        return pictures

    @torch.no_grad()
    def _scores(self, images: torch.Tensor, metrics: list[dict], text: torch.Tensor) -> list[Score]:
        """Per picture: its loss, and its CLIP embedding's similarity to its target and to the prompt."""
        embeds = self.models.clip.embed_image(images.to(self.device))
        to_text = (embeds @ text.T)[:, 0].tolist()
        scores = []
        for metric, similarity in zip(metrics, to_text, strict=True):
            score = Score(loss=metric["loss"], similarity_to_target=metric["similarity"], similarity_to_text=similarity)
            if "similarity_to_negative" in metric:
                score.similarity_to_negative = metric["similarity_to_negative"]
            scores.append(score)
        return scores


def _captions(path: Path) -> Captions:
    """A request's captions file, checked: some rows to embed, at most ``MAX_CAPTION_ROWS``."""
    try:
        rows = read_captions(path, sniff=True)
    except ValueError as error:
        raise ValueError(f"captions: {error}".replace(f"{path}: ", "")) from None
    if len(rows) > MAX_CAPTION_ROWS:
        raise ValueError(
            f"captions: {len(rows)} rows, over the limit of {MAX_CAPTION_ROWS} a request; "
            "didp batch embeds any number, resumably"
        )
    if rows.bad == len(rows):
        first = rows.table["problem"][0].as_py()
        raise ValueError(f"captions: no row has a caption to embed (row {rows.table['id'][0].as_py()}: {first})")
    return rows


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__}


def _array(embeds: torch.Tensor) -> np.ndarray:
    return embeds.cpu().numpy().astype(np.float32)


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
