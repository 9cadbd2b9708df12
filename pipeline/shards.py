"""A batch job's output directory: fixed shards written whole, a manifest, the refused rows.

    OUTPUT_DIR/
      manifest.json                     what the job is (weights, settings, versions) and how far it got
      errors.parquet                    the refused rows: id, reason
      embeddings/part-NNNNN.parquet     id, caption, text_embedding, image_embedding, similarity, seed, truncated
      img_emb/img_emb_NNNNN.npy         with npy: the image embeddings, float32 [rows, d]
      metadata/metadata_NNNNN.parquet   with npy: id, caption of those rows, in the same order

Shard ``k`` holds the good rows among input rows ``[k*S, (k+1)*S)`` in input order, ``S`` the
manifest's ``shard_size``; a shard whose rows were all refused is an empty file. Every file is
written whole (a temporary file, fsync, rename), the ``embeddings`` part last: a shard is done
when its part exists, so a job that is stopped anyhow (Ctrl-C, ``kill -9``) and run again skips
the shards that are done and redoes the others, leaving no duplicate and no gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .embeddings import CaptionEmbeddings

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
FORMAT = 1
_TEMPORARY = re.compile(r"\..+\.tmp-[0-9a-z_]+")


class JobSettings(BaseModel):
    """What decides a job's rows: a rerun into the same directory must have the same."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    candidates: int
    guidance_scale: float
    prior_steps: int
    negative_prompt: str | None
    shard_size: int
    id_column: str
    caption_column: str
    npy: bool


class Counts(BaseModel):
    rows: int  # rows of the input, refused ones included
    embedded: int  # rows in the shards written so far
    errors: int  # refused rows (errors.parquet)
    shards: int  # shards of the job
    shards_written: int


class Manifest(BaseModel):
    """``manifest.json``: the job's identity (``weights``, ``input_sha256``, ``settings``), the
    versions that wrote it and its counts. ``complete`` once every shard is written."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    weights: dict[str, str]  # WeightsIdentity.to_dict(): name and sha256
    input_sha256: str  # of the ids and captions in order
    settings: JobSettings
    versions: dict[str, str]
    counts: Counts
    complete: bool = False

    def differences(self, other: Manifest) -> list[str]:
        """What makes ``other`` (this directory's earlier job) another job than this one, in words."""
        found = []
        if self.format != other.format:
            found.append(f"format {other.format} (now {self.format})")
        if self.weights != other.weights:
            found.append(f"weights {_weights(other.weights)} (now {_weights(self.weights)})")
        if self.input_sha256 != other.input_sha256:
            found.append("the input's ids or captions (another input, or the input changed)")
        mine, theirs = self.settings.model_dump(), other.settings.model_dump()
        for name, value in mine.items():
            if theirs[name] != value:
                found.append(f"{name} {theirs[name]!r} (now {value!r})")
        return found


def _weights(identity: dict[str, str]) -> str:
    return f"{identity.get('name')} sha256 {identity.get('sha256', '')[:12]}"


def input_sha256(ids: pa.ChunkedArray, captions: pa.ChunkedArray) -> str:
    """The sha256 of ``id \\0 caption \\n`` for every row in order (a null caption as ``\\1``)."""
    digest = hashlib.sha256()
    for batch_ids, batch_captions in zip(_slices(ids), _slices(captions), strict=True):
        for row_id, caption in zip(batch_ids, batch_captions, strict=True):
            digest.update(f"{row_id}\0{chr(1) if caption is None else caption}\n".encode())
    return digest.hexdigest()


def _slices(column: pa.ChunkedArray, size: int = 65536):
    for start in range(0, len(column), size):
        yield column.slice(start, size).to_pylist()


def read_manifest(directory: Path) -> Manifest | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not a manifest of didp batch ({str(error).splitlines()[0]})") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    write_atomically(directory / MANIFEST, lambda f: f.write(manifest.model_dump_json(indent=2).encode() + b"\n"))


# -- files written whole ------------------------------------------------------------------------------------


def write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then fsync and rename it to ``path``
    and fsync the directory: ``path`` is either absent or whole, whenever the process ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet(path: Path, table: pa.Table) -> None:
    write_atomically(path, lambda f: pq.write_table(table, f))


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary files a killed job left in ``directory`` and its subdirectories."""
    found = [p for p in directory.rglob(".*.tmp-*") if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for path in found:
        path.unlink(missing_ok=True)
    return found


# -- shards -------------------------------------------------------------------------------------------------


def shard_count(rows: int, shard_size: int) -> int:
    return -(-rows // shard_size)


def part_path(directory: Path, shard: int) -> Path:
    return directory / "embeddings" / f"part-{shard:05d}.parquet"


def written_shards(directory: Path, shards: int) -> set[int]:
    """The shards whose ``embeddings`` part exists (written whole, last of a shard's files)."""
    return {k for k in range(shards) if part_path(directory, k).exists()}


def embeddings_schema(dim: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            ("id", pa.string()),
            ("caption", pa.string()),
            ("text_embedding", vector),
            ("image_embedding", vector),
            ("similarity", pa.float32()),
            ("seed", pa.int64()),
            ("truncated", pa.bool_()),
        ]
    )


def embeddings_table(ids: list[str], captions: list[str], seeds: list[int], out: CaptionEmbeddings) -> pa.Table:
    """Rows of ``embeddings_schema`` for captions embedded by ``pipeline.embeddings.embed_captions``."""
    dim = out.image.shape[1]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(captions, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(out.text.numpy().reshape(-1)), dim),
            pa.FixedSizeListArray.from_arrays(pa.array(out.image.numpy().reshape(-1)), dim),
            pa.array(out.similarity.float().numpy()),
            pa.array(seeds, pa.int64()),
            pa.array(out.truncated, pa.bool_()),
        ],
        schema=embeddings_schema(dim),
    )


def write_shard(directory: Path, shard: int, table: pa.Table, npy: bool) -> Path:
    """Write shard ``shard`` (rows of ``embeddings_schema``): the npy layout first when asked, the
    ``embeddings`` part last, so that its presence means the shard is done."""
    if npy:
        dim = table.schema.field("image_embedding").type.list_size
        images = np.asarray(table["image_embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, dim)
        write_atomically(directory / "img_emb" / f"img_emb_{shard:05d}.npy", lambda f: np.save(f, images))
        write_parquet(directory / "metadata" / f"metadata_{shard:05d}.parquet", table.select(["id", "caption"]))
    path = part_path(directory, shard)
    write_parquet(path, table)
    return path


def read_embeddings(directory: Path) -> pa.Table:
    """Every shard's rows in order (for checks and tests)."""
    parts = sorted((directory / "embeddings").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def errors_table(ids: list[str], reasons: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "reason": pa.array(reasons, pa.string())})
