"""Configurations of the prior and its CLIP, kept as data in ``prior/configs/*.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class PriorConfig:
    """The dalle2-pytorch 0.11.5 ``DiffusionPriorNetwork`` hyper-parameters used for inference.

    One time, one image and one text-embedding token (``num_*_embeds=1``), rotary embeddings
    on ``min(32, dim_head)`` dimensions, final LayerNorm and bias-free projection.
    """

    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    normformer: bool = True
    num_timesteps: int = 1000
    cond_drop_prob: float = 0.1
    text_len: int = 77

    @property
    def rotary_dim(self) -> int:
        return min(32, self.dim_head)

    @property
    def image_embed_scale(self) -> float:
        """Image embeddings are diffused at this scale (``sqrt(dim)``) and divided by it at the end."""
        return self.dim**0.5

    @property
    def can_guide(self) -> bool:
        """Classifier-free guidance needs a model trained with condition dropout."""
        return self.cond_drop_prob > 0

    @classmethod
    def from_dict(cls, data: dict) -> PriorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown prior config keys: {sorted(unknown)}")
        return cls(**data)


def named_config(name: str) -> dict:
    """The raw JSON of a named configuration (``laion``, ``tiny``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        choices = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown configuration {name!r}; choose one of {choices}")
    return json.loads(path.read_text())
