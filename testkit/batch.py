"""``didp batch`` as a process of its own, killed midway: what the resume test and benchmark share."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

from . import ROOT

SHARD_LINE = re.compile(r"part-\d{5}\.parquet$")


def start_batch(*args: object, command: str = "batch") -> subprocess.Popen:
    """``didp COMMAND ARGS`` (``didp batch`` by default) as the shell runs it, on the CPU, in a
    session of its own (so that it and the local Ray it starts can be ended together), stdout and
    stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "commands.didp", command, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_after_first_shard(*args: object, timeout: float = 300, command: str = "batch") -> subprocess.Popen:
    """Start ``didp batch ARGS`` and SIGKILL it as soon as it prints its first shard's path; then
    end what is left of its session (its local Ray). Returns the ended process."""
    process = start_batch(*args, command=command)
    try:
        deadline = time.monotonic() + timeout
        for line in process.stdout:  # the path of each shard, as it is written
            if SHARD_LINE.search(line.strip()):
                os.kill(process.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
        process.wait(60)
    finally:
        end_session(process)
    return process


def end_session(process: subprocess.Popen, grace: float = 10) -> None:
    """End the processes left in ``process``'s session (it was started in one of its own), by the
    session's id, after ``grace`` seconds for them to notice their driver is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a float32 ``[rows, d]`` array."""
    return np.stack(table[column].to_numpy(zero_copy_only=False)).astype(np.float32)
