"""Runs that end early leave nothing behind: ``didp`` stopped by Ctrl-C or SIGTERM, and run
directories left by a killed process (removed at the next setup)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline import locks
from testkit.locks import held_by_another_process
from testkit.predictor import RUN_DIR

ROOT = Path(__file__).resolve().parent.parent
LONG_RUN = ["-i", "prompt=a red cube", "-i", "iterations=500", "-i", "display_freq=1", "-i", "num_scales=4"]


class Watched:
    """A process whose stdout and stderr lines are read as they come, by threads, so that waiting
    for a line has a deadline and no pipe fills up."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.queues = {"out": queue.Queue(), "err": queue.Queue()}
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.threads = [
            threading.Thread(target=self._pump, args=(pipe, self.queues[name]), daemon=True)
            for name, pipe in (("out", process.stdout), ("err", process.stderr))
        ]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _pump(pipe, lines: queue.Queue) -> None:
        for line in pipe:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def wait_for(self, stream: str, pattern: str, timeout: float = 120.0) -> None:
        """Read ``stream`` ("out" or "err") up to a line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queues[stream].get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines[stream].append(line)
            if re.search(pattern, line):
                return
        self.process.kill()
        raise AssertionError(f"no line matching {pattern!r} in std{stream}: {self.finish()}")

    def finish(self, timeout: float = 120.0) -> tuple[int, list[str], str]:
        """The exit code (negative: the signal that ended it), stdout's lines and stderr's text."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self.threads:
            thread.join(10)
        for name, lines in self.queues.items():
            while (line := lines.get_nowait() if not lines.empty() else None) is not None:
                self.lines[name].append(line)
        return self.process.returncode, self.lines["out"], "\n".join(self.lines["err"])


def start_didp(tmp_path: Path, *args: str, out: Path | None = None) -> tuple[Watched, Path, Path]:
    """``didp`` (the command, as the shell runs it) on the tiny models in a process of its own, on
    the CPU, with its own temporary directory (where the server would find its downloaded inputs
    and ``didp-outputs/``; shared by the runs of one test), with Ctrl-C handled even if this test
    runs where SIGINT is ignored. Its ``-o``: ``out``, default ``tmp_path / "out"``."""
    temp, out = tmp_path / "temp", out or tmp_path / "out"
    temp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(temp), "DIDP_WEIGHTS": "tiny", "PYTHONPATH": str(ROOT)}
    env.update(CUDA_VISIBLE_DEVICES="")
    env.pop("DIDP_OUTPUT_DIR", None)
    command = [sys.executable, "-m", "commands.didp", *args, "-o", str(out)]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return Watched(process), temp, out


def left_in(temp: Path) -> list[str]:
    """What a run left in its temporary directory: anything but the (empty) outputs root and
    PyTorch's own cache directory."""
    return sorted(
        str(p.relative_to(temp))
        for p in temp.rglob("*")
        if p != temp / "didp-outputs" and not p.relative_to(temp).parts[0].startswith("torchinductor_")
    )


@pytest.mark.parametrize(("kind", "word"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_didp_stopped_mid_run_keeps_whole_files_and_leaves_no_temporary_ones(tmp_path, kind, word):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(picture)
    run, temp, out = start_didp(tmp_path, *LONG_RUN, "-i", f"image=@{picture}")
    run.wait_for("out", r"step_0002\.png")
    run.process.send_signal(kind)
    code, printed, err = run.finish()
    assert code == -kind, err  # ended by the signal, as a shell loop around didp needs to stop
    assert "Traceback" not in err
    assert f"{word}: the run did not finish; the {len(printed)} files written so far are in {out}" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in printed)  # each printed
    assert "result.json" not in {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        assert Image.open(png).size == (256, 256)  # whole files only
    assert left_in(temp) == []  # the run directory and the copy of the input picture are gone


def test_didp_stopped_during_setup_says_nothing_was_written(tmp_path):
    run, temp, out = start_didp(tmp_path, *LONG_RUN)
    run.wait_for("err", "no CUDA device")  # setup's first words: the models are not loaded yet
    run.process.send_signal(signal.SIGTERM)
    code, printed, err = run.finish()
    assert code == -signal.SIGTERM and "Traceback" not in err, err
    assert printed == [] and f"terminated: nothing was written to {out}" in err
    assert not out.exists() and left_in(temp) == []  # the directory made for the run is gone too


def test_main_returns_the_shells_exit_codes_for_signals():
    from commands.didp import SIGNAL_EXIT_CODES, Progress, Terminated

    assert SIGNAL_EXIT_CODES == {130: signal.SIGINT, 143: signal.SIGTERM}
    progress = Progress(output=Path("out"), written=[Path("out/text_tokens.npy")])
    assert progress.interrupted(KeyboardInterrupt()) == (
        "interrupted: the run did not finish; the 1 file written so far are in out (no result.json)"
    )
    progress.written.append(Path("out/result.json"))
    assert progress.interrupted(Terminated()) == "terminated after the run had finished: its files are in out"


def test_a_run_directory_left_by_a_killed_process_is_removed_at_the_next_setup(tmp_path):
    """However young it is: a directory is held from the moment it exists (``locks.make_held``), so
    one that nobody holds was left behind, and no age needs guarding."""
    from pipeline.runner import Pipeline

    run, temp, _ = start_didp(tmp_path, *LONG_RUN)
    run.wait_for("out", r"step_0001\.png")
    run.process.kill()  # SIGKILL: no clean-up runs
    run.finish()
    root = temp / "didp-outputs"
    (left,) = root.iterdir()
    assert RUN_DIR.fullmatch(left.name) and (left / "step_0001.png").is_file()
    live = root / "run-0123456789abcdef"  # another process's, in use
    mine = root / "notes"  # not a run directory
    for path in (live, mine):
        path.mkdir()
    with held_by_another_process(live):
        Pipeline("tiny", output_root=root)  # at once: the killed run's directory is seconds old
        assert sorted(p.name for p in root.iterdir()) == sorted([live.name, mine.name])


def test_concurrent_didp_runs_never_remove_each_others_files(tmp_path):
    """Three didp processes at once, sharing the temporary directory and so the root of their run
    directories: a second run into the first's -o is refused and touches nothing there; a third,
    into another -o, sets up (sweeping abandoned run directories) and finishes while the first is
    still running; the first's directory and files are still there, whole, when it is stopped."""
    first, temp, out = start_didp(tmp_path, *LONG_RUN)
    first.wait_for("out", r"step_0001\.png")
    (run_dir,) = (temp / "didp-outputs").iterdir()
    embed = ["-i", "prompt=a blue cube", "-i", "mode=embed", "-i", "prior_steps=8"]
    code, printed, err = start_didp(tmp_path, *embed)[0].finish()
    assert code == 2 and "another didp run is writing there" in err and printed == []
    other = tmp_path / "other"
    code, printed, err = start_didp(tmp_path, *embed, out=other)[0].finish()
    assert code == 0, err
    assert [Path(p).name for p in printed][-1] == "result.json" and (other / "result.json").is_file()
    assert first.process.poll() is None and (run_dir / "step_0001.png").is_file()
    first.process.send_signal(signal.SIGINT)
    code, printed, err = first.finish()
    assert code == -signal.SIGINT, err
    names = [Path(p).name for p in printed]
    assert names[:4] == ["text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "step_0001.png"]
    assert all(Path(p).is_file() for p in printed) and "result.json" not in names
    assert not run_dir.exists()  # gone with its run


def test_remove_abandoned_leaves_links_files_and_held_directories(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (root / "run-aaaaaaaaaaaaaaaa").symlink_to(target, target_is_directory=True)
    (root / "run-bbbbbbbbbbbbbbbb").write_text("a file")
    held, gone = root / "run-cccccccccccccccc", root / "run-dddddddddddddddd"
    for path in (held, gone):
        path.mkdir()
        (path / "step_0001.png").write_bytes(b"x")
    lock = locks.hold(held)
    try:
        with pytest.raises(locks.DirectoryBusy):
            locks.hold(held)  # another open of the same directory, even in this process
        removed = locks.remove_abandoned(root, RUN_DIR)
    finally:
        locks.release(lock)
    assert removed == [gone]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["run-aaaaaaaaaaaaaaaa", "run-bbbbbbbbbbbbbbbb", "run-cccccccccccccccc"]
    )
    assert (target / "keep.txt").read_text() == "keep"
    assert locks.remove_abandoned(root, RUN_DIR) == [held]  # released: now abandoned


def test_a_dropped_hold_releases_its_directory(tmp_path):
    import gc

    held = locks.hold(tmp_path)
    with pytest.raises(locks.DirectoryBusy):
        locks.hold(tmp_path)
    del held
    gc.collect()
    again = locks.hold(tmp_path)  # free: the dropped owner's descriptor was closed
    locks.release(again)
    locks.release(again)  # twice is harmless
