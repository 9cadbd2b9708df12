"""A directory held (``pipeline.locks.hold``) by another process, as a running ``didp`` holds its
``-o`` and the predictor its run directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from testkit import ROOT


@contextlib.contextmanager
def held_by_another_process(directory: Path):
    """``directory`` held (``pipeline.locks.hold``) by another process until the block ends, as a
    running ``didp`` holds its ``-o`` and the predictor its run directory."""
    code = (
        "import sys, pathlib\nfrom pipeline import locks\n"
        "held = locks.hold(pathlib.Path(sys.argv[1]))\nprint('held', flush=True)\nsys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate("")  # ends the holder
    assert holder.returncode == 0
