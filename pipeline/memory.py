"""The memory budget: what a run may use, refusing up front what would not fit, and naming an
out-of-memory error when one happens anyway.

The budget is a number of megabytes given by the caller (``DIDP_MEMORY_BUDGET_MB`` at the edges),
else 80% of the device's memory: the GPU's, or the machine's (or its container's limit).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_BUDGET_FRACTION = 0.8
# A container's memory limit: cgroup v2, then v1 (older Docker hosts).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
# The setting's name in messages: the edges read it from the environment under this name.
BUDGET_SETTING = "DIDP_MEMORY_BUDGET_MB"
# How an allocation failure reads when it does not come as torch.OutOfMemoryError: the CPU
# allocator's, and cuBLAS's or cuDNN's own workspace allocations on a full GPU.
_OUT_OF_MEMORY_MESSAGES = (
    "can't allocate memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def total_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The device's memory and what it is: the GPU's, else the machine's (or its cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:  # a container's limit, where there is one
        with contextlib.suppress(OSError, ValueError):
            limit = Path(path).read_text().strip()
            if limit != "max":  # cgroup v1 writes a huge number for "no limit" instead
                total = min(total, int(limit))
    return total, "RAM"


def memory_budget_bytes(device: torch.device, setting: str | None = None) -> tuple[int, str]:
    """``setting`` megabytes (``"inf"``: no limit), else 80% of the device's memory; with a
    description for messages."""
    setting = (setting or "").strip()
    if setting:
        try:
            budget = float(setting)
        except ValueError:
            raise ValueError(f"{BUDGET_SETTING} must be a number of megabytes, got {setting!r}") from None
        if not budget > 0:
            raise ValueError(f"{BUDGET_SETTING} must be positive, got {setting!r}")
        return int(min(budget, 2.0**40) * 2**20), f"{BUDGET_SETTING}={setting}"
    total, kind = total_memory_bytes(device)
    return int(total * DEFAULT_BUDGET_FRACTION), f"{DEFAULT_BUDGET_FRACTION:.0%} of {total / 2**30:.1f} GB {kind}"


@dataclass(frozen=True)
class MemoryBudget:
    """What a run may use on ``device``: ``bytes``, and where that number comes from (``source``)."""

    device: torch.device
    bytes: int
    source: str

    @classmethod
    def for_device(cls, device: torch.device, setting: str | None = None) -> MemoryBudget:
        return cls(device, *memory_budget_bytes(device, setting))

    def check(self, estimate: Callable[[int, int, int], int], size: int, cutouts: int, scales: int, members: int):
        """Refuse, before any work, a visualisation whose estimated peak (``estimate(size,
        cutouts, scales)`` bytes for ``members`` images at once) exceeds the budget, with a hint
        at what would fit."""
        needed = estimate(size, cutouts, scales)
        if needed <= self.bytes:
            return

        def fits(size: int, cutouts: int, scales: int) -> bool:
            return estimate(size, cutouts, scales) <= self.bytes

        fitting = [n for n in range(cutouts - 1, 3, -1) if fits(size, n, scales)]
        if fitting:
            hint = f"num_cutouts={fitting[0]} fits at size={size}"
        elif size > 256 and fits(256, 4, min(scales, 6)):
            hint = "use size=256"
        elif members > 1:
            hint = "fewer images at once (num_outputs, interpolation_steps or embedding rows) would fit"
        else:
            hint = f"nothing fits: raise {BUDGET_SETTING} or use a bigger device"
        images = f" for {members} images at once" if members > 1 else ""
        raise ValueError(
            f"size={size} with num_cutouts={cutouts} and num_scales={scales}{images} needs about "
            f"{needed / 2**30:.2f} GB on {self.device.type}, over the memory budget of "
            f"{self.bytes / 2**30:.2f} GB ({self.source}); {hint}"
        )


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or an allocation failure reported as a plain ``RuntimeError``
    (or ``torch.AcceleratorError``): the CPU allocator's, cuBLAS's or cuDNN's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        type(error) in (RuntimeError, torch.AcceleratorError)
        and any(message in str(error) for message in _OUT_OF_MEMORY_MESSAGES)
    )


def out_of_memory_error(error: BaseException, device: torch.device, what: str) -> RuntimeError:
    """Free what the failed run held and describe the failure (``what``: the work that failed);
    the next run starts clean."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    traceback.clear_frames(error.__traceback__)  # the frames still hold the run's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return RuntimeError(
        f"out of memory on {device.type} during this run ({what}): {first_line}. The run's memory and "
        f"files were released; lower num_cutouts or size, or lower {BUDGET_SETTING} so that such "
        "requests are refused up front"
    )
