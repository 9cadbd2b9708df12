"""Several pictures optimised together (best-of-N, interpolations) and the negative embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip import DipSettings, visualise, visualise_batch
from dip.loss import spherical_distance
from prior.factory import random_models

SETTINGS = DipSettings(size=64, num_scales=3, num_cutouts=4, iterations=3, display_freq=1, seed=0)


@pytest.fixture(scope="module")
def clip():
    return random_models("tiny").clip


def target(clip, seed: int) -> torch.Tensor:
    return torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(seed))


def test_each_picture_of_a_batch_is_the_run_of_its_own_seed(clip):
    """fp32. The only difference is the rounding of CLIP's matmuls over 12 cutouts instead of 4:
    over 4, some of the tiny CLIP's linears are too small for oneDNN and run as ``F.linear``
    (``backbone.clip.linear``), 1e-6 apart. The pictures of steps 1 and 2 agree within 1e-4 and the
    metrics of every step within 1e-5. MADGRAD scales each weight's step by that weight's own
    gradient history, so early on a weight with a near-zero gradient steps on its rounding: by
    step 3 the pictures were up to 1e-3 apart (measured up to 9.7e-4), so within 2e-3 there."""
    seeds = [3, 4, 5]
    goal = target(clip, 0)
    batched = list(visualise_batch(goal, clip, SETTINGS, seeds, precision="fp32"))
    assert [frame.step for frame in batched] == [1, 2, 3]
    for i, seed in enumerate(seeds):
        alone = list(visualise(goal, clip, SETTINGS.replace(seed=seed), precision="fp32"))
        for together, single in zip(batched, alone, strict=True):
            atol = 2e-3 if together.step == 3 else 1e-4
            torch.testing.assert_close(together.images[i], single.image, atol=atol, rtol=0)
            assert together.metrics[i]["seed"] == seed
            for key in ("loss", "similarity"):
                assert together.metrics[i][key] == pytest.approx(single.metrics[key], abs=1e-5)
    assert not torch.equal(batched[-1].images[0], batched[-1].images[1])  # different seeds, different pictures


def test_equal_seeds_share_the_start_and_differ_only_by_target(clip):
    settings = SETTINGS.replace(iterations=4, display_freq=1)
    same = list(visualise_batch(target(clip, 0), clip, settings, [7, 7], precision="fp32"))
    assert all(torch.equal(frame.images[0], frame.images[1]) for frame in same)
    targets = torch.stack([target(clip, 0), target(clip, 1)])
    apart = list(visualise_batch(targets, clip, settings, [7, 7], precision="fp32"))
    assert torch.equal(apart[0].images[0], apart[0].images[1])  # step 1 renders the shared initialisation
    assert not torch.equal(apart[-1].images[0], apart[-1].images[1])


@pytest.mark.parametrize("offset_type", ["1x1", "full"])
def test_deformable_networks_batch_too(clip, offset_type):
    settings = SETTINGS.replace(offset_type=offset_type, iterations=2)
    frames = list(visualise_batch(target(clip, 0), clip, settings, [1, 2], precision="fp32"))
    assert frames[-1].images.shape == (2, 3, 64, 64)


def test_the_negative_term_is_the_closed_form_and_weight_0_changes_nothing(clip):
    settings = SETTINGS.replace(iterations=0)
    goal, negative = target(clip, 0), target(clip, 1)
    (plain,) = visualise(goal, clip, settings, precision="fp32")
    (zero,) = visualise(goal, clip, settings, precision="fp32", negative=negative, negative_weight=0.0)
    assert zero.metrics["loss"] == plain.metrics["loss"]
    torch.testing.assert_close(zero.image, plain.image, atol=0, rtol=0)
    (pushed,) = visualise(goal, clip, settings, precision="fp32", negative=negative, negative_weight=0.5)
    # the same cutouts (same seed): loss = d(target) - 0.5 * d(negative), per cutout, averaged
    from dip.loop import _Run

    run = _Run(settings, settings.seed, clip, torch.device("cpu"))
    with torch.no_grad():
        cutouts = run.make_cutouts(run.net(run.net_input).float().contiguous())
        embeds = clip.encode_image(clip.normalize(cutouts)).float()
    expected = spherical_distance(embeds, F.normalize(goal, dim=0)).mean()
    expected -= 0.5 * spherical_distance(embeds, F.normalize(negative, dim=0)).mean()
    assert pushed.metrics["loss"] == pytest.approx(expected.item(), abs=1e-6)
    similarity = (clip.embed_image(pushed.image[None]) @ F.normalize(negative, dim=0)).item()
    assert pushed.metrics["similarity_to_negative"] == pytest.approx(similarity, abs=1e-5)


def test_a_negative_pushes_the_picture_away_from_it(clip):
    """On the tiny CLIP, 20 steps with weight 1 end at least 0.02 less similar to the negative."""
    settings = SETTINGS.replace(iterations=20, display_freq=0, lr=0.01)
    goal, negative = target(clip, 0), target(clip, 1)
    (plain,) = visualise(goal, clip, settings, precision="fp32", negative=negative, negative_weight=0.0)
    (pushed,) = visualise(goal, clip, settings, precision="fp32", negative=negative, negative_weight=1.0)
    to_negative = F.normalize(negative, dim=0)
    before = (clip.embed_image(plain.image[None]) @ to_negative).item()
    after = (clip.embed_image(pushed.image[None]) @ to_negative).item()
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(targets=torch.zeros(2, 64), seeds=[1, 2, 3]),
            r"targets must have shape \[64\], \[3, 64\] \(one per seed\) or \[3, t, 64\]",
        ),
        (dict(targets=torch.zeros(5), seeds=[1]), r"targets must have shape \[64\]"),
        (dict(targets=torch.zeros(64), seeds=[]), "seeds must hold at least one seed"),
        (dict(targets=torch.zeros(64), seeds=[1, -5]), r"every seed must be between -1 and 4294967295"),
        (dict(targets=torch.zeros(64), seeds=[2**70]), r"every seed must be between -1 and 4294967295"),
        (dict(targets=torch.zeros(64), seeds=[1], negative_weight=-1.0), "negative_weight must be at least 0"),
        (dict(targets=torch.zeros(64), seeds=[1], negative=torch.zeros(3)), r"negative must have shape \[64\]"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(clip, kwargs, message):
    with pytest.raises(ValueError, match=message):
        visualise_batch(clip=clip, settings=SETTINGS, **kwargs)
