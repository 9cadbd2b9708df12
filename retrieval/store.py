"""An index directory: what ``didp index`` writes and a search opens.

    INDEX_DIR/
      manifest.json              the CLIP identity, the input's fingerprint, the counts, the index's kind
      shards/part-NNNNN.parquet  id, source, embedding, thumbnail, error: every input row, in order
      errors.parquet             the items set aside: id, source, reason
      items.parquet              id, source of the indexed items, in the index's order
      thumbnails.bin             the items' JPEG thumbnails, one after another
      thumbnail_offsets.npy      int64 [items + 1]: thumbnail i is bytes [off[i], off[i+1])
      index.faiss                the FAISS index (inner product on l2-normalised embeddings)

Shards are written whole (``pipeline.shards.write_atomically``) as the job goes, so a stopped job
run again skips them; the index and the files beside it are built from the shards at the end,
each written whole, ``manifest.json`` last (``complete``).

The index is exact (``IndexFlatIP``) up to ``EXACT_MAX`` items; above, an inverted file
(``IndexIVFFlat``, ``nlist`` about sqrt(n) lists, trained on a sample) whose ``nprobe`` is the
smallest that reaches ``RECALL_TARGET`` (plus ``TUNING_MARGIN``) recall@10 against exact search on held-out queries (the
measured recall is in the manifest). A search opens ``index.faiss`` memory-mapped
(``IO_FLAG_MMAP_IFC`` for the flat index, ``IO_FLAG_MMAP`` for the inverted lists) and the
thumbnails with ``np.memmap``: opening costs no reading, and the pages a search touches are the
page cache's, shared between processes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pipeline.shards import write_atomically, write_parquet

from .identity import ClipIdentity

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
ITEMS = "items.parquet"
THUMBNAILS = "thumbnails.bin"
OFFSETS = "thumbnail_offsets.npy"
INDEX = "index.faiss"
FORMAT = 1
EXACT_MAX = 100_000  # items searched exactly; above, an IVF index
RECALL_TARGET = 0.95  # recall@10 the IVF's nprobe is chosen for
# nprobe is tuned for the target plus this margin: 200 held-out queries measure recall within a
# few hundredths, and at 1M vectors an nprobe tuned to 0.952 gave 0.928 on fresh queries
TUNING_MARGIN = 0.02
RECALL_QUERIES = 200
NPROBES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
FAISS_MISSING = (
    "search needs FAISS, which is not installed here: pip install 'faiss-cpu==1.15.1' "
    "(the project's search extra: pip install -e '.[search]'; faiss-gpu where CUDA is there)"
)


def import_faiss():
    """The ``faiss`` module, or a ``RuntimeError`` that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise RuntimeError(FAISS_MISSING) from None
    return faiss


class IndexSettings(BaseModel):
    """What decides an index's contents: a rerun into the same directory must have the same."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard_size: int
    column: str | None
    id_column: str | None
    index: str  # auto, exact or ivf


class IndexCounts(BaseModel):
    items: int = 0  # input rows
    indexed: int = 0  # embedded so far (in the index once complete)
    errors: int = 0  # set aside so far
    shards: int = 0
    shards_written: int = 0


class IndexInfo(BaseModel):
    """The FAISS index built: its kind, lists and probes, and the recall@10 measured for it."""

    kind: str  # exact or ivf
    factory: str  # FAISS's name for it
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None  # against exact search, on held-out queries (ivf)
    build_seconds: float


class IndexManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    clip: ClipIdentity
    input_sha256: str
    settings: IndexSettings
    versions: dict[str, str]
    counts: IndexCounts
    index: IndexInfo | None = None
    complete: bool = False

    def differences(self, other: IndexManifest) -> list[str]:
        """What makes ``other`` (this directory's earlier job) another index than this one."""
        found = []
        if self.format != other.format:
            found.append(f"format {other.format} (now {self.format})")
        if (problem := other.clip.mismatch(self.clip)) is not None:
            found.append(problem.split(";")[0])
        if self.input_sha256 != other.input_sha256:
            found.append("the input's items (another input, or files added, removed or renamed)")
        mine, theirs = self.settings.model_dump(), other.settings.model_dump()
        found += [f"{name} {theirs[name]!r} (now {value!r})" for name, value in mine.items() if theirs[name] != value]
        return found


def read_manifest(directory: Path) -> IndexManifest | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return IndexManifest.model_validate_json(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not a manifest of didp index ({str(error).splitlines()[0]})") from None


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    write_atomically(directory / MANIFEST, lambda f: f.write(manifest.model_dump_json(indent=2).encode() + b"\n"))


# -- shards ---------------------------------------------------------------------------------------


def shard_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),  # null for an item set aside
            ("thumbnail", pa.binary()),
            ("error", pa.string()),  # null for an item indexed
        ]
    )


def shard_path(directory: Path, shard: int) -> Path:
    return directory / "shards" / f"part-{shard:05d}.parquet"


def written_shards(directory: Path, shards: int) -> set[int]:
    return {k for k in range(shards) if shard_path(directory, k).exists()}


def shard_counts(directory: Path, shards: set[int]) -> tuple[int, int]:
    """Items indexed and set aside in the written ``shards``."""
    indexed = errors = 0
    for k in shards:
        table = pq.read_table(shard_path(directory, k), columns=["error"])
        indexed += table["error"].null_count
        errors += table.num_rows - table["error"].null_count
    return indexed, errors


# -- the index -------------------------------------------------------------------------------------


def gather(directory: Path, shards: int) -> tuple[pa.Table, np.ndarray, list[bytes], pa.Table]:
    """From the written shards: the indexed items (id, source), their embeddings ``[n, d]``, their
    thumbnails, and the items set aside (id, source, reason), each in input order."""
    items, vectors, thumbnails, errors = [], [], [], []
    for k in range(shards):
        table = pq.read_table(shard_path(directory, k))
        good = table.filter(table["error"].is_null())
        bad = table.filter(table["error"].is_valid())
        items.append(good.select(["id", "source"]))
        dim = table.schema.field("embedding").type.list_size
        flat = good["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors.append(np.asarray(flat, np.float32).reshape(-1, dim))
        thumbnails += good["thumbnail"].to_pylist()
        errors.append(bad.select(["id", "source", "error"]).rename_columns(["id", "source", "reason"]))
    return pa.concat_tables(items), np.concatenate(vectors), thumbnails, pa.concat_tables(errors)


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n), a power of two (1,024 at a million), at
    least 39 training points a list (FAISS's minimum) when trained on all of them. k-means costs
    grow with the square of the lists: 4 sqrt(n) lists would take 16 times as long to train, for
    queries that scan a quarter as many vectors at the same recall."""
    lists = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return max(1, min(lists, n // 39))


def build_index(vectors: np.ndarray, kind: str = "auto", seed: int = 0, recall_target: float = RECALL_TARGET):
    """A FAISS index of ``vectors`` (``[n, d]`` float32, l2-normalised) by inner product, and its
    ``IndexInfo``. ``kind``: ``exact``, ``ivf``, or ``auto`` (exact up to ``EXACT_MAX``)."""
    faiss = import_faiss()
    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, np.float32)
    if kind == "auto":
        kind = "exact" if n <= EXACT_MAX else "ivf"
    started = time.perf_counter()
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, IndexInfo(kind="exact", factory="Flat", build_seconds=time.perf_counter() - started)
    if kind != "ivf":
        raise ValueError(f"index kind {kind!r}: use auto, exact or ivf")
    nlist = ivf_lists(n)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, nlist * 64), replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = 10
    gpu = on_gpus(faiss, index)
    (gpu or index).train(sample)
    (gpu or index).add(vectors)
    if gpu is not None:
        index = faiss.index_gpu_to_cpu(gpu)  # stored and memory-mapped as a CPU index
    seconds = time.perf_counter() - started
    nprobe, recall = tune_nprobe(index, vectors, min(1.0, recall_target + TUNING_MARGIN), rng)
    info = IndexInfo(
        kind="ivf",
        factory=f"IVF{nlist},Flat",
        nlist=nlist,
        nprobe=nprobe,
        recall_at_10=recall,
        build_seconds=seconds,
    )
    return index, info


def on_gpus(faiss, index):
    """``index`` copied to every GPU when FAISS is built with GPU support (``faiss-gpu``) and sees
    one, else ``None``. (No GPU was available here: this path is untested.)"""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        return faiss.index_cpu_to_all_gpus(index)
    return None


def held_out_queries(vectors: np.ndarray, count: int, rng: np.random.Generator, noise: float = 1.0) -> np.ndarray:
    """Queries near the data, none of them an item: items plus Gaussian noise of length about
    ``noise``, l2-normalised (cosine about 0.7 to the item at 1.0: a query is seldom a near
    duplicate of an item; with 0.5 the chosen nprobe fell short of the target on fresh queries)."""
    picked = vectors[rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)]
    jitter = rng.standard_normal(picked.shape, dtype=np.float32) * (noise / math.sqrt(vectors.shape[1]))
    queries = picked + jitter
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of ``truth``'s neighbours (per row) that ``found`` has."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def tune_nprobe(index, vectors: np.ndarray, target: float, rng: np.random.Generator, k: int = 10):
    """The smallest ``NPROBES`` value whose recall@``k`` against exact search reaches ``target`` on
    held-out queries, set on ``index``; and that recall."""
    faiss = import_faiss()
    queries = held_out_queries(vectors, RECALL_QUERIES, rng)
    _, truth = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a copy
    recall = 0.0
    for nprobe in NPROBES:
        nprobe = min(nprobe, index.nlist)
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = recall_at(found, truth)
        if recall >= target or nprobe == index.nlist:
            break
    return nprobe, recall


def write_index(directory: Path, index) -> Path:
    faiss = import_faiss()
    path = directory / INDEX

    write_atomically(path, lambda file: faiss.write_index(index, faiss.PyCallbackIOWriter(file.write)))
    return path


def write_items(directory: Path, items: pa.Table, thumbnails: list[bytes]) -> list[Path]:
    """``items.parquet``, ``thumbnails.bin`` and ``thumbnail_offsets.npy``, each whole."""
    offsets = np.zeros(len(thumbnails) + 1, np.int64)
    np.cumsum([len(t) for t in thumbnails], out=offsets[1:])

    def write_thumbnails(file) -> None:
        for data in thumbnails:
            file.write(data)

    write_atomically(directory / THUMBNAILS, write_thumbnails)
    write_atomically(directory / OFFSETS, lambda f: np.save(f, offsets))
    write_parquet(directory / ITEMS, items)
    return [directory / ITEMS, directory / THUMBNAILS, directory / OFFSETS]


def mmap_flags(kind: str) -> int:
    """FAISS's read flags that map ``kind``'s index file instead of reading it."""
    faiss = import_faiss()
    return faiss.IO_FLAG_MMAP_IFC if kind == "exact" else faiss.IO_FLAG_MMAP


def finish_index(directory: Path, shards: int, kind: str, manifest: IndexManifest) -> tuple[IndexInfo, list[Path]]:
    """Build the index of the written shards' items and write ``errors.parquet``, ``index.faiss``,
    the items and thumbnails, then ``manifest`` marked complete (each file whole); the index's
    ``IndexInfo`` and the paths written. A ``ValueError`` if no item could be indexed."""
    items, vectors, thumbnails, errors = gather(directory, shards)
    write_parquet(directory / ERRORS, errors)
    if not items.num_rows:
        raise ValueError(f"none of the {errors.num_rows} images could be indexed (see {directory / ERRORS})")
    index, info = build_index(vectors, kind)
    paths = [directory / ERRORS, write_index(directory, index), *write_items(directory, items, thumbnails)]
    write_manifest(directory, manifest.model_copy(update={"index": info, "complete": True}))
    return info, [*paths, directory / MANIFEST]
