"""The network's convolution: nn.Conv2d, with its weight gradient summed over tiles on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dip.conv
from dip.conv import WEIGHT_GRAD_TILES, Conv2d, weight_grad_tiles
from dip.network import ReflectionPad2d, build_network


@pytest.mark.parametrize("dtype", list(WEIGHT_GRAD_TILES))
@pytest.mark.parametrize(("height", "width"), [(256, 256), (130, 70), (512, 512), (300, 7)])
def test_the_tiles_cover_every_output_pixel_once(dtype, height, width):
    tiles = weight_grad_tiles(height, width, dtype)
    pixels, max_width = WEIGHT_GRAD_TILES[dtype]
    if height * width <= pixels:
        assert tiles is None
        return
    covered = torch.zeros(height, width, dtype=torch.int64)
    for rows, cols in tiles:
        covered[rows, cols] += 1
        assert len(range(height)[rows]) * len(range(width)[cols]) <= pixels
        assert len(range(width)[cols]) <= max_width
    assert torch.equal(covered, torch.ones_like(covered))


def test_images_of_one_tile_and_unmeasured_dtypes_are_not_tiled():
    assert weight_grad_tiles(64, 64, torch.float32) is None  # 4096 px: one tile
    assert weight_grad_tiles(512, 512, torch.float64) is None


def pair(in_channels: int, out_channels: int, kernel: int, seed: int = 0) -> tuple[nn.Conv2d, Conv2d]:
    torch.manual_seed(seed)
    plain = nn.Conv2d(in_channels, out_channels, kernel)
    ours = Conv2d(in_channels, out_channels, kernel)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


def forward_backward(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None = None):
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = conv(x)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, conv.weight.grad, conv.bias.grad


@pytest.fixture
def tiled_calls(monkeypatch):
    calls = []
    real = dip.conv._TiledWeightGradConv.apply
    monkeypatch.setattr(dip.conv._TiledWeightGradConv, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


def test_float32_forward_and_gradients_equal_nn_conv2d(tiled_calls):
    """Tolerance: 1e-5 relative to each tensor's largest value (float32 sums in another order)."""
    plain, ours = pair(8, 6, 3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 102, 82, generator=generator).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 6, 100, 80, generator=generator)
    expected = forward_backward(plain, x, grad)
    got = forward_backward(ours, x, grad)
    assert len(tiled_calls) == 1 and len(tiled_calls[0]) == 2  # 8000 px in two tiles of <= 4096
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_bf16_autocast_is_at_least_as_precise_as_nn_conv2d(tiled_calls):
    """Against float64 from the same bf16-rounded inputs, relative error (norm of the error over
    the norm): the output and input gradient as nn.Conv2d's under autocast (within 5%); the weight
    gradient, a float32 sum of bf16 tiles, below 0.004 (bf16 keeps 8 bits: 0.0039) and within 1.5
    times nn.Conv2d's; the bias gradient, a float32 sum, below 1e-5 (nn.Conv2d's is rounded to bf16)."""
    plain, ours = pair(16, 8, 3)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 202, 130, generator=generator).bfloat16().float()
    grad = torch.randn(1, 8, 200, 128, generator=generator).bfloat16().float()
    exact64 = nn.Conv2d(16, 8, 3).double()
    exact64.load_state_dict({k: v.bfloat16().double() for k, v in plain.state_dict().items()})
    exact = forward_backward(exact64, x.double(), grad.double())
    expected = forward_backward(plain, x, grad, torch.bfloat16)
    got = forward_backward(ours, x, grad, torch.bfloat16)
    assert len(tiled_calls) == 1 and len(tiled_calls[0]) == 2  # 25600 px in two tiles of <= 16384
    assert got[0].dtype == expected[0].dtype == torch.bfloat16
    assert [t.dtype for t in got[1:]] == [torch.float32] * 3

    def error(t, e):
        return ((t.double() - e).norm() / e.norm()).item()

    assert error(got[0], exact[0]) == pytest.approx(error(expected[0], exact[0]), rel=0.05)
    assert error(got[1], exact[1]) == pytest.approx(error(expected[1], exact[1]), rel=0.05)
    assert error(got[2], exact[2]) < min(0.004, 1.5 * error(expected[2], exact[2]))
    assert error(got[3], exact[3]) < 1e-5 < error(expected[3], exact[3])


@pytest.mark.parametrize("case", ["1x1", "no grad", "frozen", "small"])
def test_other_convolutions_are_nn_conv2d(case, tiled_calls):
    plain, ours = pair(4, 4, 1 if case == "1x1" else 3)
    size = 34 if case == "small" else 130
    x = torch.randn(1, 4, size, size)
    if case == "frozen":
        ours.requires_grad_(False)
    with torch.set_grad_enabled(case != "no grad"):
        out = ours(x)
    assert tiled_calls == []
    assert torch.equal(out, plain(x))


def test_the_network_tiles_the_weight_gradients_of_its_large_3x3_convs(tiled_calls):
    net = build_network(2, seed=0, channels=8)
    assert not any(type(m) is nn.Conv2d for m in net.modules())  # all are Conv2d, or deformable
    net(torch.randn(1, 32, 128, 128)).mean().backward()
    # at 128 px (16384 px) the first 3x3 conv and the merge's, 4 tiles each; at 64 px one tile suffices
    assert [len(tiles) for tiles in tiled_calls] == [4, 4]


def test_reflection_padding_keeps_the_dtype_under_autocast():
    x = torch.randn(1, 3, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = ReflectionPad2d(1)(x)
        native = nn.ReflectionPad2d(1)(x)
    assert padded.dtype == torch.bfloat16 and native.dtype == torch.float32  # what autocast does alone
    assert torch.equal(padded.float(), native)
