"""The visualiser with several weighted targets per picture, and with an init phase."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip import DipSettings, InitFrame, visualise_batch
from prior.factory import random_models

SETTINGS = DipSettings(size=64, num_scales=3, num_cutouts=4, iterations=2, display_freq=1, lr=0.01, seed=0)


@pytest.fixture(scope="module")
def clip():
    return random_models("tiny").clip


def embeddings(clip, n: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, clip.embed_dim, generator=torch.Generator().manual_seed(n)), dim=-1)


def test_a_target_of_weight_1_alone_is_the_single_target_run(clip):
    goal = embeddings(clip, 1)
    plain = list(visualise_batch(goal, clip, SETTINGS, [3], precision="fp32"))
    weighted = list(visualise_batch(goal[:, None], clip, SETTINGS, [3], precision="fp32", weights=[1.0]))
    for a, b in zip(plain, weighted, strict=True):
        assert torch.equal(a.images, b.images) and a.metrics == b.metrics


def test_every_target_is_scored_and_the_first_is_the_pictures_own(clip):
    targets = embeddings(clip, 3)[None]  # one picture, three targets
    (last,) = list(visualise_batch(targets, clip, SETTINGS.replace(display_freq=0), [3], weights=[1, 0.5, -0.5]))
    metric = last.metrics[0]
    assert len(metric["similarities"]) == 3 and metric["similarity"] == metric["similarities"][0]
    assert all(-1 <= value <= 1 for value in metric["similarities"])


def test_an_init_phase_comes_first_and_brings_the_picture_towards_the_init_image(clip):
    image = torch.zeros(3, 64, 64)
    image[0] = 1.0  # pure red
    frames = list(visualise_batch(embeddings(clip, 1)[0], clip, SETTINGS, [3, 4], init_image=image, init_steps=6))
    init = [frame for frame in frames if isinstance(frame, InitFrame)]
    assert [frame.step for frame in frames] == [1, 2, 3, 4, 5, 6, 1, 2]
    assert len(init) == 6 and init[0].images.shape == (2, 3, 64, 64)
    for picture in range(2):
        assert init[-1].losses[picture] < init[0].losses[picture]
        measured = (init[-1].images[picture] - image).square().mean().item()
        assert measured < init[0].losses[picture]  # the fitted picture is nearer red than the first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init_steps": 3}, "init_steps needs an init_image"),
        ({"init_image": torch.rand(3, 32, 32), "init_steps": 3}, r"init_image must have shape \[3, 64, 64\]"),
        ({"init_image": torch.full((3, 64, 64), 2.0), "init_steps": 3}, r"finite values in \[0, 1\]"),
        ({"init_steps": -1}, r"init_steps must be an int in \[0, 1000\]"),
        ({"weights": [1.0, 2.0]}, "weights must be 1 finite numbers, one per target"),
        ({"weights": [float("nan")]}, "weights must be 1 finite numbers"),
    ],
)
def test_bad_targets_and_init_images_are_refused_before_any_work(clip, options, message):
    with pytest.raises(ValueError, match=message):
        visualise_batch(embeddings(clip, 1), clip, SETTINGS, [3], **options)
