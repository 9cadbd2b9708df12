"""Advisory locks on directories: which are in use, known without pid files.

A process holds an exclusive ``flock`` on a directory it works in for as long as it uses it. The
kernel drops the lock when the process ends, however it ends (``kill -9`` and out-of-memory
kills included), so a directory nobody holds was left behind and can be removed. Where ``flock``
is missing (Windows) or refused (some network file systems), directories are not held and none
is ever taken for abandoned.
"""

from __future__ import annotations

import os
import re
import shutil
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class DirectoryBusy(Exception):
    """Another process holds the directory."""


class Held:
    """A directory's descriptor, holding its lock until ``release``, or until this object is
    collected (a dropped owner does not keep its directory held for the life of the process)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    def is_at(self, path: Path) -> bool:
        """Whether ``path`` still leads to the held directory (it was not removed or replaced)."""
        try:
            here, held = path.stat(), os.fstat(self._fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        self._close()  # at most once


def hold(path: Path) -> Held | None:
    """Hold ``path`` (a directory) for this process until ``release``; ``None`` where locks are not
    available. Raises ``DirectoryBusy`` if another process (or another ``hold`` in this one) has it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as error:
        os.close(fd)
        if isinstance(error, BlockingIOError):
            raise DirectoryBusy(str(path)) from None
        if isinstance(error, OSError):  # a file system without locks
            return None
        raise
    return Held(fd)


def release(held: Held | None) -> None:
    if held is not None:
        held.release()


def make_held(path: Path, mode: int = 0o700) -> Held | None:
    """Make the directory ``path`` and hold it, as one step as far as any other process can tell.

    Between ``mkdir`` and the lock, a ``remove_abandoned`` elsewhere may take the new directory for
    abandoned and remove it; then the lock is on a removed directory, which this notices (the path
    no longer leads to the locked inode) and raises ``DirectoryBusy``: try another name. So a
    directory is never removed from under its owner, and no age needs guarding. Raises
    ``FileExistsError`` if ``path`` exists.
    """
    path.mkdir(mode=mode)
    held = hold(path)  # DirectoryBusy: a sweeper holds it, to remove it
    if held is not None and not held.is_at(path):
        held.release()
        raise DirectoryBusy(f"{path} was removed while it was being made")
    return held


def remove_abandoned(root: Path, names: re.Pattern[str]) -> list[Path]:
    """Remove the directories in ``root`` whose names match ``names`` and that no process holds;
    returns them. Symbolic links and files are left alone, and so is everything where locks are
    not available."""
    if fcntl is None or not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if not names.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            held = hold(path)
        except (DirectoryBusy, OSError):
            continue
        if held is None:  # no locks here: cannot tell abandoned from in use
            return removed
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            release(held)
        if not path.exists():
            removed.append(path)
    return removed
