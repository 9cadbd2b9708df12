"""Cutouts: one batched antialiased bicubic crop-and-resize, the original's boxes, seeded augmentations."""

import pytest
import torch
import torch.nn.functional as F

from dip.cutouts import MakeCutouts, crop_and_resize, pad_to_square, resize_weights


def test_batched_crop_and_resize_equals_per_crop_antialiased_bicubic():
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    offsets_y = torch.tensor([0, 10, 32, 0, 5, 100])
    offsets_x = torch.tensor([0, 20, 0, 31, 7, 3])
    sizes = torch.tensor([256, 230, 224, 225, 100, 40])  # shrink, identity and enlarge
    out = crop_and_resize(image, offsets_y, offsets_x, sizes, 224)
    assert out.shape == (6, 3, 224, 224)
    for i, (y, x, s) in enumerate(zip(offsets_y.tolist(), offsets_x.tolist(), sizes.tolist(), strict=True)):
        ref = F.interpolate(image[..., y : y + s, x : x + s], size=(224, 224), mode="bicubic", antialias=True)
        torch.testing.assert_close(out[i : i + 1], ref, atol=5e-5, rtol=0)


def test_resize_weights_rows_sum_to_one():
    weights = resize_weights(256, torch.tensor([0, 17]), torch.tensor([256, 60]), 224)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 224), atol=1e-6, rtol=0)
    assert weights[1, :, :17].abs().max().item() == 0 and weights[1, :, 17 + 60 :].abs().max().item() == 0


def test_crop_and_resize_passes_gradients_to_the_image():
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    crop_and_resize(image, torch.tensor([0, 4]), torch.tensor([2, 0]), torch.tensor([32, 20]), 24).sum().backward()
    assert image.grad.abs().sum().item() > 0


def test_last_quarter_of_cutouts_are_whole_images():
    cutouts = MakeCutouts(224, 12, torch.Generator().manual_seed(0))
    offsets_y, offsets_x, sizes = cutouts.boxes(256, 256)
    assert sizes[-3:].tolist() == [256] * 3
    assert offsets_y[-3:].tolist() == [0] * 3 and offsets_x[-3:].tolist() == [0] * 3


def test_random_cutout_sizes_are_clamped_between_clip_size_and_the_image():
    cutouts = MakeCutouts(224, 32, torch.Generator().manual_seed(0))
    for _ in range(20):
        offsets_y, offsets_x, sizes = cutouts.boxes(256, 256)
        assert sizes.min().item() >= 224 and sizes.max().item() <= 256
        assert offsets_y.min().item() >= 0 and (offsets_y + sizes).max().item() <= 256
        assert offsets_x.min().item() >= 0 and (offsets_x + sizes).max().item() <= 256


def test_random_cutout_sizes_follow_the_normal_draw_on_large_images():
    # on 1024 px, min(short, 224) rarely binds: sides ~ int(1024 * N(0.8, 0.3)) clamped to [224, 1024]
    cutouts = MakeCutouts(224, 32, torch.Generator().manual_seed(0))
    sizes = torch.cat([cutouts.boxes(1024, 1024)[2][:24] for _ in range(100)]).float()
    assert sizes.median().item() == pytest.approx(0.8 * 1024, rel=0.03)
    # P(N(0.8, 0.3) > 1) = 0.2525
    assert (sizes == 1024).float().mean().item() == pytest.approx(0.2525, abs=0.03)


def test_cutouts_are_clip_sized_and_in_range():
    ramp = torch.linspace(0, 1, 64)
    image = torch.stack([ramp.expand(64, 64), ramp[:, None].expand(64, 64), 1 - ramp.expand(64, 64)])[None]
    out = MakeCutouts(224, 8, torch.Generator().manual_seed(0))(image)
    assert out.shape == (8, 3, 224, 224)
    # a smooth image barely overshoots under bicubic enlargement
    assert out.min().item() >= -0.02 and out.max().item() <= 1.02


def test_cutouts_depend_only_on_their_generator():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    a = MakeCutouts(224, 8, torch.Generator().manual_seed(0))(image)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = MakeCutouts(224, 8, torch.Generator().manual_seed(0))(image)
    c = MakeCutouts(224, 8, torch.Generator().manual_seed(5))(image)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(1)
    MakeCutouts(224, 8, torch.Generator().manual_seed(0))(image)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not advanced


def test_augmentations_change_the_cutouts():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = MakeCutouts(224, 8, torch.Generator().manual_seed(0), augment=False)(image)
    augmented = MakeCutouts(224, 8, torch.Generator().manual_seed(0))(image)
    changed = (augmented - plain).flatten(1).abs().amax(1) > 1e-3
    assert changed.sum().item() >= 4  # each of 5 augmentations fires with p >= 0.15


def test_pad_to_square_fills_with_the_mean_colour():
    image = torch.rand(1, 3, 10, 16)
    padded = pad_to_square(image)
    assert padded.shape == (1, 3, 16, 16)
    torch.testing.assert_close(padded[:, :, 3:13], image)
    torch.testing.assert_close(padded[:, :, :3], image.mean((2, 3), keepdim=True).expand(1, 3, 3, 16))
