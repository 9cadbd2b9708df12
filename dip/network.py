"""The "hq skip net" of Katherine Crowson's deep-image-prior fork: fixed noise in, an image out.

A U-Net-like encoder/decoder. Level ``i`` works at ``size / 2**i`` pixels and concatenates

- a skip branch: 1x1 conv to 4 channels, BatchNorm, LeakyReLU(0.2), and
- a deeper branch: 3x3 conv to 192 then cubic x2 downsampling, BN, act; 3x3 conv, BN, act;
  level ``i + 1`` (absent at the deepest level); cubic x2 upsampling,

then merges them: BN, 3x3 conv to 192, BN, act, 1x1 conv, BN, act. A 1x1 head gives 3
channels in a decorrelated colour space, mapped to RGB by a fixed 3x3 matrix, then a sigmoid.
Every 3x3 conv reflect-pads by 1 and may be deformable (``offset_type``). The network stays in
train mode: BatchNorm normalises with the statistics of the one image being drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from .conv import Conv2d
from .resample import Downsample, Upsample

INPUT_CHANNELS = 32
INPUT_SCALE = 0.1  # the fixed input noise is scaled by this before the first layer
CHANNELS = 192
SKIP_CHANNELS = 4
OFFSET_GROUPS = 4
OFFSET_TYPES = ("none", "1x1", "full")
MIN_DEEPEST_SIZE = 3  # the deepest upsampler reflect-pads by 2, which needs at least 3 pixels
LEAKY_SLOPE = 0.2

# Square root of the colour correlation of natural images (from Lucid / aphantasia), rows = RGB.
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
INV_COLOUR_SCALE = 1.6  # empirical saturation: the first (luminance) column is divided by this


def colour_matrix() -> torch.Tensor:
    """The fixed ``[3, 3]`` map from decorrelated colours to (pre-sigmoid) RGB: ``rgb = M @ c``.

    The first column is divided by 1.6, then the whole matrix by its largest column norm, so
    that no decorrelated channel is amplified.
    """
    m = torch.tensor(COLOUR_CORRELATION_SQRT, dtype=torch.float64)
    m = m / torch.tensor([INV_COLOUR_SCALE, 1.0, 1.0], dtype=torch.float64)
    return (m / m.norm(dim=0).max()).float()


def validate_size(size: int, num_scales: int) -> None:
    """Raise ``ValueError`` unless a ``size`` px square image fits a net with ``num_scales`` levels.

    Every level halves the image, so ``size`` must be divisible by ``2**num_scales`` and the
    deepest level must keep at least ``MIN_DEEPEST_SIZE`` pixels.
    """
    if num_scales < 1:
        raise ValueError(f"num_scales must be at least 1, got {num_scales}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    factor = 2**num_scales
    if size % factor or size // factor < MIN_DEEPEST_SIZE:
        fitting = [n for n in range(1, num_scales) if size % 2**n == 0 and size // 2**n >= MIN_DEEPEST_SIZE]
        hint = f"at most num_scales={fitting[-1]} fits" if fitting else "no num_scales fits it"
        if size % factor:
            reason = f"{size} px cannot be halved {num_scales} times (it is not a multiple of 2**{num_scales}={factor})"
        else:
            reason = (
                f"halving {size} px {num_scales} times leaves {size // factor} px at the deepest level, "
                f"which needs at least {MIN_DEEPEST_SIZE}"
            )
        raise ValueError(f"num_scales={num_scales} does not fit size={size}: {reason}; {hint}")


class DecorrelatedColoursToRGB(nn.Module):
    """``[b, 3, h, w]`` decorrelated colours -> RGB logits, by the fixed ``colour_matrix()``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", colour_matrix()[:, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype))


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` in its input's dtype, under autocast too.

    Autocast runs reflection padding in float32 on the CPU, so in bf16 each padded 3x3 conv's
    input went to float32 and back: two copies of the level's largest tensor, and padding at
    twice the bytes. Padding copies values, so it is exact in any dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.amp.is_autocast_available(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class DeformableConv3x3(nn.Module):
    """A reflect-padded 3x3 ``DeformConv2d`` whose sampling offsets are predicted from its input.

    ``offset_type='1x1'`` predicts them with a 1x1 conv of the unpadded input (stable),
    ``'full'`` with a 3x3 conv of the padded input (more expressive, wants about lr/10). The
    offset branch starts at zero, so an untrained layer is an ordinary 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, offset_type: str):
        super().__init__()
        groups = OFFSET_GROUPS
        while in_channels % groups:
            groups -= 1
        self.offset_type = offset_type
        self.pad = ReflectionPad2d(1)
        self.conv = DeformConv2d(in_channels, out_channels, 3)
        self.offset_branch = Conv2d(in_channels, 2 * groups * 9, 1 if offset_type == "1x1" else 3)
        nn.init.zeros_(self.offset_branch.weight)
        nn.init.zeros_(self.offset_branch.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.pad(x)
        offsets = self.offset_branch(x if self.offset_type == "1x1" else padded)
        if torch.is_autocast_enabled(padded.device.type):
            # torchvision's deform_conv2d has no bf16 kernel on the CPU and autocasts only on
            # CUDA: run it in float32 (its output re-enters autocast at the next layer)
            with torch.autocast(padded.device.type, enabled=False):
                return self.conv(padded.float(), offsets.float())
        return self.conv(padded, offsets)


def conv3x3(in_channels: int, out_channels: int, offset_type: str) -> nn.Module:
    if offset_type == "none":
        return nn.Sequential(ReflectionPad2d(1), Conv2d(in_channels, out_channels, 3))
    return DeformableConv3x3(in_channels, out_channels, offset_type)


def norm_act(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]


class Level(nn.Module):
    """One scale: ``[1, c_in, s, s] -> [1, channels, s, s]``, recursing into ``inner`` at ``s / 2``."""

    def __init__(self, in_channels: int, channels: int, skip_channels: int, offset_type: str, inner: Level | None):
        super().__init__()
        self.skip = nn.Sequential(Conv2d(in_channels, skip_channels, 1), *norm_act(skip_channels))
        self.deeper = nn.Sequential(
            conv3x3(in_channels, channels, offset_type),
            Downsample(),
            *norm_act(channels),
            conv3x3(channels, channels, offset_type),
            *norm_act(channels),
            *([inner] if inner is not None else []),
            Upsample(),
        )
        self.merge = nn.Sequential(
            nn.BatchNorm2d(skip_channels + channels),
            conv3x3(skip_channels + channels, channels, offset_type),
            *norm_act(channels),
            Conv2d(channels, channels, 1),
            *norm_act(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.skip(x), self.deeper(x)], dim=1))


class SkipNet(nn.Module):
    """Noise ``[1, 32, size, size]`` -> image ``[1, 3, size, size]`` in (0, 1)."""

    def __init__(self, num_scales: int, offset_type: str, channels: int = CHANNELS, skip_channels: int = SKIP_CHANNELS):
        super().__init__()
        if offset_type not in OFFSET_TYPES:
            raise ValueError(f"offset_type must be one of {OFFSET_TYPES}, got {offset_type!r}")
        if num_scales < 1:
            raise ValueError(f"num_scales must be at least 1, got {num_scales}")
        self.num_scales = num_scales
        self.offset_type = offset_type
        level = None
        for i in reversed(range(num_scales)):
            level = Level(INPUT_CHANNELS if i == 0 else channels, channels, skip_channels, offset_type, level)
        self.body = level
        self.head = nn.Sequential(Conv2d(channels, 3, 1), DecorrelatedColoursToRGB(), nn.Sigmoid())

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(noise * INPUT_SCALE))


def build_network(
    num_scales: int = 6,
    offset_type: str = "none",
    *,
    seed: int | None = None,
    channels: int = CHANNELS,
    skip_channels: int = SKIP_CHANNELS,
) -> SkipNet:
    """The hq skip net on the CPU, in train mode, its weights drawn from ``seed``.

    With a seed the global RNG is neither used nor disturbed. ``channels``/``skip_channels``
    exist for tests; the visualiser uses 192 and 4.
    """
    if seed is None:
        return SkipNet(num_scales, offset_type, channels, skip_channels).train()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return SkipNet(num_scales, offset_type, channels, skip_channels).train()


def offset_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Parameters of the layers that predict deformable offsets (empty for ``offset_type='none'``)."""
    return [p for m in net.modules() if isinstance(m, DeformableConv3x3) for p in m.offset_branch.parameters()]


def param_groups(net: nn.Module, lr: float, offset_lr_fac: float) -> list[dict]:
    """Two optimiser groups: ``main`` at ``lr`` and ``offsets`` at ``lr * offset_lr_fac``."""
    offsets = offset_parameters(net)
    offset_ids = {id(p) for p in offsets}
    main = [p for p in net.parameters() if id(p) not in offset_ids]
    return [
        {"params": main, "lr": lr, "name": "main"},
        {"params": offsets, "lr": lr * offset_lr_fac, "name": "offsets"},
    ]
