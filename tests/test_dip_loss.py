"""The squared spherical distance between CLIP embeddings."""

import math

import pytest
import torch

from dip.loss import spherical_distance


def unit_at_angle(theta: float) -> torch.Tensor:
    return torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)


def test_zero_for_equal_embeddings():
    a = torch.randn(4, 64)
    torch.testing.assert_close(spherical_distance(a, a.clone()), torch.zeros(4), atol=2e-6, rtol=0)


def test_zero_for_the_same_direction_at_different_norms():
    a = torch.randn(64, dtype=torch.float64)
    assert spherical_distance(a, 3.5 * a).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("theta", [0.1, 0.5, 1.0, math.pi / 2, 2.5, math.pi])
def test_equals_half_the_squared_angle(theta):
    x = unit_at_angle(0.0)
    assert spherical_distance(x, unit_at_angle(theta)).item() == pytest.approx(theta**2 / 2, rel=1e-9, abs=1e-12)


def test_increases_with_the_angle():
    thetas = torch.linspace(0, math.pi, 50).tolist()
    losses = [spherical_distance(unit_at_angle(0.0), unit_at_angle(t)).item() for t in thetas]
    assert all(b > a for a, b in zip(losses, losses[1:], strict=False))


def test_broadcasts_cutouts_against_one_target():
    cutouts, target = torch.randn(8, 16), torch.randn(1, 16)
    assert spherical_distance(cutouts, target).shape == (8,)


def test_gradient_is_finite_at_equal_and_opposite_embeddings():
    for sign in (1.0, -1.0):
        a = torch.randn(16, dtype=torch.float64, requires_grad=True)
        spherical_distance(a, sign * a.detach()).backward()
        assert torch.isfinite(a.grad).all()


def test_the_weighted_loss_is_the_weighted_sum_of_each_targets_mean_distance():
    """Against a hand computation: angles chosen so that every distance is theta**2 / 2 exactly
    (float64; tolerance 1e-12)."""
    from dip.loss import weighted_spherical_loss

    cutouts = torch.stack([unit_at_angle(0.0), unit_at_angle(0.4)])[None]  # [1 picture, 2 cutouts, 3]
    targets = torch.stack([unit_at_angle(0.2), unit_at_angle(1.0), unit_at_angle(-0.5)])[None]  # [1, 3, 3]
    weights = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64)
    by_hand = (
        1.0 * (0.2**2 / 2 + 0.2**2 / 2) / 2  # cutouts at angles 0.2 and 0.2 from the first target
        + 0.5 * (1.0**2 / 2 + 0.6**2 / 2) / 2
        - 0.25 * (0.5**2 / 2 + 0.9**2 / 2) / 2
    )
    loss = weighted_spherical_loss(cutouts, targets, weights)
    assert loss.shape == (1,) and loss.item() == pytest.approx(by_hand, abs=1e-12)


def test_one_target_of_weight_1_is_the_plain_mean_distance():
    from dip.loss import weighted_spherical_loss

    embeds, targets = torch.randn(3, 8, 16), torch.randn(3, 16)
    plain = spherical_distance(embeds, targets[:, None]).mean(dim=1)
    weighted = weighted_spherical_loss(embeds, targets[:, None], torch.ones(1))
    torch.testing.assert_close(weighted, plain, atol=1e-6, rtol=0)
