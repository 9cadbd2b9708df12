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
from dip import InitFrame, visualise_batch
from dip.memory import visualisation_peak_bytes
from dip.settings import MAX_DRAWN_SEED, DipSettings, resolve_seed
from prior.factory import Models
from prior.manipulate import interpolation_targets, text_diff_direction, text_diff_targets
from prior.sampling import sample_image_embeds
from prior.weights import load_models

from .allocator import keep_freed_memory, release_freed_memory
from .captions import Captions, read_captions
from .embedding_file import load_embedding
from .embeddings import PriorSettings, embed_captions, row_seed
from .media import load_image, load_init_image
from .memory import MemoryBudget, is_out_of_memory, out_of_memory_error
from .request import Request
from .results import (
    CaptionCounts,
    FinalScore,
    InitPhase,
    OutputPicture,
    PictureSize,
    PriorChoice,
    Result,
    Score,
    SearchResult,
    TargetScore,
)
from .rundir import RunDirectory, remove_abandoned
from .search import SearchSetup, mix, query_row, search, sheet
from .shards import embeddings_table, errors_table
from .weighted_prompts import caption_seed

log = logging.getLogger("didp")

MetricCallback = Callable[[str, float], None]
# Called with each emitted frame's step and its pictures' metrics (loss, similarity, ...), before its files.
FrameCallback = Callable[[int, list[dict]], None]
MAX_CAPTION_ROWS = 10_000  # rows of a request's captions file; didp batch takes any number
NEAREST = 5  # a visualisation with an index: the images nearest its final picture
CAPTION_BATCH = 32  # captions per pass of the prior (benchmarks/bench_batch.py measured this size)


@dataclass(frozen=True)
class Job:
    """A request checked against this pipeline, before any work: its visualiser settings (the
    seed drawn), and its files read: the picture decoded, the embedding rows ``[k, d]``, the init
    picture ``[3, size, size]``."""

    request: Request
    settings: DipSettings
    picture: Image.Image | None = None
    captions: Captions | None = None
    embedding: np.ndarray | None = None
    init_picture: torch.Tensor | None = None

    @property
    def members(self) -> int:
        """Pictures optimised together: the request's, or one per row of its embedding."""
        return max(self.request.members, 0 if self.embedding is None else self.embedding.shape[0])


@dataclass
class Term:
    """A target of the loss beside each picture's own (``Targets.targets``), with its weight: a
    weighted caption's prior embedding (or, weighted below 0, its text embedding), or a mixed-in
    picture's CLIP embedding (``embed [d]``, l2-normalised)."""

    source: str
    weight: float
    embed: torch.Tensor
    caption: str | None = None
    seed: int | None = None


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
    source: str = "prompt"  # what gave `targets`: prompt, image, embedding, interpolate_to or edit_prompt
    added: list[Term] = field(default_factory=list)


@dataclass
class Pictures:
    """A visualisation's outcome: its final score, and each final picture's (several at once)."""

    final: FinalScore
    outputs: list[OutputPicture] | None = None
    similarities: list[list[float]] = field(default_factory=list)  # [picture][target], pictures unranked
    lead: int = 0  # the picture `final` describes
    init: InitPhase | None = None
    best: torch.Tensor | None = None  # [3, H, W] the final (or best) picture


class Pipeline:
    """CLIP and the prior on ``device`` (default: the current CUDA device, else the CPU), loaded
    from ``weights`` (``tiny``, ``laion`` or a path; or models already loaded there), runs writing
    below ``output_root``.

    ``memory_budget``: megabytes a run may use (``"inf"``: no limit), default 80% of the device's
    memory. ``on_metric(name, value)`` receives each run's figures (timings, final similarity);
    ``on_frame(step, metrics)`` each emitted frame's step and its pictures' metrics, as it comes.
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
        on_frame: FrameCallback | None = None,
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
        self.on_frame = on_frame or (lambda step, metrics: None)
        self.search = SearchSetup(index, self.models)
        log.info("memory budget %.1f GB (%s)", self.memory.bytes / 2**30, self.memory.source)

    # -- a request ---------------------------------------------------------------------------------

    def prepare(self, request: Request) -> Job:
        """Check what needs the models but no work: the picture decodes, and a visualisation fits
        the memory budget. Draws the seed for ``seed=-1``."""
        picture = load_image(request.image) if request.image is not None else None
        captions = _captions(request.captions) if request.captions is not None else None
        embedding = None
        if request.embedding is not None:
            embedding = load_embedding(request.embedding, self.models.clip.embed_dim)
            if embedding.shape[0] > 1 and request.num_outputs > 1:
                raise ValueError(
                    f"num_outputs={request.num_outputs} cannot be combined with an embedding of "
                    f"{embedding.shape[0]} rows, which gives one picture per row: set num_outputs=1"
                )
        init = None if request.init_image is None else load_init_image(request.init_image, request.size)
        settings = request.dip_settings(resolve_seed(request.seed))
        if request.mode == "search":
            self.search.require()  # no index: refused at once, saying how to configure one
            if embedding is not None:
                embedding = query_row(embedding)[None]  # the query: one row, l2-normalised
        job = Job(request, settings, picture, captions, embedding, init)
        if request.mode == "visualize":
            self.memory.check(
                lambda size, cutouts, scales: self.peak_bytes(
                    size,
                    cutouts,
                    scales,
                    job.members,
                    targets=1 + request.added_targets,
                    init_image=init is not None,
                ),
                settings.size,
                settings.num_cutouts,
                settings.num_scales,
                job.members,
            )
        return job

    def peak_bytes(
        self,
        size: int,
        num_cutouts: int,
        num_scales: int,
        members: int = 1,
        *,
        targets: int = 1,
        init_image: bool = False,
    ) -> int:
        """A visualisation's estimated peak memory on this pipeline's device, weights included:
        ``targets`` weighted targets per picture, after an init phase if ``init_image``."""
        return visualisation_peak_bytes(
            self.models.clip,
            self.device,
            size,
            num_cutouts,
            num_scales,
            members=members,
            resident_bytes=self.resident_bytes,
            targets=targets,
            init_image=init_image,
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
        elif targets.added:
            rows = torch.stack([embed for _, embed in _target_rows(job, targets)])
            yield out.write_npy("target_embeddings.npy", _array(rows))
        pictures, nearest = None, None
        if job.request.mode == "visualize":
            pictures = yield from self._visualise(job, targets, out, timings)
            self.on_metric("final_similarity", pictures.final.similarity_to_target)
            if pictures.init is not None:
                self.on_metric("init_mse", pictures.init.mse_last_step)
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
            kind, query = "embedding", job.embedding[0]  # normalised in prepare
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
            "init": pictures.init if pictures else None,
            "targets": _target_scores(job, targets, pictures),
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
            if name not in truncated:
                truncated.append(name)
        return tokens.ids, self.models.clip.encode_text(tokens.ids.to(self.device))

    def _sample_prior(
        self, text: TextEncoding, negative: TextEncoding | None, job: Job, name: str, seed: int | None = None
    ) -> tuple[torch.Tensor, PriorChoice]:
        """The prior's l2-normalised image embedding ``[1, d]`` for ``text``, and how it was chosen;
        sampled with ``seed`` (default: the job's)."""
        request, prior = job.request, self.models.prior
        generator = torch.Generator(self.device).manual_seed(job.settings.seed if seed is None else seed)
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
        prior, source, picture = None, "prompt", None
        if job.picture is not None:
            with torch.no_grad():
                picture = clip.embed_image(clip_image_tensor(job.picture, clip).to(self.device))
        if job.embedding is not None:
            base, source = F.normalize(torch.from_numpy(job.embedding).to(self.device), dim=-1), "embedding"
        elif picture is not None and request.image_weight is None:
            base, source = picture, "image"
        else:
            base, prior = self._sample_prior(text, negative, job, "prompt")
        negative_embed = None if negative is None else negative.embed[0]
        found = Targets(ids, text.embed, base, base, negative_embed, prior, truncated=truncated, source=source)
        if picture is not None and request.image_weight is not None:
            found.added.append(Term("image", request.image_weight, picture[0]))
        found.added += self._weighted_terms(job, negative, truncated)
        if request.interpolate_to:
            _, other_text = self._encode(request.interpolate_to, "interpolate_to", truncated)
            other, found.prior_interpolate_to = self._sample_prior(other_text, negative, job, "interpolate_to")
            found.targets = interpolation_targets(base[0], other[0], request.target_count)
        elif request.edit_prompt:
            steps = text_diff_targets(
                base[0], text.embed[0], edit_text.embed[0], request.edit_strength, request.target_count
            )
            found.targets = steps.reshape(-1, base.shape[-1])
        if request.interpolate_to or request.edit_prompt:
            found.source = "interpolate_to" if request.interpolate_to else "edit_prompt"
        return found

    def _weighted_terms(self, job: Job, negative: TextEncoding | None, truncated: list[str]) -> list[Term]:
        """A target per weighted caption: the prior's embedding for a positive weight, sampled with
        ``caption_seed(seed, part)``; the caption's text embedding for a negative one."""
        terms = []
        for part, (caption, weight) in enumerate(job.request.weighted_captions, start=1):
            _, encoding = self._encode(caption, "weighted_prompts", truncated)
            if weight > 0:
                seed = caption_seed(job.settings.seed, part)
                embed, _ = self._sample_prior(encoding, negative, job, f"weighted_prompts {part}", seed)
                terms.append(Term("weighted_prompts", weight, embed[0], caption, seed))
            else:
                terms.append(Term("weighted_prompts", weight, F.normalize(encoding.embed[0], dim=-1), caption))
        return terms

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
        own = targets.targets.expand(n, -1)
        weights = None
        if targets.added:  # each picture's own target first, then the shared weighted ones
            added = torch.stack([term.embed for term in targets.added]).to(own)
            own = torch.cat([own[:, None], added[None].expand(n, -1, -1)], dim=1)
            weights = [1.0] + [term.weight for term in targets.added]
        init_steps = request.resolved_init_steps
        frames = visualise_batch(
            own,
            self.models.clip,
            settings,
            seeds,
            device=self.device,
            negative=targets.negative,
            negative_weight=request.negative_weight,
            weights=weights,
            init_image=job.init_picture,
            init_steps=init_steps,
        )
        last, written, init_mse = None, [], []
        with contextlib.closing(
            _with_progress(frames, settings.iterations, init_steps, "visualise" + ("" if single else f" x{n}"))
        ) as progress:
            for frame in progress:
                if isinstance(frame, InitFrame):  # the init phase: progress and its error, no files
                    init_mse.append(sum(frame.losses) / len(frame.losses))
                    if frame.step == init_steps:
                        timings["init_seconds"] = time.perf_counter() - started
                    continue
                last = frame
                self.on_frame(frame.step, frame.metrics)
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
        clip_seconds = seconds - timings.get("init_seconds", 0.0)
        timings["iterations_per_second"] = settings.iterations / clip_seconds if clip_seconds > 0 else 0.0
        scores = self._scores(last.images, last.metrics, targets.text)
        similarities = [metric.get("similarities", [metric["similarity"]]) for metric in last.metrics]
        init = InitPhase(steps=init_steps, mse_first_step=init_mse[0], mse_last_step=init_mse[-1]) if init_mse else None
        if single:
            pictures = Pictures(
                FinalScore(**scores[0].model_dump(exclude_unset=True), step=last.step),
                None,
                similarities,
                0,
                init,
                best=last.images[0],
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
        final_score = FinalScore(step=last.step, **scores[order[0]].model_dump(exclude_unset=True))
        pictures = Pictures(final_score, outputs, similarities, order[0], init, best=last.images[order[0]])
        if request.is_sequence:
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


def _target_rows(job: Job, targets: Targets) -> list[tuple[TargetScore, torch.Tensor]]:
    """Every target of the loss, in the order of ``result.json``'s ``targets``, with its embedding
    ``[d]``: each picture's own (one, or one per row of an embedding or frame of a sequence), the
    weighted ones, then the negative prompt's when the visualiser pushes away from it."""
    request, rows = job.request, []
    own = targets.targets
    for row, embed in enumerate(own):
        caption = request.prompt if targets.source == "prompt" else None
        seed = job.settings.seed if targets.source in ("prompt", "interpolate_to", "edit_prompt") else None
        if targets.source == "edit_prompt" and targets.prior is None:
            seed = None  # an edit of a picture: no prior sample
        which = row if own.shape[0] > 1 else None
        rows.append((TargetScore(source=targets.source, weight=1.0, caption=caption, row=which, seed=seed), embed))
    for term in targets.added:
        score = TargetScore(source=term.source, weight=term.weight, caption=term.caption, row=None, seed=term.seed)
        rows.append((score, term.embed))
    if targets.negative is not None and request.negative_weight > 0 and request.mode == "visualize":
        score = TargetScore(
            source="negative_prompt",
            weight=-request.negative_weight,
            caption=request.negative_prompt,
            row=None,
            seed=None,
        )
        rows.append((score, targets.negative))
    return rows


def _target_scores(job: Job, targets: Targets, pictures: Pictures | None) -> list[TargetScore]:
    """``_target_rows``'s targets, each with the final picture's similarity to it (a row's own
    picture for the rows of an embedding or a sequence; else the best, or only, picture)."""
    scores = [score for score, _ in _target_rows(job, targets)]
    if pictures is None:
        for score in scores:
            score.similarity = None  # no picture (mode=embed)
        return scores
    lead = pictures.similarities[pictures.lead]
    own = targets.targets.shape[0]
    for index, score in enumerate(scores):
        if score.source == "negative_prompt":
            score.similarity = pictures.final.similarity_to_negative
        elif index < own:
            score.similarity = pictures.similarities[index if own > 1 else pictures.lead][0]
        else:
            score.similarity = lead[1 + index - own]
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


def _with_progress(frames, iterations: int, init_steps: int, desc: str):
    """The visualiser's frames with a progress bar on stderr: one for the init phase (if any), then
    one for the CLIP-guided steps. Closing this generator (use ``contextlib.closing``: the end, an
    error, a cancellation) closes ``frames``, which frees the networks and optimisers at once."""
    bar, phase = None, None
    try:
        for frame in frames:
            kind = "init" if isinstance(frame, InitFrame) else "clip"
            if kind != phase:
                if bar is not None:
                    bar.close()
                total, name = (init_steps, "init (fit init_image)") if kind == "init" else (iterations, desc)
                bar, phase = tqdm(total=total, desc=name, file=sys.stderr), kind
            bar.update(frame.step - bar.n)
            yield frame
    finally:
        if bar is not None:
            bar.close()
        frames.close()
