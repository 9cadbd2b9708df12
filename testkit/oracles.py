"""Oracles: dalle2-pytorch 0.11.5's ``DiffusionPrior`` and clip-anytorch's (OpenAI's) ``CLIP``, with random
weights, in the configurations the tests and benchmarks compare against."""

from __future__ import annotations

import warnings

import torch

# Small but complete: several heads, rotary on 32 of 64 head dimensions, normformer.
SMALL_PRIOR = dict(dim=64, depth=2, dim_head=64, heads=2, ff_mult=2)
LAION_PRIOR = dict(dim=768, depth=24, dim_head=64, heads=32, ff_mult=4)
# A small OpenAI-format CLIP: embed 64, ViT 224/32 width 64 x2, text width 64 x2.
SMALL_CLIP = dict(
    embed_dim=64,
    image_resolution=224,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)


def oracle_prior(config: dict, clip=None, seed: int = 0):
    """A dalle2-pytorch 0.11.5 ``DiffusionPrior`` with the LAION settings and random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle2_pytorch.dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    torch.manual_seed(seed)
    net = DiffusionPriorNetwork(
        **config,
        normformer=True,
        attn_dropout=0.05,
        ff_dropout=0.05,
        num_timesteps=1000,
        num_time_embeds=1,
        num_image_embeds=1,
        num_text_embeds=1,
    )
    return DiffusionPrior(
        net=net,
        clip=clip,
        image_embed_dim=config["dim"],
        timesteps=1000,
        cond_drop_prob=0.1,
        loss_type="l2",
        condition_on_text_encodings=True,
    ).eval()


def openai_clip_model(seed: int = 0, **overrides):
    """clip-anytorch's ``CLIP`` (the OpenAI model class) with random fp32 weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**{**SMALL_CLIP, **overrides}).eval()
    return model
