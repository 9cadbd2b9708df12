"""What ``didp index`` reads: a folder of images (recursively) or Parquet with a path or URL column.

    rows = list_sources(Path("photos/"))          # id: the path below photos/, source: the file
    rows = list_sources(Path("items.parquet"))    # a "path" or "url" column (or column=...)

Every row has an ``id`` (text, unique: what search results name) and a ``source`` (a file path or
an http(s) URL). Only the ids appear in search results; sources stay in the index directory.
A folder's files are those whose suffix is an image's (``IMAGE_SUFFIXES``), hidden ones (a name
starting with ``.``) left out; whether a file really is an image is found when it is read, and one
that is not goes to the job's errors. Problems with the input as a whole raise ``SourcesError``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PARQUET_SUFFIXES = (".parquet", ".pq")
COLUMNS = ("path", "url")  # looked for in this order when no column is named


class SourcesError(ValueError):
    """An input no index can be built from; the message names the file and the problem."""


def list_sources(src: Path, column: str | None = None, id_column: str | None = None) -> pa.Table:
    """``id`` and ``source`` (both text) of every item of ``src``, in a stable order."""
    src = Path(src)
    if src.is_dir():
        if column or id_column:
            raise SourcesError(f"{src}: a folder has no columns; --column and --id-column are for Parquet")
        return _folder(src)
    if src.is_file():
        if src.suffix.lower() not in PARQUET_SUFFIXES:
            raise SourcesError(f"{src}: give a folder of images or a Parquet file (.parquet) with a path or url column")
        return _parquet(src, column, id_column)
    raise SourcesError(f"{src}: no such file or directory")


def _folder(src: Path) -> pa.Table:
    found: list[str] = []
    for directory, subdirectories, files in os.walk(src):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        base = Path(directory)
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((base / name).relative_to(src).as_posix())
    if not found:
        raise SourcesError(f"{src}: no image files in this folder (suffixes {', '.join(IMAGE_SUFFIXES)})")
    sources = [str(src / relative) for relative in found]
    return pa.table({"id": pa.array(found, pa.string()), "source": pa.array(sources, pa.string())})


def _parquet(src: Path, column: str | None, id_column: str | None) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(src).names
    except (OSError, pa.ArrowException) as error:
        raise SourcesError(f"{src}: unreadable as Parquet: {str(error).splitlines()[0]}") from None
    if column is None:
        column = next((name for name in COLUMNS if name in names), None)
        if column is None:
            raise SourcesError(f"{src}: no 'path' or 'url' column (it has {', '.join(map(repr, names))}); use --column")
    for name in filter(None, (column, id_column)):
        if name not in names:
            raise SourcesError(f"{src}: no column {name!r} (it has {', '.join(map(repr, names))})")
    table = pq.read_table(src, columns=list(dict.fromkeys(filter(None, (column, id_column)))))
    sources = _text(table[column], src, column)
    ids = sources if id_column is None else _text(table[id_column], src, id_column)
    if not len(ids):
        raise SourcesError(f"{src}: no rows")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]["values"].as_py()
        raise SourcesError(f"{src}: {len(repeated)} ids occur more than once (first {first!r}); ids must be unique")
    return pa.table({"id": ids, "source": sources})


def _text(values: pa.ChunkedArray, src: Path, name: str) -> pa.Array:
    try:
        text = pc.cast(values.combine_chunks(), pa.string())
    except pa.ArrowException:
        raise SourcesError(f"{src}: column {name!r} of type {values.type} cannot be read as text") from None
    blank = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    if pc.any(blank).as_py():
        row = pc.index(blank, True).as_py() + 1
        raise SourcesError(
            f"{src}: column {name!r} is null or blank in {pc.sum(blank).as_py()} rows (first: row {row})"
        )
    return text


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))
