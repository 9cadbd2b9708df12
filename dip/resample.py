"""Fixed x2 down- and upsampling with the separable cubic kernel of the hq skip net.

Both are depthwise (each channel is resampled on its own) with reflection padding, and keep
a constant image constant: the downsampling kernel sums to 1 and each of the four polyphase
components of the (doubled) upsampling kernel sums to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
_TAPS = len(CUBIC_KERNEL)
_PAD = _TAPS // 2 - 1  # 3: output pixel centres fall between the two middle taps


def cubic_kernel_2d(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The separable 2-D kernel ``[8, 8]``, outer product of ``CUBIC_KERNEL`` with itself (sums to 1)."""
    k = torch.tensor(CUBIC_KERNEL, dtype=torch.float64)
    return torch.outer(k, k).to(dtype)


class Downsample(nn.Module):
    """Halve height and width: reflect-pad by 3, depthwise 8x8 cubic filter, stride 2.

    ``[b, c, h, w] -> [b, c, h // 2, w // 2]`` for even ``h, w >= 4``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("weight", cubic_kernel_2d().expand(channels, 1, _TAPS, _TAPS).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (_PAD,) * 4, mode="reflect")
        return F.conv2d(x, self.weight.to(x.dtype), stride=2, groups=self.channels)


class Upsample(nn.Module):
    """Double height and width: reflect-pad by 2, depthwise stride-2 transposed conv with the kernel x2.

    ``[b, c, h, w] -> [b, c, 2h, 2w]`` for ``h, w >= 3``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        # x2 per axis: a transposed conv of stride 2 spreads each input over twice the taps
        kernel = cubic_kernel_2d() * 4
        self.register_buffer("weight", kernel.expand(channels, 1, _TAPS, _TAPS).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, ((_PAD + 1) // 2,) * 4, mode="reflect")
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=2, padding=2 * _PAD + 1, groups=self.channels)
