"""Random square cutouts of an image, resized to CLIP's input size and augmented.

All cutouts are cropped and resized in one batched step: an antialiased bicubic resize of a
crop is linear and separable, ``cutout = Ry @ image @ Rx^T`` with ``Ry, Rx: [S, side]``
holding the resize weights at the crop's rows/columns, so the whole batch is two batched
matmuls, with the same weights as ``F.interpolate(crop, mode="bicubic", antialias=True)``.
"""

from __future__ import annotations

from contextlib import nullcontext

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

CUT_SIZE_MEAN = 0.8  # random cutout sides are drawn as short_side * N(0.8, 0.3)
CUT_SIZE_STD = 0.3
_CUBIC_A = -0.5  # PyTorch's antialiased bicubic uses the a = -0.5 (Keys) cubic


def _cubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    near = ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _CUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(side: int, offsets: torch.Tensor, sizes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Antialiased bicubic resize matrices of 1-D crops, ``[n, out_size, side]`` float32.

    Row ``o`` of matrix ``i`` weights the input pixels ``offsets[i] .. offsets[i] + sizes[i] - 1``
    (int tensors ``[n]``) to give output pixel ``o``. It follows PyTorch's antialiased bicubic
    (the kernel widened by the scale when shrinking, the taps clipped to the crop and the
    weights renormalised), so ``W @ x`` equals ``F.interpolate`` of the crop. Only the few taps
    in each row's support are evaluated, then scattered into place.
    """
    sizes = sizes.to(torch.float64)[:, None, None]
    scale = sizes / out_size
    stretch = scale.clamp(min=1.0)  # shrinking widens the kernel: that is the antialiasing
    support = 2.0 * stretch
    centre = scale * (torch.arange(out_size, dtype=torch.float64)[None, :, None] + 0.5)
    first = torch.floor(centre - support + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(centre + support + 0.5), sizes)
    taps = first + torch.arange(int(2 * support.max().item()) + 2, dtype=torch.float64)  # [n, out, k]
    weights = torch.where(taps < end, _cubic((taps - centre + 0.5) / stretch), 0.0)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    columns = (taps.clamp(max=sizes - 1).long() + offsets[:, None, None]).clamp(max=side - 1)
    matrix = torch.zeros(len(offsets), out_size, side, dtype=torch.float64)
    return matrix.scatter_add_(2, columns, weights).float()


def crop_and_resize(
    image: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, sizes: torch.Tensor, out_size: int
) -> torch.Tensor:
    """Square crops of ``image [1, c, h, w]`` resized to ``[n, c, out_size, out_size]``.

    Crop ``i`` has side ``sizes[i]`` and top-left corner ``(offsets_y[i], offsets_x[i])``, all
    int tensors ``[n]`` with the crop inside the image. Differentiable in ``image``.
    """
    # built on the CPU; non_blocking keeps the copy to a GPU from waiting for the GPU's queue
    rows = resize_weights(image.shape[-2], offsets_y, sizes, out_size).to(image.device, image.dtype, non_blocking=True)
    cols = resize_weights(image.shape[-1], offsets_x, sizes, out_size).to(image.device, image.dtype, non_blocking=True)
    # [n, 1, S, h] @ [1, c, h, w] @ [n, 1, w, S] -> [n, c, S, S]
    return rows[:, None] @ image @ cols[:, None].transpose(-1, -2)


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Centre ``image [b, c, h, w]`` on a square of its long side filled with its mean colour."""
    h, w = image.shape[-2:]
    if h == w:
        return image
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pads = (left, side - w - left, top, side - h - top)
    inside = F.pad(torch.ones_like(image[:, :1]), pads)
    return F.pad(image, pads) + (1 - inside) * image.mean(dim=(2, 3), keepdim=True)


def augmentations() -> nn.Sequential:
    """The random augmentations of the original, applied independently to each cutout."""
    return nn.Sequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=15, translate=(0.1, 0.1), p=0.8, padding_mode="border", resample="bilinear"),
        K.RandomPerspective(0.4, p=0.7, resample="bilinear"),
        K.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, p=0.7),
        K.RandomGrayscale(p=0.15),
    )


class MakeCutouts(nn.Module):
    """``image [1, 3, h, w]`` in [0, 1] -> ``num_cutouts`` augmented cutouts ``[n, 3, S, S]``.

    The last ``num_cutouts // 4`` cutouts are the whole (square-padded) image; the others have
    side ``clamp(int(short * N(0.8, 0.3)), min(short, S), long)`` at a uniform random position.
    Every random draw comes from ``generator`` (a CPU ``torch.Generator``): the crop boxes
    directly, kornia's augmentations from a per-call seed under ``torch.random.fork_rng``,
    because kornia samples from the global RNG. Global RNG state is left untouched.
    """

    def __init__(self, cut_size: int, num_cutouts: int, generator: torch.Generator, augment: bool = True):
        super().__init__()
        if num_cutouts < 1:
            raise ValueError(f"num_cutouts must be at least 1, got {num_cutouts}")
        self.cut_size = cut_size
        self.num_cutouts = num_cutouts
        self.generator = generator
        self.augment = augmentations() if augment else None

    def boxes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``(offsets_y, offsets_x, sizes)``, int64 ``[n]``, in the square of side ``max(h, w)``."""
        n, n_whole = self.num_cutouts, self.num_cutouts // 4
        short, side = min(height, width), max(height, width)
        normal = torch.randn(n - n_whole, generator=self.generator) * CUT_SIZE_STD + CUT_SIZE_MEAN
        random_sizes = (short * normal).long().clamp(min(short, self.cut_size), side)  # .long() truncates like int()
        sizes = torch.cat([random_sizes, torch.full((n_whole,), side)])
        uniform = torch.rand(2, n, generator=self.generator)
        offsets = (uniform * (side - sizes + 1)).long()
        return offsets[0], offsets[1], sizes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        offsets_y, offsets_x, sizes = self.boxes(*image.shape[-2:])
        cutouts = crop_and_resize(pad_to_square(image), offsets_y, offsets_x, sizes, self.cut_size)
        if self.augment is None:
            return cutouts
        seed = int(torch.randint(2**62, (), generator=self.generator))
        precision = nullcontext()
        if cutouts.dtype == torch.float16:
            # fp16 autocast (CUDA): the colour jitter's RGB -> HSV divides by small channel
            # differences, and its backward overflows fp16 into NaN gradients that make the gradient
            # scaler skip steps. The augmentations (colour, flips, small warps) are cheap: run them in float32.
            cutouts = cutouts.float()
            precision = torch.autocast(cutouts.device.type, enabled=False)
        with torch.random.fork_rng(devices=[]), precision:
            torch.default_generator.manual_seed(seed)
            return self.augment(cutouts)
