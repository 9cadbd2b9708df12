"""DipSettings: the original inputs, their ranges, and the seed."""

import dataclasses

import pytest

from dip.settings import MAX_DRAWN_SEED, DipSettings, resolve_seed


def test_defaults_are_the_original_models():
    s = DipSettings()
    assert (s.num_scales, s.offset_type, s.input_noise_strength, s.lr, s.offset_lr_fac, s.lr_decay) == (
        6,
        "none",
        0.0,
        1e-3,
        1.0,
        0.995,
    )
    assert (s.param_noise_strength, s.display_freq, s.iterations, s.num_cutouts, s.size, s.seed) == (
        0.0,
        25,
        250,
        8,
        256,
        -1,
    )
    assert s.validate() is s


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DipSettings().lr = 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_scales", 0),
        ("num_scales", 11),
        ("offset_type", "random"),
        ("input_noise_strength", 1.5),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("offset_lr_fac", 11.0),
        ("lr_decay", 1.01),
        ("param_noise_strength", -0.1),
        ("display_freq", -1),
        ("display_freq", 2.5),
        ("iterations", 1001),
        ("num_cutouts", 3),
        ("size", 2048),
        ("seed", -2),
        ("iterations", True),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        DipSettings(**{field: value}).validate()


def test_validate_rejects_too_many_scales_for_the_size():
    with pytest.raises(ValueError, match=r"num_scales=7 does not fit size=256.*at most num_scales=6"):
        DipSettings(size=256, num_scales=7).validate()
    DipSettings(size=512, num_scales=7).validate()


def test_ints_are_accepted_for_float_fields():
    DipSettings(lr=1, lr_decay=1, input_noise_strength=0).validate()


def test_resolve_seed_keeps_an_explicit_seed():
    assert resolve_seed(1234) == 1234


def test_resolve_seed_draws_a_valid_seed_for_minus_one():
    seeds = {resolve_seed(-1) for _ in range(20)}
    assert all(0 <= s <= MAX_DRAWN_SEED for s in seeds)
    assert len(seeds) > 1
    DipSettings(seed=seeds.pop()).validate()
