"""The network's convolution: ``nn.Conv2d``, whose float32 weight gradient on the CPU is summed over tiles.

oneDNN computes a float32 convolution's weight gradient at well under its speed elsewhere when
the image is large. For the 3x3 conv of 196 to 192 channels at 256 x 256 px (the top level's
merge, the largest in the network) on a Zen 5 CPU, with the server's allocator set-up, in
GFLOP/s: 222 whole against 446 summed over tiles of 64 x 128 px (forward 499, input gradient
458). Tiles of 4096 to 8192 px did best, their side ratio mattered little; at 128 px tiles and
the whole image were equal, and 1x1 convolutions gained nothing. In bf16 the same weight
gradient gained 3% (723 -> 745) and the network's forward and backward lost 3.6% to the tiles'
overhead: bf16 is left whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.hardware import compute_dtype

TILE_PIXELS = 8192  # the largest tile
TILE_WIDTH = 128  # its largest width


def weight_grad_tiles(height: int, width: int) -> list[tuple[slice, slice]] | None:
    """The ``(rows, columns)`` tiles of a ``height x width`` output whose weight gradients are
    summed, or ``None`` if the output fits one tile."""
    if height * width <= TILE_PIXELS:
        return None
    tile_width = min(width, TILE_WIDTH)
    tile_height = max(1, TILE_PIXELS // tile_width)
    return [
        (slice(top, top + tile_height), slice(left, left + tile_width))
        for top in range(0, height, tile_height)
        for left in range(0, width, tile_width)
    ]


class _TiledWeightGradConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding) whose weight gradient is summed over
    ``tiles`` of the output."""

    @staticmethod
    def forward(ctx, x, weight, bias, tiles):
        ctx.save_for_backward(x, weight)
        ctx.tiles = tiles
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        kh, kw = weight.shape[2:]

        def backward(grad_out, x, mask):
            args = (None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)
            return torch.ops.aten.convolution_backward(grad_out, x, weight, *args)

        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = backward(grad_out, x, [True, False, False])[0]
        if need_weight:
            grad_weight = torch.zeros_like(weight)
            for rows, cols in ctx.tiles:
                x_rows, x_cols = slice(rows.start, rows.stop + kh - 1), slice(cols.start, cols.stop + kw - 1)
                grad_weight += backward(grad_out[:, :, rows, cols], x[:, :, x_rows, x_cols], [False, True, False])[1]
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state dict), faster to train in float32 on the CPU.

    There a stride-1, unpadded, ungrouped convolution with a kernel larger than 1x1 sums its
    weight gradient over tiles of the image (``weight_grad_tiles``). Otherwise, and under
    autocast, it is ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = None
        if self._tiles_weight_grad(x):
            (kh, kw), (height, width) = self.kernel_size, x.shape[-2:]
            tiles = weight_grad_tiles(height - kh + 1, width - kw + 1)
        if tiles is None:
            return super().forward(x)
        return _TiledWeightGradConv.apply(x, self.weight, self.bias, tiles)

    def _tiles_weight_grad(self, x: torch.Tensor) -> bool:
        plain = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        unpadded = self.padding == (0, 0) or self.padding == "valid"
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and compute_dtype(x) == torch.float32
            and self.weight.dtype == torch.float32
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and self.kernel_size != (1, 1)
            and plain
            and unpadded
        )
