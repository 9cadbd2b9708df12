"""Many captions in one pass: CLIP text embeddings and the prior's image embeddings, batched.

CLIP encodes the batch in one call; the prior samples ``captions x candidates`` rows together,
its prefix cache holding every caption's 78 tokens, so each diffusion step runs 3 tokens per row
for the whole batch. Each caption draws its noise from its own generator, seeded by ``row_seed``
from the job's seed and the row's id: a caption's embedding is the same whatever batch, worker
or order it lands in, and equal to a single request's with that seed (up to the rounding of the
batched matmuls).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dip.settings import MAX_DRAWN_SEED
from prior.factory import Models
from prior.sampling import DEFAULT_STEPS, sample_image_embeds


def row_seed(job_seed: int, row_id: object) -> int:
    """The seed of one row of a job: a hash of the job's seed and the row's id, in the range a
    request's ``seed`` takes (0..100000), so that one row can be reproduced as a single request."""
    digest = hashlib.sha256(f"{int(job_seed)}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_DRAWN_SEED + 1)


@dataclass(frozen=True)
class PriorSettings:
    """How the prior samples: candidates per caption (the one closest to its text is kept),
    classifier-free guidance, sampling steps, and a caption guidance steers away from."""

    candidates: int = 2
    guidance_scale: float = 1.0
    prior_steps: int = DEFAULT_STEPS
    negative_prompt: str | None = None


@dataclass
class CaptionEmbeddings:
    """Per caption: CLIP's text embedding and the prior's image embedding (``[b, d]`` float32,
    l2-normalised on the CPU), the chosen candidate's cosine to the text, and whether the caption
    was cut at CLIP's 77 tokens."""

    text: torch.Tensor
    image: torch.Tensor
    similarity: torch.Tensor  # [b]
    truncated: list[bool]


@torch.inference_mode()
def embed_captions(
    models: Models, captions: Sequence[str], seeds: Sequence[int], settings: PriorSettings = PriorSettings()
) -> CaptionEmbeddings:
    """Embed ``captions``, caption ``i`` sampled with ``seeds[i]``."""
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds: give one seed per caption")
    if not captions:
        raise ValueError("no captions to embed")
    clip, prior = models.clip, models.prior
    device = clip.mean.device
    tokens = clip.tokenize(list(captions))
    text = clip.encode_text(tokens.ids.to(device))
    negative = None
    if settings.negative_prompt:
        negative = clip.encode_text(clip.tokenize(settings.negative_prompt).ids.to(device))
    generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
    sample = sample_image_embeds(
        prior.net,
        prior.schedule,
        text,
        generators,
        candidates=settings.candidates,
        steps=settings.prior_steps,
        cond_scale=settings.guidance_scale,
        negative=negative,
    )
    chosen = sample.similarities.gather(1, sample.best[:, None])[:, 0]
    return CaptionEmbeddings(
        text.embed.float().cpu(), F.normalize(sample.image_embeds.float(), dim=-1).cpu(), chosen.cpu(), tokens.truncated
    )
