"""Weights directories the tests and benchmarks generate: random weights in the real key layout."""

from __future__ import annotations

from pathlib import Path

import torch

from prior.checkpoint import save_safetensors
from prior.weights import CLIP_FILE, convert, converted_name

from .oracles import LAION_PRIOR, openai_clip_model, oracle_prior

# The text tower of OpenAI's ViT-L/14 (width 768, 12 heads, 12 layers, 768-d embeddings); its image
# tower stays the small one: embedding captions never runs it.
VIT_L14_TEXT = dict(embed_dim=768, transformer_width=768, transformer_heads=12, transformer_layers=12)


def write_laion_size_weights(directory: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A weights directory (``--weights``/``DIDP_WEIGHTS``) holding a random prior of LAION's
    configuration, saved as LAION's fp16 file is and converted for ``dtype`` as a first start
    converts it, and a random OpenAI-format CLIP with ViT-L/14's text tower. About 1 GB."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "prior_ema_fp16.pth"
    oracle = oracle_prior(LAION_PRIOR, seed=seed)
    torch.save({k: v.half() for k, v in oracle.state_dict().items()}, source)
    del oracle
    convert(source, directory / converted_name(dtype), dtype)
    source.unlink()
    save_safetensors(openai_clip_model(seed=seed, **VIT_L14_TEXT).state_dict(), directory / CLIP_FILE)
    return directory
