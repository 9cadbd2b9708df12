"""The hq skip net: shapes, size validation, colour head, deformable offsets, parameter groups."""

import pytest
import torch
from torch import nn

from dip.network import (
    COLOUR_CORRELATION_SQRT,
    INPUT_CHANNELS,
    OFFSET_TYPES,
    DeformableConv3x3,
    Downsample,
    SkipNet,
    Upsample,
    build_network,
    colour_matrix,
    offset_parameters,
    param_groups,
    validate_size,
)

# (size, deepest num_scales that fits); every smaller num_scales fits too
SIZE_LIMITS = [(256, 6), (512, 7)]


def run_narrow(num_scales: int, offset_type: str, size: int) -> torch.Tensor:
    # narrow (8 channels) to stay fast; the width does not change the wiring
    net = build_network(num_scales, offset_type, seed=0, channels=8)
    with torch.no_grad():
        return net(torch.randn(1, INPUT_CHANNELS, size, size))


@pytest.mark.parametrize(
    ("size", "num_scales"), [(size, n) for size, limit in SIZE_LIMITS for n in range(1, limit + 1)]
)
def test_output_shape_for_every_num_scales_and_size(size, num_scales):
    image = run_narrow(num_scales, "none", size)
    assert image.shape == (1, 3, size, size)
    assert image.min().item() > 0 and image.max().item() < 1


@pytest.mark.parametrize("offset_type", ["1x1", "full"])
@pytest.mark.parametrize(("size", "num_scales"), [(256, 1), *SIZE_LIMITS])
def test_output_shape_for_every_offset_type_and_size(size, num_scales, offset_type):
    # deformable convolutions are slow on the CPU: the shallowest and deepest nets only
    image = run_narrow(num_scales, offset_type, size)
    assert image.shape == (1, 3, size, size)
    assert image.min().item() > 0 and image.max().item() < 1


@pytest.mark.parametrize("offset_type", OFFSET_TYPES)
def test_full_width_network_output_shape(offset_type):
    net = build_network(2, offset_type, seed=0)
    image = net(torch.randn(1, INPUT_CHANNELS, 24, 24))
    assert image.shape == (1, 3, 24, 24)
    image.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_network_structure_matches_the_spec():
    net = build_network(6, "none", seed=0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 6 * 3  # down, deeper, merge per level
    assert {m.out_channels for m in convs if m.kernel_size == (3, 3)} == {192}
    assert sum(m.out_channels == 4 for m in convs) == 6  # skip branches
    assert convs[0].in_channels == 32
    assert sum(isinstance(m, Downsample) for m in net.modules()) == 6
    assert sum(isinstance(m, Upsample) for m in net.modules()) == 6
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in net.modules()) == 6 * 3
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    assert isinstance(net.head[-1], nn.Sigmoid)


@pytest.mark.parametrize(("size", "limit"), SIZE_LIMITS)
def test_validate_size_accepts_up_to_the_deepest_fitting_num_scales(size, limit):
    for num_scales in range(1, limit + 1):
        validate_size(size, num_scales)
    with pytest.raises(
        ValueError, match=rf"num_scales={limit + 1} does not fit size={size}.*at most num_scales={limit}"
    ):
        validate_size(size, limit + 1)


def test_validate_size_rejects_a_size_not_divisible_by_the_scales():
    with pytest.raises(ValueError, match=r"multiple of 2\*\*3=8"):
        validate_size(100, 3)


def test_validate_size_matches_what_the_network_can_run():
    # 24 px: 3 scales leave 3 px at the deepest level (runs), 4 would leave 1.5
    validate_size(24, 3)
    with torch.no_grad():
        build_network(3, seed=0, channels=4)(torch.randn(1, INPUT_CHANNELS, 24, 24))
    with pytest.raises(ValueError):
        validate_size(16, 3)
    with pytest.raises(RuntimeError), torch.no_grad():
        build_network(3, seed=0, channels=4)(torch.randn(1, INPUT_CHANNELS, 16, 16))


def test_colour_matrix_largest_column_norm_is_one():
    m = colour_matrix()
    assert m.norm(dim=0).max().item() == pytest.approx(1.0, abs=1e-6)


def test_colour_matrix_is_the_scaled_correlation_with_a_desaturated_first_column():
    m = colour_matrix().double()
    ref = torch.tensor(COLOUR_CORRELATION_SQRT, dtype=torch.float64)
    ratio = m / ref.where(ref != 0, 1.0)
    scale = ratio[0, 1].item()
    torch.testing.assert_close(ratio[:, 0], torch.full((3,), scale / 1.6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(ratio[[0, 2], 1:], torch.full((2, 2), scale, dtype=torch.float64), atol=1e-6, rtol=0)


def test_head_maps_zero_logits_to_grey():
    net = build_network(1, seed=0, channels=8)
    assert net.head[1](torch.zeros(1, 3, 2, 2)).abs().max().item() == 0
    assert net.head[2](torch.zeros(1)).item() == 0.5


@pytest.mark.parametrize("offset_type", ["1x1", "full"])
def test_untrained_deformable_conv_is_an_ordinary_reflect_padded_conv(offset_type):
    layer = DeformableConv3x3(8, 6, offset_type)
    conv = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
    conv.load_state_dict({"weight": layer.conv.weight, "bias": layer.conv.bias})
    x = torch.randn(1, 8, 10, 10)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("offset_type", "kernel"), [("1x1", 1), ("full", 3)])
def test_deformable_offsets_follow_offset_type_and_move_the_samples(offset_type, kernel):
    layer = DeformableConv3x3(8, 6, offset_type)
    assert layer.offset_branch.kernel_size == (kernel, kernel)
    assert layer.offset_branch.out_channels == 2 * 4 * 9  # 4 offset groups, x and y per tap
    x = torch.randn(1, 8, 10, 10)
    before = layer(x)
    nn.init.constant_(layer.offset_branch.bias, 0.5)
    assert (layer(x) - before).abs().max().item() > 1e-2


def test_deformable_offsets_receive_gradients():
    layer = DeformableConv3x3(8, 6, "1x1")
    layer(torch.randn(1, 8, 10, 10)).square().sum().backward()
    assert layer.offset_branch.weight.grad.abs().sum().item() > 0


def test_offset_type_none_has_no_offset_parameters():
    assert offset_parameters(build_network(2, "none", seed=0, channels=8)) == []


@pytest.mark.parametrize("offset_type", ["1x1", "full"])
def test_param_groups_split_offset_layers_and_scale_their_lr(offset_type):
    net = build_network(3, offset_type, seed=0, channels=8)
    main, offsets = param_groups(net, lr=1e-3, offset_lr_fac=0.1)
    assert main["lr"] == 1e-3 and offsets["lr"] == pytest.approx(1e-4)
    assert len(offsets["params"]) == 2 * 3 * 3  # weight and bias of 3 deformable convs per level
    assert len(main["params"]) + len(offsets["params"]) == len(list(net.parameters()))
    assert not {id(p) for p in main["params"]} & {id(p) for p in offsets["params"]}


def test_unknown_offset_type_is_rejected():
    with pytest.raises(ValueError, match="offset_type"):
        SkipNet(2, "random_offset")


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, b = build_network(2, seed=3, channels=8), build_network(2, seed=3, channels=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_network(2, seed=4, channels=8)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
