"""A run's directory and its files.

Every run writes into a new ``run-<random hex>/`` directory below the output root, holding fixed
file names: output paths never derive from the inputs. The directory is held (``pipeline.locks``)
from the moment it exists until it is discarded, so one left by a killed process (``kill -9``, an
out-of-memory kill, a container restart) is known as abandoned at once and removed by the next
``remove_abandoned``, however young it is. A write that fails raises ``OutputError``, which says
what to fix.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import locks
from .media import animation_of_files, to_image

RUN_DIR = re.compile(r"run-[0-9a-f]{16}")
# The setting's name in messages: the edges read the output root from the environment under it.
OUTPUT_SETTING = "DIDP_OUTPUT_DIR"


class OutputError(RuntimeError):
    """The output directory cannot be written (missing, not a directory, read-only, full)."""


@contextlib.contextmanager
def writing(path: Path, root: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into an ``OutputError`` that says what to fix."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise OutputError(
            f"cannot write the outputs: {path}: {reason}. {OUTPUT_SETTING} ({root}) must be a writable "
            "directory with free space; this run's files were removed"
        ) from None


def remove_abandoned(root: Path) -> list[Path]:
    """Remove the run directories in ``root`` that no process holds (their runs were killed)."""
    return locks.remove_abandoned(root, RUN_DIR)


class RunDirectory:
    """One run's directory below ``root``, held until ``discard``; writers for its files."""

    def __init__(self, path: Path, root: Path, lock: locks.Held | None):
        self.path, self.root, self._lock = path, root, lock

    @classmethod
    def create(cls, root: Path) -> RunDirectory:
        """A new, empty, held ``run-<random hex>`` directory in ``root`` (made if missing)."""
        with writing(root, root):
            root.mkdir(parents=True, exist_ok=True)
            while True:
                path = root / f"run-{secrets.token_hex(8)}"
                with contextlib.suppress(FileExistsError, locks.DirectoryBusy):
                    return cls(path, root, locks.make_held(path))

    def discard(self) -> None:
        """Remove the directory and everything in it, then let it go (at most once)."""
        if self._lock is not False:
            shutil.rmtree(self.path, ignore_errors=True)
            locks.release(self._lock)
            self._lock = False

    def write_npy(self, name: str, array: np.ndarray) -> Path:
        path = self.path / name
        with writing(path, self.root):
            np.save(path, array)
        return path

    def write_png(self, name: str, image: torch.Tensor) -> Path:
        """``image``: ``[3, H, W]`` in [0, 1] (clamped, rounded to 8 bits)."""
        path = self.path / name
        with writing(path, self.root):
            to_image(image).save(path)
        return path

    def write_parquet(self, name: str, table) -> Path:
        import pyarrow.parquet as pq

        path = self.path / name
        with writing(path, self.root):
            pq.write_table(table, path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        with writing(path, self.root):
            path.write_text(text)
        return path

    def write_animation(self, stem: str, frames: list[list[Path]], fmt: str) -> Path:
        """An animation (``stem.fmt``) of PNGs already written: one frame per entry, its pictures
        side by side (``pipeline.media.animation_of_files``)."""
        path = self.path / f"{stem}.{fmt}"
        with writing(path, self.root):
            animation_of_files(frames, path, fmt)
        return path

    def __repr__(self) -> str:
        return f"RunDirectory({self.path})"
