"""Sampling CLIP image embeddings from the prior: plain functions, explicit generators.

- ``sample_ddpm``: 0.11.5's ancestral loop over every timestep (the parity path).
- ``sample_ddim``: strided DDIM with ``eta`` (1 = ancestral), 64 steps by default as in unCLIP.
- Guidance is done as intended: ``uncond + (cond - uncond) * cond_scale`` with both branches in
  one batched forward. 0.11.5 instead zeroes the caller's text mask on its first unconditional
  pass, so from its second step on both of its branches ignore the text encodings.
- A negative caption may take the unconditional branch's place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backbone.clip import TextEncoding

from .model import PrefixCache, PriorNetwork
from .schedule import NoiseSchedule, strided_timesteps

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
ProgressCallback = Callable[[int, int], None]
# One generator for every row, or one per caption: each caption's rows (its candidates) then
# draw their noise from its own, so that a caption's embedding does not depend on the captions
# it is batched with, and equals a single caption's sampled with the same seed.
Generators = torch.Generator | Sequence[torch.Generator]

DEFAULT_STEPS = 64


@dataclass
class PriorSample:
    """The chosen candidate per caption and what the choice was based on (all float32)."""

    image_embeds: torch.Tensor  # [b, d] at unit scale (not l2-normalised)
    candidates: torch.Tensor  # [b, c, d]
    similarities: torch.Tensor  # [b, c] cosine similarity of each candidate to the text embedding
    best: torch.Tensor  # [b] index of the chosen candidate


def make_denoiser(
    net: PriorNetwork,
    text: TextEncoding,
    candidates: int,
    cond_scale: float,
    negative: TextEncoding | None = None,
) -> Denoiser:
    """``x0(x_t [b*c, d], t)`` with the text prefix computed once (``b`` captions, ``c`` each).

    With guidance (``cond_scale != 1``) the second branch is the model's learned "no caption"
    (every text key hidden, as in training with condition dropout), or, given ``negative``
    (one caption, or one per caption), that caption: guidance then steers away from it, as
    Kandinsky's prior does with a negative prompt. At ``cond_scale == 1`` there is no second
    branch and ``negative`` has no effect.
    """
    b = text.embed.shape[0]
    keep = torch.ones(b, dtype=torch.bool, device=text.embed.device)
    cache = net.encode_prefix(text.embed, text.encodings, text.mask, keep).repeat_interleave(candidates)
    guided = cond_scale != 1.0
    if guided:
        if not net.config.can_guide:
            raise ValueError("this prior was trained without condition dropout: cond_scale must be 1")
        if negative is None:
            uncond = net.drop_text(cache)
        else:
            if negative.embed.shape[0] not in (1, b):
                raise ValueError(f"negative holds {negative.embed.shape[0]} captions; give 1 or {b}")
            n = negative.embed.shape[0]
            uncond = net.encode_prefix(negative.embed, negative.encodings, negative.mask, keep[:n])
            uncond = uncond.repeat_interleave(candidates * b // n)
        cache = PrefixCache.cat([cache, uncond])
    times = {}

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        rows = x.shape[0] * (2 if guided else 1)
        if t not in times:
            times.clear()
            times[t] = torch.full((rows,), t, dtype=torch.long, device=x.device)
        pred = net.step(torch.cat((x, x)) if guided else x, times[t], cache)
        if not guided:
            return pred
        cond, uncond = pred.chunk(2)
        return uncond + (cond - uncond) * cond_scale

    return denoise


def randn(shape: tuple[int, int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise ``[rows, d]``; with one generator per caption, its rows from its own."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    rows, rest = divmod(shape[0], len(generator))
    if rest:
        raise ValueError(f"{shape[0]} rows cannot be shared by {len(generator)} generators")
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, device=device) for g in generator])


def sample_ddpm(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int],
    generator: Generators,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """0.11.5's ``p_sample_loop``: ancestral sampling over all timesteps, noise drawn in its order."""
    device = schedule.betas.device
    x = randn(shape, generator, device)
    total = schedule.num_timesteps
    for i, t in enumerate(reversed(range(total))):
        x0 = denoise(x, t)
        mean = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x
        noise = randn(shape, generator, device)
        nonzero = float(t != 0)
        x = mean + nonzero * (0.5 * schedule.posterior_log_variance_clipped[t]).exp() * noise
        if callback is not None:
            callback(i + 1, total)
    return x


def sample_ddim(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int],
    generator: Generators,
    steps: int = DEFAULT_STEPS,
    eta: float = 1.0,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """DDIM over ``steps`` strided timesteps with an x0-predicting model.

    ``eta=1`` adds the ancestral amount of fresh noise, ``eta=0`` is deterministic after the
    initial noise.
    """
    device = schedule.betas.device
    ac = schedule.exact_alphas_cumprod()
    timesteps = strided_timesteps(schedule.num_timesteps, steps)
    x = randn(shape, generator, device)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t = float(ac[t])
        a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
        x0 = denoise(x, t)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(shape, generator, device)
        if callback is not None:
            callback(i + 1, len(timesteps))
    return x


def rank_candidates(text_embed: torch.Tensor, image_embeds: torch.Tensor) -> PriorSample:
    """Keep, per caption, the candidate most similar to its text embedding (``[b, c, d]`` in)."""
    similarities = torch.einsum("bd,bcd->bc", F.normalize(text_embed, dim=-1), F.normalize(image_embeds, dim=-1))
    best = similarities.argmax(dim=1)
    chosen = image_embeds[torch.arange(image_embeds.shape[0], device=best.device), best]
    return PriorSample(chosen, image_embeds, similarities, best)


@torch.inference_mode()
def sample_image_embeds(
    net: PriorNetwork,
    schedule: NoiseSchedule,
    text: TextEncoding,
    generator: Generators,
    *,
    candidates: int = 2,
    steps: int | None = DEFAULT_STEPS,
    cond_scale: float = 1.0,
    eta: float = 1.0,
    negative: TextEncoding | None = None,
    callback: ProgressCallback | None = None,
) -> PriorSample:
    """CLIP image embeddings for captions already encoded by CLIP.

    ``steps=None`` (or all timesteps) runs 0.11.5's ancestral loop; fewer steps run DDIM.
    ``candidates`` samples per caption are drawn and the one closest to the text kept.
    ``negative``: a caption that guidance steers away from (see ``make_denoiser``).
    ``generator``: one for the whole batch, or one per caption (``Generators``).
    """
    b, dim = text.embed.shape
    shape = (b * candidates, dim)
    denoise = make_denoiser(net, text, candidates, cond_scale, negative)
    if steps is None or steps == schedule.num_timesteps:
        x = sample_ddpm(denoise, schedule, shape, generator, callback)
    else:
        x = sample_ddim(denoise, schedule, shape, generator, steps, eta, callback)
    image_embeds = (x / net.config.image_embed_scale).view(b, candidates, dim)
    return rank_candidates(text.embed, image_embeds)
