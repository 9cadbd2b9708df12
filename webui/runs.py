"""One run at a time on one pipeline, watched as it goes and stoppable, with the files it keeps.

``Runs.start(request)`` checks the request against the pipeline (``Pipeline.prepare``: the picture,
the memory budget) before any work, then runs it in a thread of its own. Every file the pipeline
yields is copied, whole, into the run's own directory below ``root`` (``Run.kept``) before the
pipeline goes on, so that what a stopped run produced stays: the pipeline removes its own copy of a
run that does not finish. ``Runs.cancel()`` stops the run at once, between two Python operations of
its thread (as Cog's cancellation does), not at the next frame. Nothing here imports Gradio.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.request import Request
from pipeline.runner import Job, Pipeline

KEEP_RUNS = 20  # the kept directories of older runs beyond this many are removed
_STEP_FILE = re.compile(r"step_(\d{4})(?:_(\d{2}))?\.png")


class Cancelled(BaseException):
    """Raised inside a run's thread to stop it (a ``BaseException``, as a cancellation is)."""


class Busy(RuntimeError):
    """A run is going on already."""


@dataclass
class Event:
    """What a run's thread reports: ``file`` (a kept ``path``), ``frame`` (``step`` and the
    pictures' ``metrics`` as the visualiser measured them), or its end: ``done``, ``cancelled``
    or ``failed`` (with ``message``)."""

    kind: str
    path: Path | None = None
    step: int | None = None
    metrics: list[dict] = field(default_factory=list)
    message: str = ""
    at: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """A run: its job, its directory of kept files and the events of its thread, in order."""

    job: Job
    directory: Path
    events: queue.Queue = field(default_factory=queue.Queue)
    kept: list[Path] = field(default_factory=list)
    thread: threading.Thread | None = None
    ended: str | None = None  # done, cancelled or failed, once over

    def follow(self, poll: float = 0.1) -> Iterator[Event]:
        """The run's events as they come, up to and including its end."""
        while True:
            try:
                event = self.events.get(timeout=poll)
            except queue.Empty:
                if self.thread is not None and not self.thread.is_alive() and self.events.empty():
                    return  # ended without a word (cannot happen; never wait forever)
                continue
            yield event
            if event.kind in ("done", "cancelled", "failed"):
                return


class Runs:
    """Runs on ``pipeline``, one at a time, keeping their files in ``root/run-NNNN/``. The
    pipeline reports its frames to ``on_frame``: make it with ``Pipeline(..., on_frame=runs.on_frame)``
    and set ``runs.pipeline`` after."""

    def __init__(self, root: Path, pipeline: Pipeline | None = None):
        self.root = Path(root)
        self.pipeline = pipeline
        self._lock = threading.Lock()
        self._current: Run | None = None
        self._cancellable = False  # the run's thread is inside its try block: a cancellation may land
        self._count = 0
        self._owner: str | None = None

    def on_frame(self, step: int, metrics: list[dict]) -> None:
        run = self._current
        if run is not None:
            run.events.put(Event("frame", step=step, metrics=[dict(m) for m in metrics]))

    @property
    def busy(self) -> bool:
        run = self._current
        return run is not None and run.ended is None

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the run going on, if any, to end; whether none goes on."""
        run = self._current
        if run is not None and run.thread is not None:
            run.thread.join(timeout)
        return not self.busy

    def prepare(self, request: Request) -> Job:
        """Everything checked before any work (``ValueError`` naming the input, or the budget)."""
        return self.pipeline.prepare(request)

    def start(self, job: Job, owner: str | None = None) -> Run:
        """Start ``job`` in a thread of its own; ``Busy`` if a run is going on. ``owner``: who
        may cancel it (``None``: anyone)."""
        with self._lock:
            if self.busy:
                raise Busy("a run is going on: wait for it to end or cancel it")
            self._count += 1
            directory = self.root / f"run-{self._count:04d}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            run = Run(job, directory)
            run.thread = threading.Thread(target=self._work, args=(run,), name="didp-ui-run", daemon=True)
            self._current, self._owner = run, owner
            self._forget_old_runs()
        run.thread.start()
        return run

    def cancel(self, owner: str | None = None) -> bool:
        """Stop the run going on, if any and if ``owner`` started it (what it kept stays);
        whether one was stopped."""
        with self._lock:
            run = self._current
            if run is None or not self._cancellable or run.thread is None:
                return False
            if self._owner is not None and owner != self._owner:
                return False
            self._cancellable = False  # one cancellation per run
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread.ident), ctypes.py_object(Cancelled))
            return True

    def _work(self, run: Run) -> None:
        end, out = Event("done"), None
        try:
            try:
                with self._lock:
                    self._cancellable = True
                out = self.pipeline.new_run_directory()
                with contextlib.closing(self.pipeline.run(run.job, out)) as files:
                    for path in files:
                        kept = _copy_whole(path, run.directory / path.name)
                        run.kept.append(kept)
                        run.events.put(Event("file", path=kept))
            finally:  # a cancellation that arrives here is still caught below; none can arrive after
                with self._lock:
                    self._cancellable = False
        except Cancelled:
            end = Event("cancelled")
        except Exception as error:  # out of memory, unwritable outputs: the message says what to do
            end = Event("failed", message=str(error) or type(error).__name__)
        finally:
            if out is not None:
                out.discard()  # copied already, or a stopped run's
            run.ended = end.kind
            run.events.put(end)

    def _forget_old_runs(self) -> None:
        runs = sorted(p for p in self.root.glob("run-[0-9][0-9][0-9][0-9]") if p.is_dir())
        for old in runs[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)


def _copy_whole(source: Path, target: Path) -> Path:
    """``target``, a whole copy of ``source`` (written aside, then renamed)."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def step_of(path: Path) -> tuple[int, int] | None:
    """``step_0025_02.png`` -> ``(25, 2)``; ``step_0025.png`` -> ``(25, 1)``; other files: ``None``."""
    match = _STEP_FILE.fullmatch(path.name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 1)
