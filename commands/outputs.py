"""The ``-o`` directory of ``didp``: one run at a time, an earlier run's files replaced."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from pipeline.locks import DirectoryBusy, hold, release

# The names of the files a run writes (README, Outputs); a run into a directory replaces an
# earlier run's files.
OUTPUT_NAMES = re.compile(
    r"(text_tokens|text_embedding|image_embedding|target_embeddings)\.npy"
    r"|step_\d{4}(_\d{2})?\.png|(best|frame)_\d{2}\.png"
    r"|(progress|interpolation|edit)\.(webp|gif)|(embeddings|errors)\.parquet|result\.json"
    r"|query_embedding\.npy|contact_sheet\.png"
)


def remove_earlier_outputs(directory: Path) -> list[Path]:
    """Remove the files an earlier run wrote into ``directory`` (by their names; nothing else), so
    that runs do not mix; returns them."""
    earlier = sorted(p for p in directory.iterdir() if OUTPUT_NAMES.fullmatch(p.name) and p.is_file())
    for path in earlier:
        path.unlink(missing_ok=True)
    return earlier


class OutputBusy(Exception):
    """Another run is writing into the output directory."""


@contextlib.contextmanager
def output_directory(path: Path):
    """``path``, created if needed, for this run alone while it lasts.

    A second run into the same directory would remove this run's files when it replaces an
    earlier run's, so it is refused (``OutputBusy``); see ``pipeline.locks``. A directory created
    here and left empty (setup failed) is removed again.
    """
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold(path)
    except DirectoryBusy:
        raise OutputBusy(
            f"-o {path}: another didp run is writing there; wait for it to end or choose another directory"
        ) from None
    try:
        yield path
    finally:
        if created:  # while still held: another run may take the directory once it is released
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
        release(lock)
