"""Manipulations in CLIP's embedding space from the unCLIP paper (Ramesh et al. 2022, 3.2-3.3).

* ``slerp`` / ``interpolation_targets``: travel along the great circle between two embeddings
  (section 3.2, "image interpolations").
* ``text_diff_targets``: move an image embedding towards the difference of two caption
  embeddings, ``z_d = normalize(z_t - z_t0)`` (section 3.3, "text diffs").

All of them work on the unit sphere: inputs of any norm are l2-normalised first and every
target has unit norm. The arithmetic is float64 so that ``t = 0`` and ``t = 1`` give the
normalised endpoints exactly; results come back in the inputs' dtype and on their device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Below this angle (radians) between the inputs slerp divides by a vanishing sin(omega); the
# normalised lerp used instead differs from slerp by O(omega^3) ~ 1e-18 rad there, far below
# float64 resolution. Within this angle of pi the inputs are antiparallel: every great circle
# joins them, so the path has no direction and ``slerp`` raises.
PARALLEL_EPS = 1e-6
# Two unit text embeddings closer than this (chord length ~ angle in radians) give no direction.
TEXT_DIFF_EPS = 1e-6


def _unit64(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as float64 unit vectors along the last dimension (on CPU if the device lacks float64)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name}: expected an embedding [d] or a batch [n, d], got shape {list(x.shape)}")
    device = torch.device("cpu") if x.device.type == "mps" else x.device
    x = x.to(device=device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: the embedding has non-finite values")
    norm = x.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError(f"{name}: the embedding is zero, it has no direction")
    return x / norm


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _slerp_unit(a: torch.Tensor, b: torch.Tensor, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """slerp of float64 unit vectors; ``t`` scalar -> ``[..., d]``, 1-D ``[k]`` -> ``[k, ..., d]``."""
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    if t.dim() > 1:
        raise ValueError(f"slerp: t must be a number or a 1-D tensor, got shape {list(t.shape)}")
    a, b = torch.broadcast_tensors(a, b)
    # The angle from the chord lengths: accurate at every angle, unlike arccos of the dot product.
    omega = 2 * torch.atan2((a - b).norm(dim=-1, keepdim=True), (a + b).norm(dim=-1, keepdim=True))
    if (omega > math.pi - PARALLEL_EPS).any():
        raise ValueError(
            "slerp: the two embeddings point in opposite directions, so the path between them is undefined"
        )
    if t.dim() == 1:
        t = t.view(-1, *([1] * a.dim()))  # [k, 1, (1,)] against [(n,) d]
    sin_omega = torch.sin(omega)
    parallel = omega < PARALLEL_EPS
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    spherical = torch.sin((1 - t) * omega) / safe_sin * a + torch.sin(t * omega) / safe_sin * b
    if parallel.any():
        linear = F.normalize((1 - t) * a + t * b, dim=-1)
        linear = torch.where(t == 0, a, torch.where(t == 1, b, linear))  # exact endpoints here too
        spherical = torch.where(parallel, linear, spherical)
    return spherical


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``) on the unit sphere.

    ``a`` and ``b`` are ``[d]`` or ``[n, d]`` (broadcast together), of any norm. ``t`` is a number
    (result ``[d]`` / ``[n, d]``) or a 1-D tensor or sequence of ``k`` values (result ``[k, d]`` /
    ``[k, n, d]``); values outside [0, 1] continue along the same great circle. The angle to
    ``a`` is ``t`` times the angle between ``a`` and ``b``. Inputs less than ``PARALLEL_EPS``
    radians apart use the normalised lerp; antiparallel inputs (within ``PARALLEL_EPS`` of pi)
    raise ``ValueError``. Endpoints are exactly ``a / |a|`` and ``b / |b|`` computed in float64
    and rounded to the output dtype (the promoted dtype of ``a`` and ``b``).
    """
    out = _slerp_unit(_unit64(a, "slerp: a"), _unit64(b, "slerp: b"), t)
    return out.to(device=a.device, dtype=_out_dtype(a, b))


def interpolation_targets(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` (>= 2) evenly spaced targets ``slerp(a, b, j / (steps - 1))``: ``[steps, d]``.

    The first is exactly ``a / |a|``, the last exactly ``b / |b|``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"interpolation_targets: steps must be an integer of at least 2, got {steps!r}")
    t = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    return slerp(a, b, t)


def text_diff_direction(text_embed: torch.Tensor, edit_text_embed: torch.Tensor) -> torch.Tensor:
    """``normalize(unit(edit_text_embed) - unit(text_embed))`` in float64.

    Texts whose unit embeddings are less than ``TEXT_DIFF_EPS`` apart raise ``ValueError``:
    their difference has no direction.
    """
    diff = _unit64(edit_text_embed, "text_diff_targets: edit_text_embed") - _unit64(
        text_embed, "text_diff_targets: text_embed"
    )
    if (diff.norm(dim=-1) < TEXT_DIFF_EPS).any():
        raise ValueError(
            "text_diff_targets: the two texts have the same embedding, so their difference has no "
            "direction; give an edit text that differs from the original text"
        )
    return F.normalize(diff, dim=-1)


def text_diff_targets(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    edit_text_embed: torch.Tensor,
    strength: float,
    steps: int = 1,
) -> torch.Tensor:
    """Move ``image_embed`` towards the text diff ``z_d = normalize(edit_text_embed - text_embed)``.

    The target is ``slerp(image_embed, z_d, strength)`` (``[d]``) for ``steps = 1``, or the
    sequence ``slerp(image_embed, z_d, strength * j / (steps - 1))``, ``j = 0 .. steps - 1``
    (``[steps, d]``) for ``steps >= 2``, whose first element is the normalised image embedding.
    ``strength`` is in [0, 1]; 0 gives exactly ``image_embed / |image_embed|``. The two text
    embeddings are l2-normalised before the difference (a no-op for ``ClipEncoder.encode_text``
    embeddings, which are unit vectors). Texts whose unit embeddings are less than
    ``TEXT_DIFF_EPS`` apart raise ``ValueError``: their difference has no direction.
    """
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"text_diff_targets: strength must be a number from 0 to 1, got {strength!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"text_diff_targets: steps must be a positive integer, got {steps!r}")
    image = _unit64(image_embed, "text_diff_targets: image_embed")
    direction = text_diff_direction(text_embed, edit_text_embed)
    if steps == 1:
        theta: float | torch.Tensor = float(strength)
    else:
        theta = float(strength) * (torch.arange(steps, dtype=torch.float64) / (steps - 1))
    out = _slerp_unit(image, direction.to(image.device), theta)
    return out.to(device=image_embed.device, dtype=_out_dtype(image_embed, text_embed, edit_text_embed))
