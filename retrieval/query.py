"""An index directory opened for searching, and a query embedding given as a ``.npy`` file.

    index = SearchIndex.open(Path("my-index/"))
    matches = index.search(query_embedding, k=20)   # [Match(rank, id, score, position)], best first
    index.thumbnail(matches[0].position)             # its JPEG bytes

Nothing is read whole: FAISS maps ``index.faiss``, the thumbnails are an ``np.memmap``; only the
items' ids are loaded. A match names the item by the id it was given to ``didp index`` (the path
below the folder, or the id column), never by a path on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .identity import ClipIdentity
from .store import INDEX, ITEMS, OFFSETS, THUMBNAILS, IndexManifest, import_faiss, mmap_flags, read_manifest

MAX_K = 100


class IndexUnusable(RuntimeError):
    """The directory is not a complete index, or FAISS is missing; the message says what to do."""


@dataclass(frozen=True)
class Match:
    rank: int  # 1 for the best
    id: str
    score: float  # cosine similarity (inner product of l2-normalised embeddings)
    position: int  # the item's row in the index (for its thumbnail)


class SearchIndex:
    """A complete index directory, opened memory-mapped."""

    def __init__(self, directory: Path, manifest: IndexManifest, index, ids: pa.Array, thumbnails, offsets):
        self.directory, self.manifest, self.index = directory, manifest, index
        self.ids, self._thumbnails, self._offsets = ids, thumbnails, offsets

    @classmethod
    def open(cls, directory: Path, nprobe: int | None = None) -> SearchIndex:
        directory = Path(directory)
        if not directory.is_dir():
            raise IndexUnusable(f"index {directory}: no such directory; build one with didp index SRC -o {directory}")
        try:
            manifest = read_manifest(directory)
        except ValueError as error:
            raise IndexUnusable(str(error)) from None
        if manifest is None or not manifest.complete or manifest.index is None:
            raise IndexUnusable(
                f"index {directory}: not a complete index (no manifest.json, or didp index did not finish); "
                f"run didp index SRC -o {directory} (again: it resumes)"
            )
        faiss = import_faiss()
        index = faiss.read_index(str(directory / INDEX), mmap_flags(manifest.index.kind))
        if manifest.index.nprobe is not None or nprobe is not None:
            index.nprobe = nprobe or manifest.index.nprobe
        ids = pq.read_table(directory / ITEMS, columns=["id"], memory_map=True)["id"].combine_chunks()
        offsets = np.load(directory / OFFSETS, mmap_mode="r", allow_pickle=False)
        size = int(offsets[-1])
        thumbnails = np.memmap(directory / THUMBNAILS, np.uint8, "r") if size else np.zeros(0, np.uint8)
        if index.ntotal != len(ids) or len(offsets) != len(ids) + 1:
            raise IndexUnusable(f"index {directory}: its files disagree on the item count; run didp index again")
        return cls(directory, manifest, index, ids, thumbnails, offsets)

    @property
    def clip(self) -> ClipIdentity:
        return self.manifest.clip

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: np.ndarray, k: int) -> list[Match]:
        """The ``k`` items nearest ``query`` (``[d]``, l2-normalised), best first."""
        vector = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if vector.shape[1] != self.clip.dim:
            raise ValueError(f"a query of width {vector.shape[1]}: this index holds {self.clip.dim}-wide embeddings")
        scores, positions = self.index.search(vector, min(k, len(self)))
        found = [(int(p), float(s)) for p, s in zip(positions[0], scores[0], strict=True) if p >= 0]
        return [Match(rank, self.ids[p].as_py(), s, p) for rank, (p, s) in enumerate(found, 1)]

    def thumbnail(self, position: int) -> bytes:
        return bytes(self._thumbnails[int(self._offsets[position]) : int(self._offsets[position + 1])])
