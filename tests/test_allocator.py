"""The allocator set-up: large CPU tensors come from kept heap memory, not fresh pages each time,
and the memory goes back to the system when asked."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import pytest
import torch

from pipeline.allocator import keep_freed_memory, release_freed_memory

NBYTES = 64 * 2**20  # over glibc's largest mmap threshold (32 MB), like the network's 50 MB tensors at 256 px
WARM_UP = 12  # the heap first grows by a few tensors' sizes (posix_memalign's slack) before it reuses them

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the set-up is for glibc's malloc")


def page_faults_of_a_fresh_tensor() -> int:
    """Minor page faults (whole process) while a ``NBYTES`` tensor is allocated, written and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(NBYTES // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_kept_memory_is_reused_and_handed_back():
    pages = NBYTES // resource.getpagesize()
    release_freed_memory()
    start = resident_bytes()
    assert keep_freed_memory()
    faults = [page_faults_of_a_fresh_tensor() for _ in range(WARM_UP + 5)]
    # without the set-up every use faults every page in again (16,384 of 16,384 pages)
    assert max(faults[WARM_UP:]) < pages / 10, faults
    assert resident_bytes() > start + NBYTES  # kept
    release_freed_memory()
    assert resident_bytes() < start + NBYTES / 2  # handed back
