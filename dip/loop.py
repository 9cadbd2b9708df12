"""The optimisation loop: a generator of frames, driven by the caller, owning no I/O.

One step ``k`` (1-based) of ``iterations``:

1. ``ramp = 1 - (k - 1) / iterations``; with input noise, the fixed input becomes
   ``x * cos(phi) + fresh_noise * sin(phi)``, ``phi = min(1, ramp * strength) * pi / 2``.
2. The network renders ``image [1, 3, size, size]`` (autocast in fp16 on CUDA).
3. Cutouts of it go through CLIP; the loss is the mean ``spherical_distance`` to the target
   (with several weighted targets, ``weighted_spherical_loss``: their weighted sum).
4. Backward, a MADGRAD step (momentum 0.9; gradient scaling under fp16).
5. With parameter noise: ``p += randn * group_lr * strength * ramp``.
6. If ``k`` is a display step the frame ``(k, image, metrics)`` is yielded; then every
   group's lr is multiplied by ``lr_decay``.

A frame shows the image rendered in its step, i.e. by the weights after ``k - 1`` updates,
together with that image's loss, so emitting costs no extra forward pass.

With an init image, ``init_steps`` steps come first (``InitFrame``s): each network is fitted to
reproduce the picture (mean squared error of its pixels, MADGRAD at ``lr``, no noise, no CLIP),
as deep-daze primes its network; the CLIP-guided steps then start from the fitted weights.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from madgrad import MADGRAD

from backbone.clip import ClipEncoder
from backbone.hardware import cpu_has_native_bf16, resolve_device

from .cutouts import MakeCutouts
from .loss import spherical_distance, weighted_spherical_loss
from .network import INPUT_CHANNELS, build_network, param_groups
from .settings import DipSettings, resolve_seed

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)
MOMENTUM = 0.9
_STREAMS = ("init", "input", "cutouts", "params")
INIT_STEPS_MAX = 1000


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

    On this project's benchmark CPUs (a Xeon with AMX, a Zen 5 EPYC with AVX512-BF16) bf16
    autocast ran 1.7 to 2.3 times as fast as fp32 with a ViT-B/32-sized CLIP (1.7 on the EPYC
    once its fp32 linears ran on oneDNN), and ended 30 steps within 0.001 to 0.010 of fp32's
    similarity to the target (``dip.bf16_speedup_b32``, ``dip.bf16_similarity_gap``; the target
    is at most 0.02). It needs CLIP's attention to run
    sequence-first (``backbone.clip``): open_clip's batch-first ``nn.MultiheadAttention`` expands
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
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


class BatchFrame(NamedTuple):
    """Pictures optimised together, at one step: ``images [n, 3, size, size]`` float32 in [0, 1]
    on the CPU, and each one's metrics (as ``Frame.metrics``; with several targets also
    ``similarities``, one per target)."""

    step: int
    images: torch.Tensor
    metrics: list[dict[str, float]]


class InitFrame(NamedTuple):
    """A step of the init phase, before the CLIP-guided steps: the pictures ``[n, 3, size, size]``
    (float32 in [0, 1], on the CPU) and each one's mean squared error to the init image."""

    step: int
    images: torch.Tensor
    losses: list[float]


def visualise(
    target: torch.Tensor,
    clip: ClipEncoder,
    settings: DipSettings,
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
    negative: torch.Tensor | None = None,
    negative_weight: float = 0.0,
) -> Iterator[Frame]:
    """Frames of an image optimised so that CLIP sees ``target`` in it.

    ``target``: a CLIP image embedding ``[d]`` or ``[1, d]`` (any norm). ``clip`` must already
    be on ``device`` (default: CLIP's device). ``precision``: ``fp32``, ``bf16`` (autocast) or
    ``fp16`` (autocast with gradient scaling: CUDA's default; on a CPU slow, but it checks
    that path); default per ``default_precision``.
    ``negative`` (``[d]``, e.g. a CLIP text embedding) with ``negative_weight > 0`` makes the
    loss push away from it: ``d(cutout, target)^2 - negative_weight * d(cutout, negative)^2``.
    Everything is checked here, before the first frame is asked for; the work happens as
    frames are drawn. Closing the generator early frees the network and optimiser state.
    """
    target = target.detach().reshape(1, -1) if target.dim() == 1 else target.detach()
    if target.shape != (1, clip.embed_dim):
        shape = list(target.shape)
        raise ValueError(f"target must have shape [{clip.embed_dim}] or [1, {clip.embed_dim}], got {shape}")
    frames = visualise_batch(
        target,
        clip,
        settings,
        [settings.seed],
        device=device,
        precision=precision,
        negative=negative,
        negative_weight=negative_weight,
    )
    return _single(frames)


def _single(frames: Iterator[BatchFrame | InitFrame]) -> Iterator[Frame | InitFrame]:
    try:
        for frame in frames:
            if isinstance(frame, InitFrame):
                yield frame
            else:
                yield Frame(frame.step, frame.images[0], frame.metrics[0])
    finally:
        frames.close()


def visualise_batch(
    targets: torch.Tensor,
    clip: ClipEncoder,
    settings: DipSettings,
    seeds: Sequence[int],
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
    negative: torch.Tensor | None = None,
    negative_weight: float = 0.0,
    weights: Sequence[float] | None = None,
    init_image: torch.Tensor | None = None,
    init_steps: int = 0,
) -> Iterator[BatchFrame | InitFrame]:
    """Several pictures optimised together, one per seed: ``BatchFrame``s on ``visualise``'s steps.

    Picture ``i`` is the run ``visualise(targets[i], clip, settings.replace(seed=seeds[i]))``:
    its own network initialisation, input noise, cutouts and parameter noise, each drawn from
    its own seed's streams. With one target and different seeds that is best-of-N; with equal
    seeds and different targets the pictures share one initialisation and noise and differ only
    by their targets (an interpolation). ``targets``: ``[n, d]``, or ``[d]`` for every seed.

    Each step renders every network, sends all the pictures' cutouts through CLIP in one batch,
    and takes one backward pass over the sum of the losses: each network's gradient is that of
    its own loss, so each optimiser steps as in its own run (up to the rounding of CLIP's
    batched matmuls).

    Several targets per picture: ``targets [n, t, d]`` with ``weights [t]`` (default all 1); the
    loss is ``weighted_spherical_loss``. ``init_image [3, size, size]`` in [0, 1] with
    ``init_steps`` first fits every network to it, yielding ``InitFrame``s on its display steps.
    """
    settings.validate()
    clip_device = next(clip.parameters()).device
    device = clip_device if device is None else resolve_device(device)
    if device != clip_device:
        raise ValueError(f"clip is on {clip_device} but device is {device}; move clip first")
    precision = default_precision(device) if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    low, high = DipSettings.RANGES["seed"]
    if not all(low <= seed <= high for seed in seeds):
        raise ValueError(f"every seed must be between {low} and {high} (-1 draws one), got {seeds}")
    targets = targets.detach()
    if targets.dim() == 1:
        targets = targets.expand(len(seeds), -1)
    if targets.dim() == 2:
        targets = targets[:, None]
    if targets.dim() != 3 or targets.shape[2] != clip.embed_dim or targets.shape[0] != len(seeds):
        raise ValueError(
            f"targets must have shape [{clip.embed_dim}], [{len(seeds)}, {clip.embed_dim}] (one per seed) "
            f"or [{len(seeds)}, t, {clip.embed_dim}] (t weighted targets each), got {list(targets.shape)}"
        )
    weights = [1.0] * targets.shape[1] if weights is None else [float(w) for w in weights]
    if len(weights) != targets.shape[1] or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {targets.shape[1]} finite numbers, one per target, got {weights}")
    init = _checked_init(init_image, init_steps, settings.size, device)
    if not negative_weight >= 0:
        raise ValueError(f"negative_weight must be at least 0, got {negative_weight}")
    if negative is not None:
        negative = negative.detach().reshape(-1)
        if negative.shape != (clip.embed_dim,):
            raise ValueError(f"negative must have shape [{clip.embed_dim}], got {list(negative.shape)}")
        negative = F.normalize(negative.to(device=device, dtype=torch.float32), dim=0)
    targets = F.normalize(targets.to(device=device, dtype=torch.float32), dim=-1)
    seeds = [resolve_seed(seed) for seed in seeds]
    weight = float(negative_weight) if negative is not None else 0.0
    loss_weights = torch.tensor(weights, device=device)
    return _frames(targets, clip, settings, seeds, device, precision, negative, weight, loss_weights, init)


def _checked_init(
    image: torch.Tensor | None, steps: int, size: int, device: torch.device
) -> tuple[torch.Tensor, int] | None:
    """The init image ``[1, 3, size, size]`` on ``device`` and its steps, or None without one."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= INIT_STEPS_MAX:
        raise ValueError(f"init_steps must be an int in [0, {INIT_STEPS_MAX}], got {steps!r}")
    if image is None:
        if steps:
            raise ValueError("init_steps needs an init_image")
        return None
    image = image.detach().reshape(1, *image.shape[-3:]) if image.dim() in (3, 4) else image
    if image.shape != (1, 3, size, size):
        raise ValueError(f"init_image must have shape [3, {size}, {size}], got {list(image.shape)}")
    if not (torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
        raise ValueError("init_image must hold finite values in [0, 1]")
    return image.to(device=device, dtype=torch.float32).contiguous(memory_format=torch.channels_last), steps


class _Run:
    """One picture's network, optimiser, input and random streams."""

    def __init__(self, settings: DipSettings, seed: int, clip: ClipEncoder, device: torch.device):
        streams = stream_seeds(seed)
        self.seed = seed
        # channels-last: the CPU's (oneDNN) and CUDA's convolutions are fastest in NHWC
        net = build_network(settings.num_scales, settings.offset_type, seed=streams["init"])
        self.net = net.to(device, memory_format=torch.channels_last)
        groups = param_groups(self.net, settings.lr, settings.offset_lr_fac)
        self.optimiser = MADGRAD(groups, settings.lr, momentum=MOMENTUM)
        self.input_generator = torch.Generator(device).manual_seed(streams["input"])
        self.param_generator = torch.Generator(device).manual_seed(streams["params"])
        cutout_generator = torch.Generator().manual_seed(streams["cutouts"])
        self.make_cutouts = MakeCutouts(clip.image_size, settings.num_cutouts, cutout_generator)
        shape = (1, INPUT_CHANNELS, settings.size, settings.size)
        net_input = torch.randn(shape, generator=self.input_generator, device=device)
        self.net_input = net_input.contiguous(memory_format=torch.channels_last)

    def input_at(self, ramp: float, strength: float) -> torch.Tensor:
        """The network's input: fixed, or blended with fresh noise while the ramp lasts."""
        if not strength:
            return self.net_input
        phi = min(1.0, ramp * strength) * math.pi / 2
        noise = torch.empty_like(self.net_input).normal_(generator=self.input_generator)
        return self.net_input * math.cos(phi) + noise * math.sin(phi)


def _frames(
    targets: torch.Tensor,
    clip: ClipEncoder,
    settings: DipSettings,
    seeds: list[int],
    device: torch.device,
    precision: str,
    negative: torch.Tensor | None,
    negative_weight: float,
    weights: torch.Tensor,
    init: tuple[torch.Tensor, int] | None,
) -> Iterator[BatchFrame]:
    runs = [_Run(settings, seed, clip, device) for seed in seeds]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = losses = None
    score = dict(negative=negative, negative_weight=negative_weight, weights=weights)
    try:
        if init is not None:
            yield from _fit_init(runs, *init, settings, precision)
        if settings.iterations == 0:
            with torch.no_grad():
                images, losses = _render_and_score(
                    runs, [run.net_input for run in runs], clip, targets, precision, **score
                )
            yield _batch_frame(0, images, losses, clip, targets, negative, settings.lr, seeds)
            return
        for step in range(1, settings.iterations + 1):
            ramp = 1 - (step - 1) / settings.iterations
            images, losses = _step(runs, ramp, settings, scaler, clip, targets, precision, **score)
            if is_display_step(step, settings.iterations, settings.display_freq):
                lr = runs[0].optimiser.param_groups[0]["lr"]
                yield _batch_frame(step, images, losses, clip, targets, negative, lr, seeds)
            _decay_lr(runs, settings.lr_decay)
    except BaseException as error:
        # the frames the error passed through (_step, net(x), backward...) still hold the tensors
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        # A closed or failed generator may be kept alive (by its caller, or a traceback): drop the
        # tensors now. This frame is still running, so clear_frames cannot clear it; the work of a
        # step lives in _step's frame, which it can, and these are the only tensors held here.
        del runs, scaler, images, losses


def _fit_init(
    runs: list[_Run], image: torch.Tensor, steps: int, settings: DipSettings, precision: str
) -> Iterator[InitFrame]:
    """Fit every network to reproduce ``image [1, 3, s, s]`` in ``steps`` steps: mean squared error
    of the pixels, each network's own MADGRAD at ``settings.lr`` (the CLIP phase's optimiser
    starts afresh from the fitted weights). ``InitFrame``s on the display steps."""
    optimisers = [
        MADGRAD(param_groups(run.net, settings.lr, settings.offset_lr_fac), settings.lr, momentum=MOMENTUM)
        for run in runs
    ]
    scaler = torch.amp.GradScaler(image.device.type, enabled=precision == "fp16")
    try:
        for step in range(1, steps + 1):
            with _autocast(image.device, precision):
                images = [run.net(run.net_input).float() for run in runs]
            losses = torch.stack([(picture - image).square().mean() for picture in images])
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            scaler.scale(losses.sum()).backward()
            for optimiser in optimisers:
                scaler.step(optimiser)
            scaler.update()
            if is_display_step(step, steps, settings.display_freq):
                yield InitFrame(step, torch.cat(images).detach().clamp(0, 1).cpu(), losses.tolist())
    finally:
        del optimisers, scaler


def _step(
    runs: list[_Run],
    ramp: float,
    settings: DipSettings,
    scaler: torch.amp.GradScaler,
    clip: ClipEncoder,
    targets: torch.Tensor,
    precision: str,
    negative: torch.Tensor | None,
    negative_weight: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step of every picture: render, score, backward, MADGRAD, parameter noise.

    Returns the pictures rendered in it and their losses (``_render_and_score``).
    """
    inputs = [run.input_at(ramp, settings.input_noise_strength) for run in runs]
    images, losses = _render_and_score(runs, inputs, clip, targets, precision, negative, negative_weight, weights)
    for run in runs:
        run.optimiser.zero_grad(set_to_none=True)
    scaler.scale(losses.sum()).backward()
    for run in runs:
        scaler.step(run.optimiser)
    scaler.update()
    if settings.param_noise_strength:
        for run in runs:
            _add_param_noise(run.optimiser, settings.param_noise_strength * ramp, run.param_generator)
    return images, losses


def _decay_lr(runs: list[_Run], lr_decay: float) -> None:
    for run in runs:
        for group in run.optimiser.param_groups:
            group["lr"] *= lr_decay


def _render_and_score(
    runs: list[_Run],
    inputs: list[torch.Tensor],
    clip: ClipEncoder,
    targets: torch.Tensor,
    precision: str,
    negative: torch.Tensor | None = None,
    negative_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pictures ``[n, 3, s, s]`` (float32) and each one's mean loss over its cutouts ``[n]``.

    ``targets``: ``[n, d]``, or ``[n, t, d]`` with ``weights [t]`` (default all 1). Every
    picture's cutouts go through CLIP in one batch.
    """
    if targets.dim() == 2:
        targets = targets[:, None]
    if weights is None:
        weights = torch.ones(targets.shape[1], device=targets.device)
    with _autocast(inputs[0].device, precision):
        images = [run.net(x).float().contiguous() for run, x in zip(runs, inputs, strict=True)]  # plain for cutouts
        cutouts = torch.cat([run.make_cutouts(image) for run, image in zip(runs, images, strict=True)])
        embeds = clip.encode_image(clip.normalize(cutouts)).float()
    embeds = embeds.view(len(runs), -1, embeds.shape[-1])  # [n, cutouts, d]
    losses = weighted_spherical_loss(embeds, targets, weights)
    if negative is not None and negative_weight:
        losses = losses - negative_weight * spherical_distance(embeds, negative).mean(dim=1)
    return torch.cat(images), losses


@torch.no_grad()
def _batch_frame(
    step: int,
    images: torch.Tensor,
    losses: torch.Tensor,
    clip: ClipEncoder,
    targets: torch.Tensor,
    negative: torch.Tensor | None,
    lr: float,
    seeds: list[int],
) -> BatchFrame:
    # the loop's host-device synchronisations (.item(), .tolist(), .cpu()) happen here, apart from
    # fp16's: the gradient scaler reads each optimiser's inf/NaN check to skip or take the step
    pictures = images.detach().clamp(0, 1)
    embeds = clip.embed_image(pictures)
    similarities = (embeds[:, None] * targets).sum(dim=-1).tolist()  # [n, t]
    to_negative = (embeds @ negative).tolist() if negative is not None else None
    metrics = []
    for i, loss in enumerate(losses.tolist()):
        metric = {"loss": loss, "similarity": similarities[i][0], "lr": lr, "seed": seeds[i]}
        if len(similarities[i]) > 1:
            metric["similarities"] = similarities[i]
        if to_negative is not None:
            metric["similarity_to_negative"] = to_negative[i]
        metrics.append(metric)
    return BatchFrame(step, pictures.cpu(), metrics)


@torch.no_grad()
def _add_param_noise(optimiser: torch.optim.Optimizer, strength: float, generator: torch.Generator) -> None:
    for group in optimiser.param_groups:
        for param in group["params"]:
            noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
            param.add_(noise, alpha=group["lr"] * strength)
