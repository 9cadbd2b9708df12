"""The network's convolution: ``nn.Conv2d``, whose weight gradient on the CPU is summed over tiles.

oneDNN computes a convolution's weight gradient at well under its speed elsewhere when the
image is large: for the 3x3 conv of 196 to 192 channels at 256 x 256 px (the top level's merge,
the largest in the network) it reached 0.42 of the matmul peak in float32, against 0.95 for the
forward pass and 0.89 for the input gradient. Summed over tiles of a few thousand pixels, the
same weight gradient reached 0.79 (float32, 4096 px tiles) and 0.78 of the bf16 peak (bf16,
16384 px tiles), against 0.61 whole. 1x1 convolutions gained nothing and are left whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prior.hardware import compute_dtype

# Per compute dtype: the largest tile, in pixels, and its largest width. Measured on the
# network's 3x3 convolutions at 128 and 256 px (the tiles' side ratio mattered little).
WEIGHT_GRAD_TILES = {torch.float32: (4096, 128), torch.bfloat16: (16384, 256)}


def weight_grad_tiles(height: int, width: int, dtype: torch.dtype) -> list[tuple[slice, slice]] | None:
    """The ``(rows, columns)`` tiles of a ``height x width`` output whose weight gradients are
    summed; ``None`` where the whole image is computed at once (it fits one tile, or ``dtype``
    was not measured)."""
    if dtype not in WEIGHT_GRAD_TILES or height * width <= WEIGHT_GRAD_TILES[dtype][0]:
        return None
    pixels, max_width = WEIGHT_GRAD_TILES[dtype]
    tile_width = min(width, max_width)
    tile_height = max(1, pixels // tile_width)
    return [
        (slice(top, top + tile_height), slice(left, left + tile_width))
        for top in range(0, height, tile_height)
        for left in range(0, width, tile_width)
    ]


class _TiledWeightGradConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding) computed in ``dtype``; the gradients
    come back in each input's own dtype, the weight's summed over tiles in float32, the bias's
    summed in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, tiles):
        x_, weight_ = x.to(dtype), weight.to(dtype)
        bias_ = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x_, weight_)
        ctx.tiles = tiles
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return F.conv2d(x_, weight_, bias_)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
        kh, kw = weight.shape[2:]

        def backward(grad_out, x, mask):
            args = (None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)
            return torch.ops.aten.convolution_backward(grad_out, x, weight, *args)

        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = backward(grad_out, x, [True, False, False])[0].to(x_dtype)
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for rows, cols in ctx.tiles:
                x_rows, x_cols = slice(rows.start, rows.stop + kh - 1), slice(cols.start, cols.stop + kw - 1)
                grad_weight += backward(grad_out[:, :, rows, cols], x[:, :, x_rows, x_cols], [False, True, False])[1]
            grad_weight = grad_weight.to(weight_dtype)
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state dict), faster to train on the CPU.

    When training on the CPU a stride-1, unpadded, ungrouped convolution with a kernel larger
    than 1x1 sums its weight gradient over tiles of the image (``WEIGHT_GRAD_TILES``); under
    autocast it computes in the autocast dtype, as ``nn.Conv2d`` would. Otherwise it is
    ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = dtype = None
        if self._tiles_weight_grad(x):
            (kh, kw), dtype = self.kernel_size, compute_dtype(x)
            tiles = weight_grad_tiles(x.shape[-2] - kh + 1, x.shape[-1] - kw + 1, dtype)
        if tiles is None:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _TiledWeightGradConv.apply(x, self.weight, self.bias, dtype, tiles)

    def _tiles_weight_grad(self, x: torch.Tensor) -> bool:
        plain = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        unpadded = self.padding == (0, 0) or self.padding == "valid"
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and self.kernel_size != (1, 1)
            and plain
            and unpadded
        )
