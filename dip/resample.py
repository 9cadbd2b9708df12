"""Fixed x2 down- and upsampling with the separable cubic kernel of the hq skip net.

As in the original: a depthwise 8x8 convolution with reflection padding, stride 2 for
downsampling; a stride-2 transposed convolution with the kernel doubled for upsampling. A
constant image stays constant: the kernel sums to 1, and each of the two phases of the doubled
kernel (the taps that reach even or odd output pixels) sums to 1.

Both maps are linear and separable, so they are also two matrix products, one per axis, with
the padding folded into the matrices (``downsample_matrix``, ``upsample_matrix``). That form is
used in bf16/fp16: there the CPU's depthwise convolutions are about 10x slower than these
(mostly zero) matrix products, while in fp32 the convolutions are about 2x faster than them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.hardware import compute_dtype

# The 8-tap cubic (a = -0.5) kernel sampled at half-pixel offsets for a factor of 2.
CUBIC_KERNEL = (
    -0.01171875,
    -0.03515625,
    0.11328125,
    0.43359375,
    0.43359375,
    0.11328125,
    -0.03515625,
    -0.01171875,
)
TAPS = len(CUBIC_KERNEL)
DOWN_PAD = TAPS // 2 - 1  # 3: output pixel centres fall between the two middle taps
UP_PAD = (DOWN_PAD + 1) // 2  # 2 input pixels of reflection each side before the transposed conv


def cubic_kernel_2d(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The separable 2-D kernel ``[8, 8]``, outer product of ``CUBIC_KERNEL`` with itself (sums to 1)."""
    k = torch.tensor(CUBIC_KERNEL, dtype=torch.float64)
    return torch.outer(k, k).to(dtype)


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in ``[-(n-1), 2(n-1)]`` into ``[0, n)`` as reflection padding does (edge not repeated)."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def downsample_matrix(n: int) -> torch.Tensor:
    """``[n // 2, n]`` float64: reflect-pad by 3, filter with ``CUBIC_KERNEL``, keep every second sample."""
    if n < DOWN_PAD + 1:
        raise ValueError(f"cubic downsampling needs at least {DOWN_PAD + 1} pixels, got {n}")
    out = torch.arange(n // 2)[:, None]
    taps = torch.arange(TAPS)[None, :]
    columns = _reflect(2 * out + taps - DOWN_PAD, n)
    matrix = torch.zeros(n // 2, n, dtype=torch.float64)
    matrix.scatter_add_(1, columns, torch.tensor(CUBIC_KERNEL, dtype=torch.float64).expand(n // 2, TAPS))
    return matrix


def upsample_matrix(n: int) -> torch.Tensor:
    """``[2n, n]`` float64: reflect-pad by 2, stride-2 transposed conv with ``2 * CUBIC_KERNEL``, crop 7.

    Output ``o`` receives padded input ``m`` through tap ``t = o + 7 - 2m`` (when ``0 <= t < 8``).
    """
    if n < UP_PAD + 1:
        raise ValueError(f"cubic upsampling needs at least {UP_PAD + 1} pixels, got {n}")
    kernel = 2 * torch.tensor(CUBIC_KERNEL, dtype=torch.float64)
    out = torch.arange(2 * n)[:, None]
    padded = torch.arange(n + 2 * UP_PAD)[None, :]
    taps = out + 2 * DOWN_PAD + 1 - 2 * padded
    valid = (taps >= 0) & (taps < TAPS)
    weights = torch.where(valid, kernel[taps.clamp(0, TAPS - 1)], 0.0)
    columns = _reflect(padded - UP_PAD, n).expand_as(weights)
    matrix = torch.zeros(2 * n, n, dtype=torch.float64)
    matrix.scatter_add_(1, columns, weights)
    return matrix


def resample_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x [b, c, h, w] -> [b, c, h', w']`` with ``rows [h', h]`` and ``cols [w', w]`` on every channel.

    Works on the channels-last layout ``[b, h, w, c]``, where both products are plain matmuls
    over contiguous memory; the result is channels-last.
    """
    b, c, h, w = x.shape
    hn, wn = rows.shape[0], cols.shape[0]
    x = x.permute(0, 2, 3, 1).reshape(b, h, w * c)  # a view for channels-last input
    x = torch.matmul(rows, x)  # [b, h', w * c]
    x = torch.matmul(cols, x.reshape(b * hn, w, c))  # [b * h', w', c]
    return x.reshape(b, hn, wn, c).permute(0, 3, 1, 2)


class _Resample(nn.Module):
    """Shared machinery: the fixed kernel and the per-size matrices, built once per (size, device, dtype)."""

    def __init__(self, make_matrix, kernel_gain: float):
        super().__init__()
        self._make_matrix = make_matrix
        self._matrices: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.register_buffer("kernel", cubic_kernel_2d() * kernel_gain, persistent=False)

    def matrix(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (n, device, dtype)
        if key not in self._matrices:
            self._matrices[key] = self._make_matrix(n).to(device, dtype)
        return self._matrices[key]

    def depthwise_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.to(x.dtype).expand(x.shape[1], 1, TAPS, TAPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype in (torch.float32, torch.float64):
            return self.convolve(x)
        rows, cols = self.matrix(x.shape[-2], x.device, dtype), self.matrix(x.shape[-1], x.device, dtype)
        return resample_separable(x, rows, cols)


class Downsample(_Resample):
    """Halve height and width of ``[b, c, h, w]`` (even ``h, w >= 4``), each channel on its own."""

    def __init__(self):
        super().__init__(downsample_matrix, kernel_gain=1.0)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (DOWN_PAD,) * 4, mode="reflect")
        return F.conv2d(x, self.depthwise_kernel(x), stride=2, groups=x.shape[1])


class Upsample(_Resample):
    """Double height and width of ``[b, c, h, w]`` (``h, w >= 3``), each channel on its own."""

    def __init__(self):
        # x2 per axis: a stride-2 transposed conv spreads each input over twice the output taps
        super().__init__(upsample_matrix, kernel_gain=4.0)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (UP_PAD,) * 4, mode="reflect")
        return F.conv_transpose2d(x, self.depthwise_kernel(x), stride=2, padding=2 * DOWN_PAD + 1, groups=x.shape[1])
