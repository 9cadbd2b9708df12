"""``didp batch``: embed a captions file on Ray Data, into Parquet shards, resumably.

    didp batch captions.parquet -o out/ [--weights W] [--address ray://head:10001] [--workers N]

The input is read and checked (``pipeline.captions``) and the output directory's manifest
compared (``pipeline.shards``) before any work; then each worker (a Ray actor) loads the models
once and embeds batches of captions with ``pipeline.embeddings.embed_captions``, every row with
its own seed ``row_seed(seed, id)``. The driver receives the rows in input order and writes each
shard whole as soon as its rows are in. A rerun skips the shards already written.

The environment, read here only: ``DIDP_WEIGHTS`` (``--weights`` wins) and ``RAY_ADDRESS``
(``--address`` wins; neither: a local Ray in this process, on this machine's CPUs and GPUs).

Exit codes: 0 done, 2 refused (input, settings, output directory), 1 failed (set-up, workers),
130 / 143 stopped by Ctrl-C / SIGTERM (the shards written so far stay; run again to resume).
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
from pipeline.captions import Captions, CaptionsError, read_captions
from pipeline.locks import DirectoryBusy, hold, release
from pipeline.request import Request
from pipeline.shards import (
    ERRORS,
    Counts,
    JobSettings,
    Manifest,
    embeddings_schema,
    embeddings_table,
    errors_table,
    input_sha256,
    read_manifest,
    remove_temporaries,
    shard_count,
    write_manifest,
    write_parquet,
    write_shard,
    written_shards,
)

DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 64
_SPECS = {spec.name: spec for spec in Request.input_specs()}


# -- the command line ---------------------------------------------------------------------------------------


def _ranged(name: str, convert, low=None):
    """An argparse type: ``convert`` the text, within the range of the request's input ``name``
    (``low`` instead of its lower bound: a job's seed is never drawn, so -1 is not one)."""
    spec = _SPECS[name]
    low = spec.ge if low is None else low

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "a whole number" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if (low is not None and value < low) or (spec.le is not None and value > spec.le):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {low:g} to {spec.le:g}")
        return value

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    spec = _SPECS
    p = argparse.ArgumentParser(
        prog="didp batch",
        description="Embed every caption of a file (Parquet, CSV, JSONL, or text: one caption a line) with CLIP "
        "and the diffusion prior, on Ray Data, into Parquet shards; a rerun resumes.",
        epilog="Outputs in -o: embeddings/part-NNNNN.parquet, errors.parquet (refused rows), manifest.json; "
        "with --npy also img_emb/ and metadata/ (clip-retrieval's layout). Exit codes: 0 done, 2 refused, 1 failed.",
    )
    p.add_argument("input", type=Path, help="a file, or a directory of files of one kind (.parquet .csv .jsonl .txt)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (a rerun there resumes)")
    p.add_argument("--weights", help="tiny, laion or a directory of weights (default: $DIDP_WEIGHTS or laion)")
    p.add_argument("--id-column", default="id", help="the id column (default id; unique; text files: the line number)")
    p.add_argument("--caption-column", default="caption", help="the caption column (default caption)")
    p.add_argument("--address", help="a Ray cluster to join, e.g. ray://head:10001 (default: $RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=_positive, default=1, help="model replicas (Ray actors; one GPU each on GPUs)")
    p.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="captions per model call")
    p.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, help="input rows per output shard")
    p.add_argument("--npy", action="store_true", help="also write img_emb/*.npy and metadata/*.parquet")
    p.add_argument(
        "--candidates",
        type=_ranged("num_samples_per_batch", int),
        default=spec["num_samples_per_batch"].default,
        help=f"{spec['num_samples_per_batch'].description} (default %(default)s)",
    )
    p.add_argument(
        "--guidance-scale",
        type=_ranged("guidance_scale", float),
        default=spec["guidance_scale"].default,
        help=f"{spec['guidance_scale'].description} (default %(default)s)",
    )
    p.add_argument(
        "--prior-steps",
        type=_ranged("prior_steps", int),
        default=spec["prior_steps"].default,
        help=f"{spec['prior_steps'].description} (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_ranged("seed", int, low=0),
        default=0,
        help="the job's seed; row i is sampled with a seed made from it and the row's id (default 0)",
    )
    p.add_argument(
        "--negative-prompt", default=None, help="a caption the prior's guidance steers away from (guidance > 1)"
    )
    return p


# -- the job ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """A checked job: its rows, settings and where it writes."""

    captions: Captions
    settings: JobSettings
    output: Path
    weights: str

    @property
    def shards(self) -> int:
        return shard_count(len(self.captions), self.settings.shard_size)

    def good_per_shard(self) -> list[int]:
        size = self.settings.shard_size
        problems = self.captions.table["problem"]
        return [problems.slice(k * size, size).null_count for k in range(self.shards)]  # null: no problem


class Refused(Exception):
    """A job refused before any work (exit code 2)."""


def new_manifest(job: Job, weights: dict[str, str], fingerprint: str, written: int, embedded: int) -> Manifest:
    errors = job.captions.bad
    return Manifest(
        weights=weights,
        input_sha256=fingerprint,
        settings=job.settings,
        versions=versions(),
        counts=Counts(
            rows=len(job.captions), embedded=embedded, errors=errors, shards=job.shards, shards_written=written
        ),
        complete=written == job.shards,
    )


def check_against_earlier(job: Job, weights: dict[str, str] | None, fingerprint: str) -> Manifest | None:
    """This directory's earlier manifest, refused (``Refused``) if it is another job; ``weights``
    ``None``: compare everything but the weights."""
    earlier = read_manifest(job.output)
    if earlier is None:
        if any((job.output / "embeddings").glob("part-*.parquet")):
            raise Refused(f"-o {job.output}: holds shards but no manifest.json; choose another directory")
        return None
    probe = Manifest(
        weights=weights if weights is not None else earlier.weights,
        input_sha256=fingerprint,
        settings=job.settings,
        versions={},
        counts=earlier.counts,
    )
    if differences := probe.differences(earlier):
        raise Refused(
            f"-o {job.output} holds another job: its {'; '.join(differences)}. "
            "Use another directory, or the earlier job's settings to resume it."
        )
    return earlier


# -- Ray ----------------------------------------------------------------------------------------------------


class Embedder:
    """A Ray Data worker: the models loaded once (in ``__init__``), then batches of rows embedded."""

    def __init__(self, weights: str, sha256: str, settings: dict):
        import torch

        from pipeline.embeddings import PriorSettings
        from prior.weights import load_models

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = load_models(weights, device)
        if self.models.identity.sha256 != sha256:  # another node with other files under the same name
            raise RuntimeError(
                f"weights {weights!r} on this worker have sha256 {self.models.identity.sha256[:12]}, "
                f"the job's {sha256[:12]}"
            )
        self.settings = PriorSettings(**settings)
        self.shard = pa.field("shard", pa.int64())  # the rows' shard, carried through for the driver

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.embeddings import embed_captions

        captions, seeds = batch["caption"].to_pylist(), batch["seed"].to_pylist()
        out = embed_captions(self.models, captions, seeds, self.settings)
        rows = embeddings_table(batch["id"].to_pylist(), captions, seeds, out)
        return rows.append_column(self.shard, batch["shard"])


def _identify(weights: str, cuda: bool) -> tuple[dict[str, str], int]:
    """The weights' identity (name and sha256) and embedding width, as workers on CUDA (``cuda``)
    or on CPUs see them: the prior's content hash depends on the precision it runs in, which
    depends on the device, not on where it is loaded (here, on the CPU)."""
    import torch

    from prior.weights import default_prior_dtype, load_models

    dtype = default_prior_dtype(torch.device("cuda" if cuda else "cpu"))
    models = load_models(weights, "cpu", prior_dtype=dtype)
    return models.identity.to_dict(), models.clip.embed_dim


def identify(weights: str, local: bool) -> tuple[dict[str, str], int]:
    """``_identify`` for this job's workers: in this process for a local Ray (the same machine),
    else in a task on a worker of the cluster (which has the workers' files and devices)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    if local:
        return _identify(weights, gpus)
    task = ray.remote(_identify).options(**({"num_gpus": 1} if gpus else {}))
    return ray.get(task.remote(weights, gpus))


def pending_rows(job: Job, pending: list[int]) -> pa.Table:
    """The good rows of the ``pending`` shards in order, with each row's seed and shard."""
    from pipeline.embeddings import row_seed

    size = job.settings.shard_size
    table = job.captions.table
    parts = []
    for k in pending:
        part = table.slice(k * size, size)
        good = part.filter(part["problem"].is_null())
        ids = good["id"].to_pylist()
        parts.append(
            pa.table(
                {
                    "id": good["id"].combine_chunks(),
                    "caption": good["caption"].combine_chunks(),
                    "seed": pa.array([row_seed(job.settings.seed, i) for i in ids], pa.int64()),
                    "shard": pa.array([k] * len(ids), pa.int64()),
                }
            )
        )
    return pa.concat_tables(parts) if parts else pa.table({"id": [], "caption": [], "seed": [], "shard": []})


def embed_pending(
    job: Job,
    weights: dict[str, str],
    dim: int,
    pending: list[int],
    workers: int,
    batch_size: int,
    on_shard,
    on_rows,
):
    """Embed the ``pending`` shards' rows on Ray Data, calling ``on_rows(n)`` as rows arrive and
    ``on_shard(k, table)`` in shard order as soon as shard ``k``'s rows are all in (also for shards
    without good rows). The workers share out all the CPUs: this driver mostly waits."""
    stream_shards(
        pending_rows(job, pending),
        pending,
        job.good_per_shard(),
        embeddings_schema(dim),
        Embedder,
        {
            "weights": job.weights,
            "sha256": weights["sha256"],
            "settings": {
                "candidates": job.settings.candidates,
                "guidance_scale": job.settings.guidance_scale,
                "prior_steps": job.settings.prior_steps,
                "negative_prompt": job.settings.negative_prompt,
            },
        },
        workers,
        batch_size,
        on_shard,
        on_rows,
    )


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``didp batch``; Ctrl-C (130) and SIGTERM (143) stop it between shards' files."""
    args = parser().parse_args(argv)
    state = {"written": 0, "shards": None, "output": args.output}
    return stoppable(_main, args, state)


def _main(args, state) -> int:
    weights_spec = args.weights or os.environ.get("DIDP_WEIGHTS", "laion")
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    settings = JobSettings(
        seed=args.seed,
        candidates=args.candidates,
        guidance_scale=args.guidance_scale,
        prior_steps=args.prior_steps,
        negative_prompt=args.negative_prompt or None,
        shard_size=args.shard_size,
        id_column=args.id_column,
        caption_column=args.caption_column,
        npy=args.npy,
    )
    try:
        captions = read_captions(args.input, args.id_column, args.caption_column)
    except CaptionsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not len(captions):
        print(f"error: {args.input}: no rows", file=sys.stderr)
        return 2
    output = args.output
    if output.exists() and not output.is_dir():
        print(f"error: -o {output}: not a directory", file=sys.stderr)
        return 2
    try:
        output.mkdir(parents=True, exist_ok=True)
        lock = hold(output)
    except DirectoryBusy:
        print(f"error: -o {output}: another didp batch is writing there", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: -o {output}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        job = Job(captions, settings, output, weights_spec)
        fingerprint = input_sha256(captions.table["id"], captions.table["caption"])
        try:
            check_against_earlier(job, None, fingerprint)  # before starting Ray: settings and input
        except (Refused, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return _run(job, fingerprint, address, args, state)
    finally:
        release(lock)


def _run(job: Job, fingerprint: str, address: str | None, args, state) -> int:
    import ray

    output = job.output
    state["shards"] = job.shards
    started_here = True
    try:
        started_here = start_ray(address)
        weights, dim = identify(job.weights, local=address is None)
    except Exception as error:  # no cluster there, weights missing or broken
        print(f"error: setup failed: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        if started_here:
            ray.shutdown()
        return 1
    try:
        try:
            check_against_earlier(job, weights, fingerprint)
        except (Refused, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        with uninterrupted():
            remove_temporaries(output)
            done = written_shards(output, job.shards)
            expected = job.good_per_shard()
            state["written"] = len(done)
            embedded = sum(expected[k] for k in done)
            table = job.captions.table
            bad = table.filter(table["problem"].is_valid())
            write_parquet(output / ERRORS, errors_table(bad["id"].to_pylist(), bad["problem"].to_pylist()))
            write_manifest(output, new_manifest(job, weights, fingerprint, len(done), embedded))
        pending = [k for k in range(job.shards) if k not in done]
        todo = sum(expected[k] for k in pending)
        if done:
            print(f"resuming: {len(done)} of {job.shards} shards already written", file=sys.stderr)
        from tqdm import tqdm

        started = time.perf_counter()
        with tqdm(total=todo, unit="caption", desc="embedding", file=sys.stderr, dynamic_ncols=True) as bar:

            def on_shard(shard: int, rows: pa.Table) -> None:
                nonlocal embedded
                with uninterrupted():  # a shard's files and the manifest's count, together
                    path = write_shard(output, shard, rows, job.settings.npy)
                    done.add(shard)
                    embedded += rows.num_rows
                    state["written"] = len(done)
                    write_manifest(output, new_manifest(job, weights, fingerprint, len(done), embedded))
                tqdm.write(str(path), file=sys.stdout)

            try:
                embed_pending(job, weights, dim, pending, args.workers, args.batch_size, on_shard, bar.update)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # a worker failed: what is written stays, a rerun resumes
                message = str(error).strip().splitlines()
                print(f"error: the job failed: {message[-1] if message else type(error).__name__}", file=sys.stderr)
                return 1
        seconds = time.perf_counter() - started
        print(
            f"done: {embedded} captions embedded in {job.shards} shards, {job.captions.bad} refused "
            f"(errors.parquet); {todo} in this run, {todo / max(seconds, 1e-9):.1f} captions/s",
            file=sys.stderr,
        )
        return 0
    finally:
        if started_here:
            with uninterrupted():
                ray.shutdown()


if __name__ == "__main__":
    from commands.didp import console

    sys.argv.insert(1, "batch")
    console()
