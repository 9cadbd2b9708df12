"""How much memory a visualisation needs: a cheap upper estimate, made before any work.

The constants come from the CPU's peak resident memory and the bytes autograd keeps for the
backward pass, rounded up (tests/test_faults.py checks the estimate against a measurement).
"""

from __future__ import annotations

import torch

from backbone.clip import ClipEncoder, takes_cpu_bf16_attention

from .loop import PRECISION_DTYPES, default_precision
from .network import CHANNELS

DIP_FLOATS_PER_PIXEL = 12 * CHANNELS  # per pixel of each level of the network (levels: 1, 1/4, ...)
CUTOUT_FLOATS_PER_PIXEL = 48 * 3  # per pixel of each cutout: cropping, resizing, augmentations
VIT_FLOATS_PER_TOKEN = 16  # per token, unit of width and layer of CLIP's vision transformer
# bf16 attention on the CPU (backbone.clip.takes_cpu_bf16_attention) keeps each layer's scores for
# the backward pass, tokens x tokens per head: the fp32 softmax and its bf16 copy, and room for
# the logits in flight (flash kernels, on CUDA and in fp32, keep none)
ATTENTION_BYTES_PER_SCORE = 4 + 2 + 2
# per cutout, target and unit of CLIP's embedding width: the loss's broadcast differences between
# every cutout and every target (normalised copy, difference, its square, their gradients)
TARGET_FLOATS_PER_PAIR = 6
# per pixel of the init image (phase before the CLIP-guided steps): the picture in float32, its
# difference to the init image, the square, and their gradients, 3 channels each
INIT_FLOATS_PER_PIXEL = 5 * 3
AUTOCAST_FACTOR = 0.65  # fp16/bf16 autocast keeps most activations in half precision
BACKWARD_HEADROOM = 1.25  # gradients of the activations alive while the backward pass runs


def estimate_peak_bytes(
    size: int,
    num_cutouts: int,
    num_scales: int,
    clip_image_size: int,
    vit_tokens: int,
    vit_width: int,
    vit_layers: int,
    precision: str = "fp32",
    resident_bytes: int = 0,
    members: int = 1,
    kept_score_heads: int = 0,
    targets: int = 1,
    embed_dim: int = 0,
    init_image: bool = False,
) -> int:
    """A cheap upper estimate of a visualisation's peak memory: weights plus one step's activations
    (of ``members`` images optimised together). ``kept_score_heads``: the heads of an attention
    that keeps its scores for the backward pass (``ATTENTION_BYTES_PER_SCORE``), 0 for none.
    ``targets``: the weighted targets of each picture's loss (``embed_dim`` wide). ``init_image``:
    an init phase comes first; the init image stays held for the run, and the larger of the two
    phases' steps counts."""
    levels = sum(4.0**-level for level in range(num_scales + 1))
    network = DIP_FLOATS_PER_PIXEL * size * size * levels
    floats = network + num_cutouts * CUTOUT_FLOATS_PER_PIXEL * clip_image_size**2
    floats += num_cutouts * VIT_FLOATS_PER_TOKEN * vit_tokens * vit_width * vit_layers
    floats += num_cutouts * targets * embed_dim * TARGET_FLOATS_PER_PAIR
    factor = BACKWARD_HEADROOM * (1.0 if precision == "fp32" else AUTOCAST_FACTOR)
    activations = 4 * floats * factor
    activations += num_cutouts * vit_layers * kept_score_heads * vit_tokens**2 * ATTENTION_BYTES_PER_SCORE
    held = 0
    if init_image:
        held = 4 * 3 * size * size
        activations = max(activations, init_step_bytes(size, num_scales, precision))
    return int(resident_bytes + held + members * activations)


def init_step_bytes(size: int, num_scales: int, precision: str = "fp32") -> float:
    """The activations of one step of the init phase for one picture: the network's, and the
    pixel error's (no CLIP)."""
    levels = sum(4.0**-level for level in range(num_scales + 1))
    network = DIP_FLOATS_PER_PIXEL * size * size * levels
    factor = BACKWARD_HEADROOM * (1.0 if precision == "fp32" else AUTOCAST_FACTOR)
    return 4 * (network * factor + INIT_FLOATS_PER_PIXEL * size * size * BACKWARD_HEADROOM)


def visualisation_peak_bytes(
    clip: ClipEncoder,
    device: torch.device,
    size: int,
    num_cutouts: int,
    num_scales: int,
    *,
    members: int = 1,
    resident_bytes: int = 0,
    targets: int = 1,
    init_image: bool = False,
) -> int:
    """``estimate_peak_bytes`` for ``clip`` on ``device`` in the visualiser's default precision there,
    ``targets`` weighted targets per picture, after an init phase if ``init_image``."""
    tower = clip.image_tower
    precision = default_precision(device)
    keeps_scores = takes_cpu_bf16_attention(device, PRECISION_DTYPES[precision])
    return estimate_peak_bytes(
        size,
        num_cutouts,
        num_scales,
        clip_image_size=clip.image_size,
        vit_tokens=tower.tokens,
        vit_width=tower.width,
        vit_layers=tower.layers,
        precision=precision,
        resident_bytes=resident_bytes,
        members=members,
        kept_score_heads=tower.heads if keeps_scores else 0,
        targets=targets,
        embed_dim=clip.embed_dim,
        init_image=init_image,
    )
