"""Captions files: rows of (id, caption) read from Parquet, CSV, JSONL or plain text, and checked.

    rows = read_captions(Path("captions.parquet"), id_column="id", caption_column="caption")
    rows.table  # id (string, unique), caption (string; null where the row is refused), problem

A file, or a directory whose files are all of one kind (read in name order; names starting with
``.`` or ``_``, such as Spark's ``_SUCCESS``, are skipped). The kind is the file's suffix:

- ``.parquet`` / ``.pq``, ``.csv`` (a header row; both columns read as text, so ``007`` stays
  ``007``), ``.jsonl`` / ``.ndjson`` (one object a line), with the two columns named;
- ``.txt``: one caption a line; the id is the line number (1-based, as text), counted on across
  the files of a directory.

What would make the whole job wrong is refused at once with ``CaptionsError`` (a ``ValueError``)
naming the problem: an unreadable file, a missing column, a null, blank or duplicate id. What is wrong
with one row is that row's ``problem`` (a null, blank or non-string caption), so that a job can
set it aside and go on with the others. Blank means ASCII whitespace only, as a request counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

KINDS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


class CaptionsError(ValueError):
    """An input that no job can run on: the message names the file and the problem."""


@dataclass
class Captions:
    """The rows of an input in order: ``table`` has ``id`` (string, unique), ``caption`` (string,
    null for a refused row) and ``problem`` (string, null for a good row)."""

    table: pa.Table
    files: list[Path]
    kind: str

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def bad(self) -> int:
        return self.table.num_rows - self.table["problem"].null_count


def input_files(path: Path, sniff: bool = False) -> tuple[list[Path], str]:
    """The files of ``path`` (a file, or a directory of files of one kind) and their kind; with
    ``sniff``, a single file whose name says no kind (a download) is Parquet if it starts as one,
    JSONL if its name ends in ``.json``, else text."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise CaptionsError(f"{path}: no input files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise CaptionsError(f"{path}: no such file or directory")
    if sniff and path.is_file() and path.suffix.lower() not in KINDS:
        with path.open("rb") as head:
            parquet = head.read(4) == b"PAR1"
        return files, "parquet" if parquet else "jsonl" if path.suffix.lower() == ".json" else "txt"
    kinds = {KINDS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        strange = next(p for p in files if p.suffix.lower() not in KINDS)
        raise CaptionsError(f"{strange}: unknown kind of file (use {', '.join(sorted(KINDS))})")
    if len(kinds) > 1:
        raise CaptionsError(f"{path}: files of several kinds ({', '.join(sorted(kinds))}); give one kind per directory")
    return files, kinds.pop()


def read_captions(path: Path, id_column: str = "id", caption_column: str = "caption", sniff: bool = False) -> Captions:
    """The checked rows of ``path``; ``CaptionsError`` for an input no job can run on (``sniff``:
    see ``input_files``)."""
    files, kind = input_files(Path(path), sniff)
    tables = []
    first_id = 1
    for file in files:
        try:
            if kind == "txt":
                table = _read_text(file, first_id)
                first_id += table.num_rows
            else:
                table = _read_table(file, kind, id_column, caption_column)
        except CaptionsError:
            raise
        except (OSError, pa.ArrowException, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaptionsError(f"{file}: unreadable as {kind}: {_first_line(error)}") from None
        tables.append(_checked(table, file))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    _refuse_duplicates(table["id"], Path(path))
    return Captions(table, files, kind)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _read_text(file: Path, first: int) -> pa.Table:
    lines = file.read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    captions = [line.removesuffix("\r") for line in lines]
    ids = [str(first + i) for i in range(len(captions))]
    return pa.table({"id": pa.array(ids, pa.string()), "caption": pa.array(captions, pa.string())})


def _read_table(file: Path, kind: str, id_column: str, caption_column: str) -> pa.Table:
    columns = [id_column, caption_column]
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(file).names
        _require(columns, names, file)
        table = pq.read_table(file, columns=columns)
    elif kind == "csv":
        import pyarrow.csv as pcsv

        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            include_columns=columns,
            include_missing_columns=True,
            strings_can_be_null=False,  # an empty caption is blank, not missing
            quoted_strings_can_be_null=False,
        )
        with pcsv.open_csv(file, convert_options=pcsv.ConvertOptions(column_types={})) as reader:
            names = reader.schema.names
        _require(columns, names, file)
        table = pcsv.read_csv(file, convert_options=convert)
    else:
        table = _read_jsonl(file, columns)
    return table.rename_columns(["id", "caption", *table.schema.names[2:]])


def _require(columns: list[str], names: list[str], file: Path) -> None:
    for name in columns:
        if name not in names:
            raise CaptionsError(f"{file}: no column {name!r} (it has {', '.join(map(repr, names)) or 'none'})")


def _read_jsonl(file: Path, columns: list[str]) -> pa.Table:
    import pyarrow.json as pjson

    try:
        table = pjson.read_json(file)
    except pa.ArrowInvalid as error:
        if "changed from" not in str(error):  # not mixed types in a column: a broken file
            raise
        table = None
    if table is not None:
        _require(columns, table.schema.names, file)
        return table.select(columns)
    # a column holds values of several types (say a caption that is a number): read line by line,
    # so that such a row is refused alone rather than the whole file
    values: dict[str, list] = {name: [] for name in columns}
    seen: set[str] = set()
    for number, line in enumerate(file.read_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise CaptionsError(f"{file}: line {number} is not a JSON object")
        seen.update(record)
        for name in columns:
            values[name].append(record.get(name))
    _require(columns, sorted(seen), file)
    ids = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values[columns[0]]]
    captions = values[columns[1]]
    kinds = [None if c is None or isinstance(c, str) else type(c).__name__ for c in captions]
    return pa.table(
        {
            columns[0]: pa.array(ids, pa.string()),
            columns[1]: pa.array([c if k is None else None for c, k in zip(captions, kinds, strict=True)], pa.string()),
            "_kind": pa.array(kinds, pa.string()),
        }
    )


def _checked(table: pa.Table, file: Path) -> pa.Table:
    """``id`` as text (no nulls), ``caption`` as text with each refused row's ``problem``."""
    ids = table["id"]
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py() + 1
        raise CaptionsError(f"{file}: {ids.null_count} rows have no id (the first is row {row})")
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        try:
            ids = pc.cast(ids, pa.string())
        except pa.ArrowException:
            raise CaptionsError(f"{file}: the id column's type {ids.type} cannot be read as text") from None
    ids = pc.cast(ids, pa.string())
    blank = pc.equal(pc.utf8_trim(ids, _ASCII_WHITESPACE), "")
    if pc.any(blank).as_py():
        row = pc.index(blank, True).as_py() + 1
        raise CaptionsError(f"{file}: {pc.sum(blank).as_py()} rows have a blank id (the first is row {row})")
    captions = table["caption"]
    kinds = table["_kind"].to_pylist() if "_kind" in table.schema.names else [None] * table.num_rows
    if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
        texts = pc.cast(captions, pa.string()).to_pylist()
    elif pa.types.is_null(captions.type):
        texts = [None] * table.num_rows
    else:  # a column of numbers, say: no row of it is a caption
        texts = [None] * table.num_rows
        kinds = [None if v is None else str(captions.type) for v in captions.to_pylist()]
    problems = []
    for text, kind in zip(texts, kinds, strict=True):
        if kind is not None:
            problems.append(f"caption is not text ({kind})")
        elif text is None:
            problems.append("caption is missing (null)")
        elif not text.strip(_ASCII_WHITESPACE):
            problems.append("caption is blank")
        else:
            problems.append(None)
    good = [t if p is None else None for t, p in zip(texts, problems, strict=True)]
    return pa.table({"id": ids, "caption": pa.array(good, pa.string()), "problem": pa.array(problems, pa.string())})


def _refuse_duplicates(ids: pa.ChunkedArray, path: Path) -> None:
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]
        raise CaptionsError(
            f"{path}: {len(repeated)} ids occur more than once (id {first['values'].as_py()!r} "
            f"{first['counts'].as_py()} times); ids must be unique"
        )
