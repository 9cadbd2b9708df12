"""CLIP's view of a picture: open_clip's own preprocessing, without its normalisation."""

from __future__ import annotations

from functools import cache

import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import Compose, Normalize


@cache
def _clip_transform(size: int) -> Compose:
    """open_clip's eval preprocessing (resize the short side, centre crop, to tensor) minus Normalize."""
    steps = image_transform(size, is_train=False).transforms
    return Compose([step for step in steps if not isinstance(step, Normalize)])


def clip_image_tensor(image: Image.Image, clip) -> torch.Tensor:
    """``image`` as CLIP sees it: ``[1, 3, S, S]`` float32 in [0, 1] on ``clip``'s device.

    open_clip's own eval preprocessing for ``clip.image_size`` (bicubic resize of the short side,
    centre crop, RGB), without its normalisation: ``ClipEncoder.embed_image`` normalises, so
    ``clip.embed_image(clip_image_tensor(image, clip))`` is open_clip's
    ``normalize(encode_image(preprocess(image)))``.
    """
    tensor = _clip_transform(int(clip.image_size))(image)
    return tensor.unsqueeze(0).to(device=clip.mean.device, dtype=torch.float32)
