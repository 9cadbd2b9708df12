"""``didp index``: embed every image of a folder (or a Parquet list of paths or URLs) with CLIP's
image tower, on Ray Data, and build a FAISS index of them, resumably.

    didp index photos/ -o my-index/ [--weights W] [--address ray://head:10001] [--workers N]

It runs as ``didp batch`` does (``commands.rayjob``): the input is listed and the directory's
manifest compared before any work; each worker (a Ray actor) loads CLIP once and reads, checks,
thumbnails and embeds batches of images; the driver writes each shard whole as its rows come in.
An image that cannot be indexed (unreadable, not an image, a bomb, truncated) is set aside with
its reason (``errors.parquet``) and the job goes on. Once every shard is written the index is
built (``retrieval.store``). A rerun skips the shards written (and, when complete, everything).

The environment, read here only: ``DIDP_WEIGHTS`` (``--weights`` wins) and ``RAY_ADDRESS``
(``--address`` wins; neither: a local Ray in this process).

Exit codes: 0 done, 2 refused (input, settings, output directory), 1 failed (set-up, workers,
FAISS missing), 130 / 143 stopped by Ctrl-C / SIGTERM (run again to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from commands.rayjob import start_ray, stoppable, stream_shards, versions
from commands.signals import uninterrupted
from pipeline.locks import DirectoryBusy, hold, release
from pipeline.shards import input_sha256, remove_temporaries, shard_count, write_parquet
from retrieval.identity import ClipIdentity
from retrieval.sources import SourcesError, list_sources
from retrieval.store import (
    IndexCounts,
    IndexManifest,
    IndexSettings,
    finish_index,
    import_faiss,
    read_manifest,
    shard_counts,
    shard_path,
    shard_schema,
    write_manifest,
    written_shards,
)

DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 32


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="didp index",
        description="Embed every image of a folder (recursively), or of a Parquet file's path or url column, "
        "with CLIP's image tower on Ray Data, and build a FAISS index to search with didp search or "
        "mode=search (DIDP_INDEX). A rerun resumes.",
        epilog="Outputs in -o: manifest.json, shards/, errors.parquet (images set aside, with the reason), "
        "items.parquet, thumbnails.bin, thumbnail_offsets.npy, index.faiss. Exit codes: 0 done, 2 refused, 1 failed.",
    )
    p.add_argument("src", type=Path, help="a folder of images, or a Parquet file with a path or url column")
    p.add_argument("-o", "--output", type=Path, required=True, help="the index directory (a rerun there resumes)")
    p.add_argument("--weights", help="tiny, laion or a directory of weights (default: $DIDP_WEIGHTS or laion)")
    p.add_argument("--address", help="a Ray cluster to join, e.g. ray://head:10001 (default: $RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=_positive, default=1, help="model replicas (Ray actors; one GPU each on GPUs)")
    p.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="images per CLIP call")
    p.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, help="input items per shard")
    p.add_argument("--column", help="Parquet: the path or URL column (default: path, else url)")
    p.add_argument("--id-column", help="Parquet: the id column (default: the path or URL itself)")
    p.add_argument(
        "--index",
        choices=["auto", "exact", "ivf"],
        default="auto",
        help="exact inner product, an IVF index, or auto: exact up to 100,000 images (default auto)",
    )
    return p


@dataclass
class Job:
    rows: pa.Table  # id, source
    settings: IndexSettings
    output: Path
    weights: str
    fingerprint: str

    @property
    def shards(self) -> int:
        return shard_count(self.rows.num_rows, self.settings.shard_size)

    def per_shard(self) -> list[int]:
        size = self.settings.shard_size
        return [min(size, self.rows.num_rows - k * size) for k in range(self.shards)]

    def manifest(self, clip: ClipIdentity, counts: IndexCounts, **extra) -> IndexManifest:
        return IndexManifest(
            clip=clip,
            input_sha256=self.fingerprint,
            settings=self.settings,
            versions=versions(),
            counts=counts,
            **extra,
        )


class Refused(Exception):
    """A job refused before any work (exit code 2)."""


def check_against_earlier(job: Job, clip: ClipIdentity | None) -> IndexManifest | None:
    """This directory's earlier manifest, refused if it is another index (``clip`` ``None``:
    compare everything but CLIP)."""
    earlier = read_manifest(job.output)
    if earlier is None:
        if any((job.output / "shards").glob("part-*.parquet")):
            raise Refused(f"-o {job.output}: holds shards but no manifest.json; choose another directory")
        return None
    probe = job.manifest(clip or earlier.clip, earlier.counts)
    if differences := probe.differences(earlier):
        raise Refused(
            f"-o {job.output} holds another index: its {'; '.join(differences)}. "
            "Use another directory, or the earlier job's settings and input to resume it."
        )
    return earlier


# -- Ray ------------------------------------------------------------------------------------------


class ImageEmbedder:
    """A Ray Data worker: CLIP loaded once, then batches of items read, checked, thumbnailed and
    embedded; an item that fails gets its ``error`` instead of an embedding."""

    def __init__(self, weights: str, sha256: str, dim: int):
        import torch

        from prior.weights import load_models
        from retrieval.identity import clip_identity

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = load_models(weights, device)
        found = clip_identity(self.models)
        if found.sha256 != sha256:  # another node with other files under the same name
            raise RuntimeError(
                f"CLIP {weights!r} on this worker has sha256 {found.sha256[:12]}, the job's {sha256[:12]}"
            )
        self.schema = shard_schema(dim)
        self.shard = pa.field("shard", pa.int64())  # the rows' shard, carried through for the driver

    def __call__(self, batch: pa.Table) -> pa.Table:
        from retrieval.images import items_table

        rows = items_table(self.models.clip, batch["id"], batch["source"].to_pylist(), self.schema)
        return rows.append_column(self.shard, batch["shard"])


def _identify(weights: str) -> ClipIdentity:
    from prior.weights import load_models
    from retrieval.identity import clip_identity

    return clip_identity(load_models(weights, "cpu"))


def identify(weights: str, local: bool) -> ClipIdentity:
    """CLIP's identity, here for a local Ray, else in a task on a worker of the cluster (which has
    the workers' files). CLIP runs in float32 everywhere, so the device does not change it."""
    import ray

    if local:
        return _identify(weights)
    return ray.get(ray.remote(_identify).remote(weights))


def pending_rows(job: Job, pending: list[int]) -> pa.Table:
    size = job.settings.shard_size
    parts = []
    for k in pending:
        part = job.rows.slice(k * size, size)
        parts.append(part.append_column("shard", pa.array([k] * part.num_rows, pa.int64())))
    return pa.concat_tables(parts) if parts else pa.table({"id": [], "source": [], "shard": []})


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``didp index``; Ctrl-C (130) and SIGTERM (143) stop it between shards."""
    args = parser().parse_args(argv)
    state = {"written": 0, "shards": None}
    return stoppable(_main, args, state)


def _main(args, state) -> int:
    weights = args.weights or os.environ.get("DIDP_WEIGHTS", "laion")
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    try:
        import_faiss()  # before any work: the index is built at the end
        rows = list_sources(args.src, args.column, args.id_column)
    except SourcesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    settings = IndexSettings(shard_size=args.shard_size, column=args.column, id_column=args.id_column, index=args.index)
    output = args.output
    if output.exists() and not output.is_dir():
        print(f"error: -o {output}: not a directory", file=sys.stderr)
        return 2
    try:
        output.mkdir(parents=True, exist_ok=True)
        lock = hold(output)
    except DirectoryBusy:
        print(f"error: -o {output}: another didp index is writing there", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: -o {output}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        job = Job(rows, settings, output, weights, input_sha256(rows["id"], rows["source"]))
        try:
            check_against_earlier(job, None)
        except (Refused, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return _run(job, address, args, state)
    finally:
        release(lock)


def _run(job: Job, address: str | None, args, state) -> int:
    import ray

    output = job.output
    state["shards"] = job.shards
    started_here = True
    try:
        started_here = start_ray(address)
        clip = identify(job.weights, local=address is None)
    except Exception as error:  # no cluster there, weights missing or broken
        print(f"error: setup failed: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        if started_here:
            ray.shutdown()
        return 1
    try:
        try:
            earlier = check_against_earlier(job, clip)
        except (Refused, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if earlier is not None and earlier.complete:
            print(f"done already: {earlier.counts.indexed} images indexed in {output}", file=sys.stderr)
            return 0
        with uninterrupted():
            remove_temporaries(output)
            done = written_shards(output, job.shards)
            indexed, errors = shard_counts(output, done)
            state["written"] = len(done)
            counts = IndexCounts(
                items=job.rows.num_rows, indexed=indexed, errors=errors, shards=job.shards, shards_written=len(done)
            )
            write_manifest(output, job.manifest(clip, counts))
        pending = [k for k in range(job.shards) if k not in done]
        expected = job.per_shard()
        todo = sum(expected[k] for k in pending)
        if done:
            print(f"resuming: {len(done)} of {job.shards} shards already written", file=sys.stderr)
        from tqdm import tqdm

        started = time.perf_counter()
        with tqdm(total=todo, unit="image", desc="indexing", file=sys.stderr, dynamic_ncols=True) as bar:

            def on_shard(shard: int, table: pa.Table) -> None:
                with uninterrupted():  # a shard and the manifest's counts, together
                    path = shard_path(output, shard)
                    write_parquet(path, table)
                    done.add(shard)
                    counts.indexed += table["error"].null_count
                    counts.errors += table.num_rows - table["error"].null_count
                    counts.shards_written = state["written"] = len(done)
                    write_manifest(output, job.manifest(clip, counts))
                tqdm.write(str(path), file=sys.stdout)

            try:
                stream_shards(
                    pending_rows(job, pending),
                    pending,
                    expected,
                    shard_schema(clip.dim),
                    ImageEmbedder,
                    {"weights": job.weights, "sha256": clip.sha256, "dim": clip.dim},
                    args.workers,
                    args.batch_size,
                    on_shard,
                    bar.update,
                )
            except KeyboardInterrupt:
                raise
            except Exception as error:  # a worker failed: what is written stays, a rerun resumes
                message = str(error).strip().splitlines()
                print(f"error: the job failed: {message[-1] if message else type(error).__name__}", file=sys.stderr)
                return 1
        seconds = time.perf_counter() - started
        return _finish(job, clip, counts, todo, seconds)
    finally:
        if started_here:
            with uninterrupted():
                ray.shutdown()


def _finish(job: Job, clip: ClipIdentity, counts: IndexCounts, todo: int, seconds: float) -> int:
    """Build the index from the shards and write it with the items, the errors and the manifest."""
    try:
        info, paths = finish_index(job.output, job.shards, job.settings.index, job.manifest(clip, counts))
    except ValueError as error:  # no image could be indexed
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    recall = f", nprobe {info.nprobe}, recall@10 {info.recall_at_10:.3f}" if info.kind == "ivf" else ""
    print(
        f"done: {counts.indexed} images indexed ({info.kind}{recall}), {counts.errors} set aside (errors.parquet); "
        f"{todo} read in this run, {todo / max(seconds, 1e-9):.1f} images/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    from commands.didp import console

    sys.argv.insert(1, "index")
    console()
