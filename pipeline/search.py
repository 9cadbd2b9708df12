"""``mode=search``: the images of an index (``retrieval``) nearest a request's query embedding.

The query is, by priority: the ``embedding`` file; the ``image``'s CLIP image embedding (query by
example); else the caption's, ``normalize((1 - w) * prior + w * text)`` for ``w = text_weight``
(0, the default: the prior's image embedding alone; 1: the text embedding alone, when the prior
is not run). The index is given to the pipeline as a directory (``DIDP_INDEX`` at the edges) and
opened once, memory-mapped; a problem with it (not configured, FAISS missing, incomplete, another
CLIP) is kept and given as the reason ``mode=search`` is refused, while other modes run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .embedding_file import load_embedding
from .results import SearchMatch, SearchResult

log = logging.getLogger("didp")

INDEX_SETTING = "DIDP_INDEX"  # the edges read the index directory from the environment under it
NOT_CONFIGURED = (
    f"mode=search needs an index, and none is configured: build one with didp index IMAGES_DIR -o INDEX_DIR, "
    f"then start the server with {INDEX_SETTING}=INDEX_DIR (didp: didp search INDEX_DIR -i prompt=...)"
)


class SearchSetup:
    """The pipeline's index, opened once; or why there is none."""

    def __init__(self, directory: Path | None, models):
        self.index, self.problem = None, NOT_CONFIGURED
        if directory is None:
            return
        try:
            from retrieval.identity import clip_identity
            from retrieval.query import IndexUnusable, SearchIndex

            index = SearchIndex.open(Path(directory))
        except (IndexUnusable, RuntimeError, OSError, ValueError) as error:
            self.problem = f"mode=search: {error}"
            log.warning("%s", self.problem)
            return
        mismatch = index.clip.mismatch(clip_identity(models))
        if mismatch is not None:
            self.problem = f"mode=search: {mismatch}"
            log.warning("%s", self.problem)
            return
        self.index, self.problem = index, None
        info = index.manifest.index
        log.info("index: %d images, %s (%s), memory-mapped", len(index), info.kind, info.factory)

    def require(self):
        """The index, or a ``ValueError`` (a refused request) saying why there is none."""
        if self.index is None:
            raise ValueError(self.problem)
        return self.index


def query_row(rows: np.ndarray, name: str = "embedding") -> np.ndarray:
    """The one row of an embedding input's rows (``pipeline.embedding_file``), l2-normalised to
    float32 ``[d]``; several rows are refused."""
    if rows.shape[0] != 1:
        raise ValueError(f"{name}: {rows.shape[0]} rows; a search takes one embedding, [d] or [1, d]")
    vector = rows[0].astype(np.float64)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def load_query_embedding(path: Path, dim: int, name: str = "embedding") -> np.ndarray:
    """One embedding of a ``.npy`` file (``[d]`` or ``[1, d]``), checked as every embedding input
    is (``pipeline.embedding_file``), l2-normalised to float32 ``[d]``."""
    return query_row(load_embedding(path, dim, name), name)


def mix(prior: np.ndarray | None, text: np.ndarray, weight: float) -> np.ndarray:
    """``normalize((1 - weight) * prior + weight * text)`` (``text`` alone at weight 1)."""
    vector = text.astype(np.float64) if weight >= 1 else (1 - weight) * prior + weight * text
    norm = np.linalg.norm(vector)
    if norm == 0:
        raise ValueError("text_weight: the prior's and the text's embeddings cancel out at this weight; change it")
    return (vector / norm).astype(np.float32)


def search(
    index, query: np.ndarray, k: int, kind: str, text_weight: float | None, with_embedding: bool = True
) -> tuple[SearchResult, list]:
    """The ``SearchResult`` of ``query`` among ``index``'s images (with the query's embedding), and
    the matches (for the sheet)."""
    matches = index.search(query, k)
    info = index.manifest.index
    extra = {"query_embedding": query.astype(float).tolist()} if with_embedding else {}
    result = SearchResult(
        query=kind,
        **({"text_weight": text_weight} if text_weight is not None else {}),
        k=k,
        index_items=len(index),
        index_kind=info.kind,
        **({"nprobe": info.nprobe, "index_recall_at_10": info.recall_at_10} if info.kind == "ivf" else {}),
        matches=[SearchMatch(rank=m.rank, id=m.id, score=m.score) for m in matches],
        **extra,
    )
    return result, matches


def sheet(index, matches: list):
    """The contact sheet of ``matches``: rank and score, then the id, under each thumbnail."""
    from retrieval.sheet import contact_sheet

    return contact_sheet([(index.thumbnail(m.position), f"{m.rank}. {m.score:.3f}\n{m.id}") for m in matches])
