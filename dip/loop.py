"""The optimisation loop: a generator of frames, driven by the caller, owning no I/O.

One step ``k`` (1-based) of ``iterations``:

1. ``ramp = 1 - (k - 1) / iterations``; with input noise, the fixed input becomes
   ``x * cos(phi) + fresh_noise * sin(phi)``, ``phi = min(1, ramp * strength) * pi / 2``.
2. The network renders ``image [1, 3, size, size]`` (autocast in fp16 on CUDA).
3. Cutouts of it go through CLIP; the loss is the mean ``spherical_distance`` to the target.
4. Backward, a MADGRAD step (momentum 0.9; gradient scaling under fp16).
5. With parameter noise: ``p += randn * group_lr * strength * ramp``.
6. If ``k`` is a display step the frame ``(k, image, metrics)`` is yielded; then every
   group's lr is multiplied by ``lr_decay``.

A frame shows the image rendered in its step, i.e. by the weights after ``k - 1`` updates,
together with that image's loss, so emitting costs no extra forward pass.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from madgrad import MADGRAD
from torch import nn

from prior.clip import ClipEncoder
from prior.hardware import cpu_has_native_bf16

from .cutouts import MakeCutouts
from .loss import spherical_distance
from .network import INPUT_CHANNELS, build_network, param_groups
from .settings import DipSettings, resolve_seed

PRECISIONS = ("fp32", "bf16", "fp16")
MOMENTUM = 0.9
_STREAMS = ("init", "input", "cutouts", "params")


class Frame(NamedTuple):
    """One emitted picture: ``image [3, size, size]`` float32 in [0, 1] on the CPU.

    ``metrics``: ``loss`` (mean over the cutouts of this step), ``similarity`` (cosine of
    the whole image's CLIP embedding to the target), ``lr`` (of this step), ``seed``.
    """

    step: int
    image: torch.Tensor
    metrics: dict[str, float]


def is_display_step(step: int, iterations: int, display_freq: int) -> bool:
    """Whether ``step`` is emitted: every ``display_freq`` steps and always the last one.

    ``display_freq=0`` emits only the last step; ``iterations=0`` emits only step 0, the
    untrained network's image.
    """
    if step == iterations:
        return True
    return display_freq > 0 and step > 0 and step % display_freq == 0


def default_precision(device: torch.device) -> str:
    """fp16 autocast with gradient scaling on CUDA; bf16 autocast on a CPU with native bf16; else fp32.

    On this project's benchmark CPU (AMX) bf16 autocast ran 2.3 times as fast as fp32 with a
    ViT-B/32-sized CLIP, and ended 30 steps within 0.006 of fp32's similarity to the target
    (``dip.bf16_speedup_b32``, ``dip.bf16_similarity_gap``). It needs CLIP's attention to run
    sequence-first (``prior.clip``): open_clip's batch-first ``nn.MultiheadAttention`` expands
    its weights per token while training, which made CLIP's backward four times slower in bf16.
    """
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def stream_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each random stream, all derived from ``seed``.

    Separate streams keep, say, the crop boxes unchanged when input noise is switched on.
    """
    draws = torch.randint(2**62, (len(_STREAMS),), generator=torch.Generator().manual_seed(seed))
    return dict(zip(_STREAMS, draws.tolist(), strict=True))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def visualise(
    target: torch.Tensor,
    clip: ClipEncoder,
    settings: DipSettings,
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
) -> Iterator[Frame]:
    """Frames of an image optimised so that CLIP sees ``target`` in it.

    ``target``: a CLIP image embedding ``[d]`` or ``[1, d]`` (any norm). ``clip`` must already
    be on ``device`` (default: CLIP's device). ``precision``: ``fp32``, ``bf16`` (autocast) or
    ``fp16`` (CUDA only, autocast with gradient scaling); default per ``default_precision``.
    Everything is checked here, before the first frame is asked for; the work happens as
    frames are drawn. Closing the generator early frees the network and optimiser state.
    """
    settings.validate()
    clip_device = next(clip.parameters()).device
    device = clip_device if device is None else torch.device(device)
    if device != clip_device:
        raise ValueError(f"clip is on {clip_device} but device is {device}; move clip first")
    precision = default_precision(device) if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32'")
    target = target.detach().reshape(1, -1) if target.dim() == 1 else target.detach()
    if target.shape != (1, clip.embed_dim):
        shape = list(target.shape)
        raise ValueError(f"target must have shape [{clip.embed_dim}] or [1, {clip.embed_dim}], got {shape}")
    target = F.normalize(target.to(device=device, dtype=torch.float32), dim=-1)
    settings = settings.replace(seed=resolve_seed(settings.seed))
    return _frames(target, clip, settings, device, precision)


def _frames(
    target: torch.Tensor, clip: ClipEncoder, settings: DipSettings, device: torch.device, precision: str
) -> Iterator[Frame]:
    seeds = stream_seeds(settings.seed)
    # channels-last: the CPU's (oneDNN) and CUDA's convolutions are fastest in NHWC
    net = build_network(settings.num_scales, settings.offset_type, seed=seeds["init"])
    net = net.to(device, memory_format=torch.channels_last)
    optimiser = MADGRAD(param_groups(net, settings.lr, settings.offset_lr_fac), settings.lr, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    input_generator = torch.Generator(device).manual_seed(seeds["input"])
    param_generator = torch.Generator(device).manual_seed(seeds["params"])
    make_cutouts = MakeCutouts(clip.image_size, settings.num_cutouts, torch.Generator().manual_seed(seeds["cutouts"]))
    shape = (1, INPUT_CHANNELS, settings.size, settings.size)
    net_input = torch.randn(shape, generator=input_generator, device=device)
    net_input = net_input.contiguous(memory_format=torch.channels_last)
    image = loss = x = noise = None
    try:
        if settings.iterations == 0:
            with torch.no_grad():
                image, loss = _render_and_score(net, net_input, make_cutouts, clip, target, precision)
            yield _frame(0, image, loss, clip, target, settings.lr, settings.seed)
            return
        for step in range(1, settings.iterations + 1):
            ramp = 1 - (step - 1) / settings.iterations
            x = net_input
            if settings.input_noise_strength:
                phi = min(1.0, ramp * settings.input_noise_strength) * math.pi / 2
                noise = torch.empty_like(net_input).normal_(generator=input_generator)
                x = net_input * math.cos(phi) + noise * math.sin(phi)
            image, loss = _render_and_score(net, x, make_cutouts, clip, target, precision)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            if settings.param_noise_strength:
                _add_param_noise(optimiser, settings.param_noise_strength * ramp, param_generator)
            if is_display_step(step, settings.iterations, settings.display_freq):
                yield _frame(step, image, loss, clip, target, optimiser.param_groups[0]["lr"], settings.seed)
            for group in optimiser.param_groups:
                group["lr"] *= settings.lr_decay
    except BaseException as error:
        # the frames the error passed through (net(x), backward...) still hold the tensors
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        # a closed or failed generator may be kept alive (by its caller, or a traceback): drop the tensors now
        del net, optimiser, scaler, net_input, make_cutouts, image, loss, x, noise


def _render_and_score(
    net: nn.Module,
    x: torch.Tensor,
    make_cutouts: MakeCutouts,
    clip: ClipEncoder,
    target: torch.Tensor,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image ``[1, 3, s, s]`` (float32) and the mean loss of its cutouts (a 0-dim tensor)."""
    with _autocast(x.device, precision):
        image = net(x).float().contiguous()  # 3 channels: the cutouts' matmuls want it plain
        cutouts = clip.normalize(make_cutouts(image))
        embeds = clip.encode_image(cutouts)
    return image, spherical_distance(embeds.float(), target).mean()


@torch.no_grad()
def _frame(
    step: int, image: torch.Tensor, loss: torch.Tensor, clip: ClipEncoder, target: torch.Tensor, lr: float, seed: int
) -> Frame:
    # the only host-device synchronisations of the loop (.item(), .cpu()) happen here
    picture = image.detach().clamp(0, 1)
    similarity = (clip.embed_image(picture) @ target.T).item()
    metrics = {"loss": loss.item(), "similarity": similarity, "lr": lr, "seed": seed}
    return Frame(step, picture[0].cpu(), metrics)


@torch.no_grad()
def _add_param_noise(optimiser: torch.optim.Optimizer, strength: float, generator: torch.Generator) -> None:
    for group in optimiser.param_groups:
        for param in group["params"]:
            noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
            param.add_(noise, alpha=group["lr"] * strength)
