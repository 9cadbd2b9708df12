"""How the inputs of variations, interpolations, edits, negative prompts and best-of-N combine."""

from __future__ import annotations

import pytest

from pipeline.request import DEFAULT_INTERPOLATION_STEPS, Request, text_or_none


def check(**values) -> Request:
    """``Request.check`` of a caption and ``values``."""
    return Request.check(prompt="a lighthouse", **values)


def test_every_input_at_its_default_passes():
    request = check()
    assert (request.target_count, request.members, request.is_sequence) == (1, 1, False)


@pytest.mark.parametrize(
    ("values", "count", "members", "sequence"),
    [
        ({"interpolate_to": "a cat"}, DEFAULT_INTERPOLATION_STEPS, DEFAULT_INTERPOLATION_STEPS, True),
        ({"interpolate_to": "a cat", "interpolation_steps": 3}, 3, 3, True),
        ({"edit_prompt": "at night"}, 1, 1, False),
        ({"edit_prompt": "at night", "interpolation_steps": 5}, 5, 5, True),
        ({"num_outputs": 4}, 1, 4, False),
        ({"edit_prompt": "at night", "num_outputs": 3}, 1, 3, False),
    ],
)
def test_targets_and_members(values, count, members, sequence):
    request = check(**values)
    assert (request.target_count, request.members, request.is_sequence) == (count, members, sequence)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"interpolate_to": "a", "edit_prompt": "b"}, "interpolate_to and edit_prompt cannot be combined"),
        ({"interpolation_steps": 4}, "interpolation_steps needs interpolate_to or edit_prompt"),
        ({"interpolate_to": "a", "num_outputs": 2}, "num_outputs=2 cannot be combined with an interpolation"),
        ({"edit_prompt": "a", "interpolation_steps": 2, "num_outputs": 2}, "num_outputs=2 cannot be combined"),
        ({"negative_weight": 0.5}, "negative_weight=0.5 needs a negative_prompt"),
        ({"edit_strength": 0.3}, "edit_strength=0.3 needs an edit_prompt"),
        ({"edit_strength": 0.3, "edit_prompt": " "}, "edit_strength=0.3 needs an edit_prompt"),
        ({"animation_format": "gif"}, "animation_format=gif needs an animation: save_animation=true, or a sequence"),
        ({"animation_format": "gif", "edit_prompt": "a"}, "animation_format=gif needs an animation"),
        ({"mode": "embed", "num_outputs": 2}, "num_outputs makes pictures: it needs mode=visualize"),
        ({"mode": "embed", "save_animation": True}, "save_animation makes pictures: it needs mode=visualize"),
        (
            {"mode": "embed", "negative_prompt": "x", "negative_weight": 0.1},
            "negative_weight makes pictures: it needs mode=visualize",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        check(**values)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as error:
        check(interpolation_steps=3, negative_weight=0.2)
    assert "interpolation_steps needs" in str(error.value) and "negative_weight=0.2 needs" in str(error.value)


def test_settings_at_their_defaults_or_with_what_they_need_pass():
    assert check(edit_strength=0.5, animation_format="webp").target_count == 1
    assert check(edit_prompt="at night", edit_strength=0.9).edit_strength == 0.9
    assert check(save_animation=True, animation_format="gif").animation_format == "gif"
    assert check(interpolate_to="a cat", animation_format="gif").animation_format == "gif"
    assert check(edit_prompt="a", interpolation_steps=2, animation_format="gif").is_sequence


def test_embed_mode_takes_sequences_and_negative_prompts():
    assert check(mode="embed", interpolate_to="a cat", negative_prompt="blur").target_count == 8


@pytest.mark.parametrize("blank", ["", " ", "\t\n", "\u3000", None])
def test_a_blank_optional_caption_counts_as_not_given(blank):
    assert text_or_none(blank) is None
    assert text_or_none(" a cat ") == " a cat "
    request = check(interpolate_to=blank, edit_prompt=blank, negative_prompt=blank, interpolation_steps=None)
    assert (request.interpolate_to, request.edit_prompt, request.negative_prompt) == (None, None, None)
    assert check(negative_prompt=" blur ").negative_prompt == " blur "


def test_a_prompt_is_blank_as_the_server_counts_blank_ascii_whitespace_only():
    """The server's \\S counts U+3000 and U+00A0 as characters: such a prompt runs (an empty caption)."""
    assert Request.check(prompt="\u3000\u00a0").prompt == "\u3000\u00a0"
    with pytest.raises(ValueError, match="prompt is blank: give some text"):
        Request.check(prompt=" \t\n ")
