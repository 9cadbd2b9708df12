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


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as its tensors report it: a bare ``cuda`` is the current CUDA device, ``cuda:0``;
    ``cpu:0`` is ``cpu``.

    ``torch.device("cuda") != torch.device("cuda:0")``, yet tensors moved to the former report
    the latter; comparing a module's device with a requested one needs both resolved.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")  # "cpu:0" too: CPU tensors report a bare "cpu"
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu
    if device.index is None and hasattr(backend, "current_device") and backend.is_available():
        return torch.device(device.type, backend.current_device())
    return device


def default_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def configure_backends(device: torch.device) -> None:
    """Process-wide settings for ``device``. On CUDA, cuDNN picks each convolution's fastest
    algorithm for the shapes it meets (a run repeats the same shapes hundreds of times), and its
    float32 convolutions (CLIP's patch embedding outside autocast) run in full float32 instead of
    PyTorch's default TF32, as matmuls already do: CLIP's embeddings match the reference's."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if hasattr(torch.backends.cudnn, "conv"):  # PyTorch 2.9 and later
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution or matmul of ``x`` runs in: the autocast dtype if autocast is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
