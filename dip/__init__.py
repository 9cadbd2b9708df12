"""Deep-image-prior visualiser: turn a target CLIP image embedding into an image.

``visualise(target, clip, DipSettings(...))`` yields ``Frame(step, image, metrics)`` as it
optimises the hq skip net (``network``) against CLIP's view (``cutouts``) of its output;
``visualise_batch`` optimises several pictures (seeds, targets) together.
"""

from .cutouts import MakeCutouts, crop_and_resize
from .loop import (
    PRECISIONS,
    BatchFrame,
    Frame,
    InitFrame,
    default_precision,
    is_display_step,
    visualise,
    visualise_batch,
)
from .loss import spherical_distance, weighted_spherical_loss
from .network import OFFSET_TYPES, SkipNet, build_network, param_groups, validate_size
from .settings import DipSettings, resolve_seed

__all__ = [
    "OFFSET_TYPES",
    "PRECISIONS",
    "BatchFrame",
    "DipSettings",
    "Frame",
    "InitFrame",
    "MakeCutouts",
    "SkipNet",
    "build_network",
    "crop_and_resize",
    "default_precision",
    "is_display_step",
    "param_groups",
    "resolve_seed",
    "spherical_distance",
    "weighted_spherical_loss",
    "validate_size",
    "visualise",
    "visualise_batch",
]
