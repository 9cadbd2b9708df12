"""CLIP-space manipulations (unCLIP sections 3.2 and 3.3): slerp, interpolations, text diffs.

Tolerances: endpoints are bitwise equal to the float64-normalised input rounded to the output
dtype (and within 1e-7 of float32 ``F.normalize``); with float64 inputs the angle to the start,
``arccos`` of the dot product, equals ``t * omega`` within 1e-7 rad (arccos near 1 amplifies
float64 rounding to ~1.5e-8 rad) and every target has unit norm within 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prior.manipulate import PARALLEL_EPS, interpolation_targets, slerp, text_diff_targets

D = 64
ANGLE_ATOL = 1e-7
NORM_ATOL = 1e-12


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def unit(x):
    """The reference unit vector: normalised in float64, rounded to the input's dtype."""
    return F.normalize(x.double(), dim=-1).to(x.dtype)


def angle(x, y):
    return torch.arccos((x.double() * y.double()).sum(-1).clamp(-1, 1))


@pytest.mark.parametrize("shape", [(D,), (5, D)])
def test_endpoints_are_exactly_the_normalised_inputs(shape):
    a, b = 7.5 * randn(*shape, seed=1), 0.02 * randn(*shape, seed=2)
    targets = interpolation_targets(a, b, 9)
    assert targets.shape == (9, *shape) and targets.dtype == torch.float32
    assert torch.equal(targets[0], unit(a)) and torch.equal(targets[-1], unit(b))
    assert torch.equal(slerp(a, b, 0.0), unit(a)) and torch.equal(slerp(a, b, 1.0), unit(b))
    torch.testing.assert_close(targets[0], F.normalize(a, dim=-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(targets[-1], F.normalize(b, dim=-1), atol=1e-7, rtol=0)


def test_angle_to_the_start_is_linear_in_t():
    a, b = 3 * randn(D, seed=3, dtype=torch.float64), randn(D, seed=4, dtype=torch.float64)
    omega = angle(unit(a), unit(b))
    ts = torch.linspace(0, 1, 201, dtype=torch.float64)
    out = slerp(a, b, ts)
    assert out.shape == (201, D) and out.dtype == torch.float64
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(201, dtype=torch.float64), atol=NORM_ATOL, rtol=0)
    torch.testing.assert_close(angle(out, unit(a)), ts * omega, atol=ANGLE_ATOL, rtol=0)
    torch.testing.assert_close(angle(out, unit(b)), (1 - ts) * omega, atol=ANGLE_ATOL, rtol=0)
    # A scalar t gives the same point as the same t in a tensor.
    torch.testing.assert_close(
        slerp(a, b, 0.3), slerp(a, b, torch.tensor([0.3], dtype=torch.float64))[0], atol=1e-15, rtol=0
    )


def test_angles_linear_for_wide_and_narrow_pairs():
    a = randn(D, seed=5, dtype=torch.float64)
    r = randn(D, seed=6, dtype=torch.float64)
    noise = F.normalize(r - (r @ unit(a)) * unit(a), dim=-1)  # a unit vector orthogonal to a
    ts = torch.linspace(0, 1, 51, dtype=torch.float64)
    for omega in (3.0, 2.0, 1e-2, 1e-4):  # b at a chosen angle from a, in the plane of a and noise
        b = math.cos(omega) * unit(a) + math.sin(omega) * noise
        out = slerp(a, b, ts)
        cos = (out * unit(a)).sum(-1)
        sin = (out - cos[:, None] * unit(a)).norm(dim=-1)
        torch.testing.assert_close(torch.atan2(sin, cos), ts * omega, atol=1e-12, rtol=0)


def test_batches_broadcast_and_stack_on_t():
    a, b = randn(4, D, seed=7), randn(D, seed=8)
    ts = torch.tensor([0.0, 0.25, 1.0])
    out = slerp(a, b, ts)
    assert out.shape == (3, 4, D)
    for i in range(4):
        torch.testing.assert_close(out[:, i], slerp(a[i], b, ts), atol=0, rtol=0)
    assert slerp(a, b, 0.5).shape == (4, D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_returns_the_input_dtype(dtype):
    a, b = randn(D, seed=9, dtype=dtype), randn(D, seed=10, dtype=dtype)
    out = interpolation_targets(a, b, 3)
    assert out.dtype == dtype
    assert torch.equal(out[0], unit(a)) and torch.equal(out[-1], unit(b))


def test_nearly_parallel_inputs_fall_back_to_normalised_lerp():
    a = randn(D, seed=11, dtype=torch.float64)
    b = a + 1e-9 * randn(D, seed=12, dtype=torch.float64)
    assert angle(unit(a), unit(b)) < PARALLEL_EPS
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = slerp(a, b, ts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(11, dtype=torch.float64), atol=NORM_ATOL, rtol=0)
    expected = F.normalize((1 - ts[:, None]) * unit(a) + ts[:, None] * unit(b), dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)
    assert torch.equal(out[0], unit(a)) and torch.equal(out[-1], unit(b))
    # Identical directions (any norms): every target is that direction, no NaN.
    c = randn(D, seed=13)
    same = interpolation_targets(c, 4 * c, 5)
    assert torch.equal(same, unit(c).expand(5, D))


def test_mixed_batch_of_parallel_and_general_pairs():
    a = randn(2, D, seed=14, dtype=torch.float64)
    b = torch.stack([a[0] * 2, randn(D, seed=15, dtype=torch.float64)])
    out = slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], unit(a[0]), atol=1e-15, rtol=0)
    torch.testing.assert_close(out[1], slerp(a[1], b[1], 0.5), atol=0, rtol=0)


def test_slerp_errors():
    a = randn(D, seed=16)
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(a, -3 * a, 0.5)
    with pytest.raises(ValueError, match="zero"):
        slerp(a, torch.zeros(D), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        slerp(a, torch.full((D,), float("nan")), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        slerp(a, randn(D, seed=17), torch.zeros(2, 2))
    for steps in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an integer of at least 2"):
            interpolation_targets(a, randn(D, seed=17), steps)


@pytest.fixture
def embeds():
    return (
        randn(D, seed=20, dtype=torch.float64),
        unit(randn(D, seed=21, dtype=torch.float64)),
        unit(randn(D, seed=22, dtype=torch.float64)),
    )


def test_text_diff_single_target(embeds):
    image, text, edit = embeds
    z_d = F.normalize(unit(edit) - unit(text), dim=-1)
    assert torch.equal(text_diff_targets(image, text, edit, 0.0), unit(image))
    torch.testing.assert_close(text_diff_targets(image, text, edit, 0.4), slerp(image, z_d, 0.4), atol=1e-15, rtol=0)
    assert torch.equal(text_diff_targets(image, text, edit, 1.0), z_d)
    # Float32 inputs: float32 out, strength 0 still bitwise the normalised image embedding.
    image32 = image.float()
    out = text_diff_targets(image32, text.float(), edit.float(), 0)
    assert out.dtype == torch.float32 and torch.equal(out, unit(image32))


def test_text_diff_sequence_starts_at_the_image_and_turns_linearly(embeds):
    image, text, edit = embeds
    z_d = F.normalize(edit - text, dim=-1)
    omega = angle(unit(image), z_d)
    strength, steps = 0.6, 7
    seq = text_diff_targets(image, text, edit, strength, steps=steps)
    assert seq.shape == (steps, D)
    assert torch.equal(seq[0], unit(image))
    torch.testing.assert_close(seq[-1], text_diff_targets(image, text, edit, strength), atol=1e-15, rtol=0)
    expected = strength * torch.arange(steps, dtype=torch.float64) / (steps - 1) * omega
    torch.testing.assert_close(angle(seq, unit(image)), expected, atol=ANGLE_ATOL, rtol=0)
    torch.testing.assert_close(seq.norm(dim=-1), torch.ones(steps, dtype=torch.float64), atol=NORM_ATOL, rtol=0)


def test_text_diff_normalises_the_texts_first(embeds):
    image, text, edit = embeds
    torch.testing.assert_close(
        text_diff_targets(image, 5 * text, 0.1 * edit, 0.5),
        text_diff_targets(image, text, edit, 0.5),
        atol=1e-15,
        rtol=0,
    )


def test_text_diff_errors(embeds):
    image, text, edit = embeds
    for same in (text, 2 * text):
        with pytest.raises(ValueError, match="the two texts have the same embedding"):
            text_diff_targets(image, text, same, 0.5)
    for strength in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="strength must be a number from 0 to 1"):
            text_diff_targets(image, text, edit, strength)
    for steps in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            text_diff_targets(image, text, edit, 0.5, steps=steps)
