"""The visualiser's inputs, their valid ranges and the seed they start from."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

from .network import OFFSET_TYPES, validate_size

MAX_SEED = 2**32 - 1  # what the visualiser takes: any seed of its random streams
# Drawn seeds, and the seeds a request may give (pipeline.request), stay within 0..100000, so that a
# reported seed can be typed back in.
MAX_DRAWN_SEED = 100_000


def resolve_seed(seed: int) -> int:
    """``seed`` itself, or a freshly drawn one in ``[0, 100000]`` for ``seed == -1``."""
    return secrets.randbelow(MAX_DRAWN_SEED + 1) if seed == -1 else seed


@dataclass(frozen=True)
class DipSettings:
    """Everything that decides the picture, with the original model's defaults and ranges.

    ``size`` is the side of the square image in pixels; ``iterations`` and ``display_freq``
    count optimisation steps; ``seed=-1`` draws a seed (reported in every frame's metrics).
    """

    num_scales: int = 6
    offset_type: str = "none"
    input_noise_strength: float = 0.0
    lr: float = 1e-3
    offset_lr_fac: float = 1.0
    lr_decay: float = 0.995
    param_noise_strength: float = 0.0
    display_freq: int = 25
    iterations: int = 250
    num_cutouts: int = 8
    size: int = 256
    seed: int = -1

    # (low, high), both inclusive
    RANGES = {
        "num_scales": (1, 10),
        "input_noise_strength": (0.0, 1.0),
        "lr": (0.0, 10.0),
        "offset_lr_fac": (0.0, 10.0),
        "lr_decay": (0.0, 1.0),
        "param_noise_strength": (0.0, 1.0),
        "display_freq": (0, 100),
        "iterations": (0, 1000),
        "num_cutouts": (4, 32),
        "size": (8, 1024),
        "seed": (-1, MAX_SEED),
    }

    def validate(self) -> DipSettings:
        """Return ``self`` if every field is valid, else raise ``ValueError`` naming the field."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{field.name} must be an int, got {value!r}")
            if field.type == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if field.name in self.RANGES:
                low, high = self.RANGES[field.name]
                if not low <= value <= high:  # also rejects NaN
                    raise ValueError(f"{field.name} must be in [{low}, {high}], got {value!r}")
        if self.offset_type not in OFFSET_TYPES:
            raise ValueError(f"offset_type must be one of {', '.join(OFFSET_TYPES)}; got {self.offset_type!r}")
        validate_size(self.size, self.num_scales)
        return self

    def replace(self, **changes) -> DipSettings:
        return dataclasses.replace(self, **changes)
