"""How the process's C allocator (glibc malloc) treats the visualiser's large CPU tensors.

At 256 px the network's activations and gradients are 50 MB each, and glibc serves every
allocation above 32 MB with a fresh ``mmap``: each step then pays a page fault per 4 KB page
(about 12,000 per tensor) and has the kernel zero them, and returns them on ``free``. A 50 MB
``clone`` took 14 ms that way against 4 ms from memory kept in the heap (this project's
benchmark CPU). ``keep_freed_memory`` makes malloc keep freed memory for reuse for the whole
run; ``release_freed_memory`` hands it back to the system between runs. The price is a few
tensors' worth of memory: allocating and freeing one 64 MB tensor over and over, the heap grew
by six such blocks before it reused freed ones (likely because PyTorch asks for 64-byte-aligned
blocks, which a freed block of exactly the same size cannot hold); the visualiser's peak
resident memory rose by about 3%.

Both do nothing where the C library is not glibc. The served process also needs
``MALLOC_ARENA_MAX=1`` in its environment (cog.yaml): the server runs predictions on a thread of
its own, and only the main arena, shared by every thread under that setting, can grow past 64 MB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes (mallopt takes an int): the heap's top is kept, up to 2 GB free


def _load_glibc():
    with contextlib.suppress(OSError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
            libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            return libc
    return None


_GLIBC = _load_glibc()


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep what is freed there; ``True`` if applied.

    Process-wide and lasting: call it once at start-up (the predictor's ``setup``, a benchmark).
    """
    if _GLIBC is None:
        return False
    return bool(_GLIBC.mallopt(M_MMAP_MAX, 0)) and bool(_GLIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Hand memory that the run freed back to the system (``malloc_trim``).

    Called after every prediction. Without it, memory freed in the prediction thread's arena
    stays resident: the resident memory grew by about 70% over 200 requests on the tiny models;
    with it, it stays within a few percent (``reliability.rss_growth_pct``).
    """
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
