"""The fixed cubic x2 resamplers of the hq skip net."""

import math

import pytest
import torch

from dip.resample import (
    CUBIC_KERNEL,
    Downsample,
    Upsample,
    cubic_kernel_2d,
    downsample_matrix,
    resample_separable,
    upsample_matrix,
)


def smooth_bump(size: int = 64, sigma: float = 8.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * sigma**2))[None, None]


def test_cubic_kernel_sums_to_one():
    assert sum(CUBIC_KERNEL) == pytest.approx(1.0, abs=1e-12)
    assert cubic_kernel_2d().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_cubic_kernel_phases_each_sum_to_one_half():
    # what makes x2 upsampling (kernel doubled) keep a constant: each output phase sums to 1
    assert sum(CUBIC_KERNEL[0::2]) == pytest.approx(0.5, abs=1e-12)
    assert sum(CUBIC_KERNEL[1::2]) == pytest.approx(0.5, abs=1e-12)


def test_upsample_kernel_sums_to_four():
    # x2 per axis: each output pixel sees every other tap
    assert Upsample().kernel.sum().item() == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("n", [4, 6, 16, 64])
def test_downsample_matrix_rows_sum_to_one(n):
    torch.testing.assert_close(downsample_matrix(n).sum(1), torch.ones(n // 2, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 4, 16, 64])
def test_upsample_matrix_rows_sum_to_one(n):
    torch.testing.assert_close(upsample_matrix(n).sum(1), torch.ones(2 * n, dtype=torch.float64))


@pytest.mark.parametrize(("h", "w"), [(4, 6), (16, 12), (64, 64)])
def test_matrix_form_equals_the_depthwise_convolution(h, w):
    x = torch.randn(2, 5, h, w, dtype=torch.float64)
    down = resample_separable(x, downsample_matrix(h), downsample_matrix(w))
    up = resample_separable(x, upsample_matrix(h), upsample_matrix(w))
    torch.testing.assert_close(down, Downsample().convolve(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(up, Upsample().convolve(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("resampler", [Downsample, Upsample])
def test_bf16_autocast_takes_the_matrix_form_within_bf16_rounding(resampler):
    x = torch.rand(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        low = resampler()(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), resampler()(x), atol=2e-2, rtol=0)  # bf16: 8 bits of mantissa


def test_downsample_halves_size():
    assert Downsample()(torch.rand(2, 5, 16, 12)).shape == (2, 5, 8, 6)


def test_upsample_doubles_size():
    assert Upsample()(torch.rand(2, 5, 8, 6)).shape == (2, 5, 16, 12)


@pytest.mark.parametrize("resampler", [Downsample, Upsample])
def test_constant_image_stays_constant(resampler):
    image = torch.full((1, 4, 16, 16), 0.37)
    out = resampler()(image)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), atol=1e-6, rtol=0)


def test_channels_are_resampled_independently():
    image = torch.zeros(1, 3, 16, 16)
    image[:, 1] = smooth_bump(16, 3.0)[0, 0]
    for out in (Downsample()(image), Upsample()(image)):
        assert out[:, 0].abs().max().item() == 0 and out[:, 2].abs().max().item() == 0
        assert out[:, 1].abs().max().item() > 0.5


def test_up_then_down_returns_a_smooth_image():
    image = smooth_bump(64, sigma=8.0)
    # gaussian of sigma 8 px: reproduced within 1e-4 everywhere
    torch.testing.assert_close(Downsample()(Upsample()(image)), image, atol=1e-4, rtol=0)


def test_up_then_down_returns_a_sinusoid_away_from_the_border():
    # reflection padding is only exact for images symmetric at the border; away from it a
    # 32 px period survives the round trip within 1e-3
    y, x = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    image = torch.sin(2 * math.pi * (x + 2 * y) / 64)[None, None]
    out = Downsample()(Upsample()(image))
    torch.testing.assert_close(out[..., 6:-6, 6:-6], image[..., 6:-6, 6:-6], atol=1e-3, rtol=0)


def test_down_then_up_returns_a_smooth_image():
    image = smooth_bump(64, sigma=8.0)
    torch.testing.assert_close(Upsample()(Downsample()(image)), image, atol=2e-3, rtol=0)


def test_resamplers_follow_the_input_dtype():
    image = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    assert Downsample()(image).dtype == torch.float64
    assert Upsample()(image).dtype == torch.float64
