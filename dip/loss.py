"""The distance between CLIP embeddings that the visualiser minimises."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half the squared great-circle distance between the directions of ``a`` and ``b``.

    ``[..., d]`` and ``[..., d]`` (broadcast) -> ``[...]``. Both are l2-normalised first; with
    ``theta`` the angle between them this is ``2 * arcsin(|a - b| / 2)**2 = theta**2 / 2``:
    0 for equal directions, ``pi**2 / 2`` for opposite ones. Unlike ``1 - cos`` its gradient
    does not vanish as the directions approach or oppose each other.
    """
    chord = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).norm(dim=-1)
    # rounding can push the chord of opposite directions just past 2, outside arcsin's domain
    return 2 * (chord / 2).clamp(max=1).arcsin().square()


def weighted_spherical_loss(embeds: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The visualiser's loss with several weighted targets, as LAION's loop sums its prompts.

    ``embeds [n, c, d]`` (``c`` cutouts of each of ``n`` pictures), ``targets [n, t, d]`` (each
    picture's ``t`` targets), ``weights [t]`` -> ``[n]``:
    ``sum_t weights[t] * mean_c spherical_distance(embeds[:, c], targets[:, t])``.
    A negative weight pushes the picture away from its target.
    """
    distances = spherical_distance(embeds[:, :, None], targets[:, None])  # [n, c, t]
    return (distances.mean(dim=1) * weights.to(distances.dtype)).sum(dim=-1)
