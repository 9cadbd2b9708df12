"""Runs that end early leave nothing behind: ``didp`` stopped by Ctrl-C or SIGTERM, and run
directories left by a killed process (removed at the next setup)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from didp import locks

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = re.compile(r"run-[0-9a-f]{16}")
LONG_RUN = ["-i", "prompt=a red cube", "-i", "iterations=500", "-i", "display_freq=1", "-i", "num_scales=4"]


def start_didp(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """``didp`` on the tiny models in a process of its own, with its own temporary directory
    (where the server would find its downloaded inputs and ``didp-outputs/``)."""
    temp, out = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "DIDP_WEIGHTS": "tiny", "PYTHONPATH": str(ROOT)}
    env.pop("DIDP_OUTPUT_DIR", None)
    command = [sys.executable, "-m", "didp.cli", *args, "-o", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, temp, out


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120.0) -> list[str]:
    """stdout lines up to the first one that matches ``pattern``."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}; got {lines} and {process.communicate()}")


def left_in(temp: Path) -> list[str]:
    """What a run left in its temporary directory: anything but the (empty) outputs root and
    PyTorch's own cache directory."""
    return sorted(
        str(p.relative_to(temp))
        for p in temp.rglob("*")
        if p != temp / "didp-outputs" and not p.relative_to(temp).parts[0].startswith("torchinductor_")
    )


@pytest.mark.parametrize(
    ("kind", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_didp_stopped_mid_run_keeps_whole_files_and_leaves_no_temporary_ones(tmp_path, kind, code, word):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(picture)
    process, temp, out = start_didp(tmp_path, *LONG_RUN, "-i", f"image=@{picture}")
    printed = wait_for_line(process, r"step_0002\.png")
    process.send_signal(kind)
    rest, err = process.communicate(timeout=120)
    printed += rest.split()
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert f"{word}: the run did not finish; the {len(printed)} files written so far are in {out}" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in printed)
    assert "result.json" not in {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        assert Image.open(png).size == (256, 256)  # whole files only
    assert left_in(temp) == []  # the run directory and the copy of the input picture are gone


def test_didp_stopped_during_setup_says_nothing_was_written(tmp_path):
    process, temp, out = start_didp(tmp_path, *LONG_RUN)
    first = process.stderr.readline()  # setup's first words: the models are not loaded yet
    assert "no CUDA device" in first, first
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert f"terminated: nothing was written to {out}" in err
    assert not out.exists() and left_in(temp) == []  # the directory made for the run is gone too


def test_a_run_directory_left_by_a_killed_process_is_removed_at_the_next_setup(tmp_path, monkeypatch):
    import predict

    process, temp, _ = start_didp(tmp_path, *LONG_RUN)
    wait_for_line(process, r"step_0001\.png")
    process.kill()  # SIGKILL: no clean-up runs
    process.communicate()
    root = temp / "didp-outputs"
    (left,) = root.iterdir()
    assert RUN_DIR.fullmatch(left.name) and (left / "step_0001.png").is_file()
    old = time.time() - 2 * locks.MIN_AGE_SECONDS
    os.utime(left, (old, old))
    live = root / "run-0123456789abcdef"  # another process's, in use
    young = root / "run-fedcba9876543210"  # just made: its process may not hold it yet
    mine = root / "notes"  # not a run directory
    for path in (live, young, mine):
        path.mkdir()
    for path in (live, mine):
        os.utime(path, (old, old))
    code = (
        "import sys, pathlib\nfrom didp import locks\n"
        "locks.hold(pathlib.Path(sys.argv[1]))\nprint('held', flush=True)\nsys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(predict, "OUTPUT_ROOT", root)
        monkeypatch.setenv("DIDP_WEIGHTS", "tiny")
        predict.Predictor().setup()
        assert sorted(p.name for p in root.iterdir()) == sorted([live.name, young.name, mine.name])
    finally:
        holder.communicate("")


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
        removed = locks.remove_abandoned(root, RUN_DIR, min_age=0)
    finally:
        locks.release(lock)
    assert removed == [gone]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["run-aaaaaaaaaaaaaaaa", "run-bbbbbbbbbbbbbbbb", "run-cccccccccccccccc"]
    )
    assert (target / "keep.txt").read_text() == "keep"
    assert locks.remove_abandoned(root, RUN_DIR, min_age=0) == [held]  # released: now abandoned
