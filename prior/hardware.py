"""What this machine's CPU can do natively, and the dtype an op runs in."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX) and oneDNN is there to use it."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution or matmul of ``x`` runs in: the autocast dtype if autocast is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
