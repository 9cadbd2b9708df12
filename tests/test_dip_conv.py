"""The network's convolution: nn.Conv2d, with its float32 weight gradient summed over tiles on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dip.conv
from dip.conv import TILE_PIXELS, TILE_WIDTH, Conv2d, weight_grad_tiles
from dip.network import ReflectionPad2d, build_network


@pytest.mark.parametrize(("height", "width"), [(256, 256), (130, 70), (512, 512), (1300, 7)])
def test_the_tiles_cover_every_output_pixel_once(height, width):
    tiles = weight_grad_tiles(height, width)
    pixels, max_width = TILE_PIXELS, TILE_WIDTH
    covered = torch.zeros(height, width, dtype=torch.int64)
    for rows, cols in tiles:
        covered[rows, cols] += 1
        assert len(range(height)[rows]) * len(range(width)[cols]) <= pixels
        assert len(range(width)[cols]) <= max_width
    assert torch.equal(covered, torch.ones_like(covered))


def test_an_image_of_one_tile_is_not_tiled():
    assert weight_grad_tiles(64, 128) is None  # 8192 px
    assert len(weight_grad_tiles(64, 129)) == 2


def pair(in_channels: int, out_channels: int, kernel: int, seed: int = 0) -> tuple[nn.Conv2d, Conv2d]:
    torch.manual_seed(seed)
    plain = nn.Conv2d(in_channels, out_channels, kernel)
    ours = Conv2d(in_channels, out_channels, kernel)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


def forward_backward(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    out.backward(grad)
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
    x = torch.randn(1, 8, 132, 102, generator=generator).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 6, 130, 100, generator=generator)
    expected = forward_backward(plain, x, grad)
    got = forward_backward(ours, x, grad)
    assert [len(tiles) for tiles in tiled_calls] == [2]  # 13000 px in two tiles of <= 8192
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


@pytest.mark.parametrize("case", ["1x1", "no grad", "frozen", "small", "bf16 autocast", "float64"])
def test_other_convolutions_are_nn_conv2d(case, tiled_calls):
    plain, ours = pair(4, 4, 1 if case == "1x1" else 3)
    if case == "float64":
        plain, ours = plain.double(), ours.double()
    size = 34 if case == "small" else 130
    x = torch.randn(1, 4, size, size, dtype=plain.weight.dtype)
    if case == "frozen":
        ours.requires_grad_(False)
    with torch.set_grad_enabled(case != "no grad"), torch.autocast("cpu", enabled=case == "bf16 autocast"):
        out, expected = ours(x), plain(x)
    assert tiled_calls == []
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)


def test_the_network_tiles_the_weight_gradients_of_its_large_3x3_convs(tiled_calls):
    net = build_network(2, seed=0, channels=8)
    assert not any(type(m) is nn.Conv2d for m in net.modules())  # all are Conv2d, or deformable
    net(torch.randn(1, 32, 128, 128)).mean().backward()
    # at 128 px (16384 px) the first 3x3 conv and the merge's, 2 tiles each; at 64 px one tile suffices
    assert [len(tiles) for tiles in tiled_calls] == [2, 2]


def test_reflection_padding_keeps_the_dtype_under_autocast():
    x = torch.randn(1, 3, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = ReflectionPad2d(1)(x)
        native = nn.ReflectionPad2d(1)(x)
    assert padded.dtype == torch.bfloat16 and native.dtype == torch.float32  # what autocast does alone
    assert torch.equal(padded.float(), native)


def test_reflection_padding_works_where_there_is_no_autocast():
    assert ReflectionPad2d(1)(torch.empty(1, 2, 4, 4, device="meta")).shape == (1, 2, 6, 6)
