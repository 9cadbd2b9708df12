"""Weighted prompts as VQGAN+CLIP writes them: parts, weights, escapes, and what is refused."""

from __future__ import annotations

import pytest

from pipeline.request import Request
from pipeline.weighted_prompts import MAX_PARTS, WeightedCaption, caption_seed, parse_weighted_prompts


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("storm clouds:0.5 | blur:-0.5", [("storm clouds", 0.5), ("blur", -0.5)]),
        ("a cat", [("a cat", 1.0)]),
        ("a 3:2 photo", [("a 3:2 photo", 1.0)]),  # the text after the last colon is not a number
        ("a 3:2 photo:0.25", [("a 3:2 photo", 0.25)]),
        ("ratio 3:2", [("ratio 3", 2.0)]),  # a number after the last colon is a weight
        ("ratio 3:2:1", [("ratio 3:2", 1.0)]),  # ...so give the weight explicitly to keep it
        ("time 10:30am", [("time 10:30am", 1.0)]),
        ("a:+2 | b: -.5 | c:1e-1 | d:3.", [("a", 2.0), ("b", -0.5), ("c", 0.1), ("d", 3.0)]),
        ("a \\| b:2", [("a | b", 2.0)]),  # an escaped bar is a literal bar
        ("x\\|y | z", [("x|y", 1.0), ("z", 1.0)]),
        ("path a\\b:0.5", [("path a\\b", 0.5)]),  # other backslashes stay as they are
        ("  spaced out  :  2  ", [("spaced out", 2.0)]),
        ("a:nan | b:inf", [("a:nan", 1.0), ("b:inf", 1.0)]),  # not numbers: captions
        ("http://example.com", [("http://example.com", 1.0)]),
    ],
)
def test_parts_and_weights(text, parsed):
    assert parse_weighted_prompts(text) == [WeightedCaption(*part) for part in parsed]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a || b", "weighted_prompts: part 2 is empty"),
        ("a |", "weighted_prompts: part 2 is empty"),
        (":0.5", "weighted_prompts: part 1 (':0.5') has a weight but no caption"),
        ("a:0", "weighted_prompts: part 1 ('a') has weight 0, which does nothing; remove it"),
        ("a:11", "weighted_prompts: part 1 ('a') has weight 11; weights are from -10 to 10"),
        ("a:1e999", "weighted_prompts: part 1 ('a') has weight inf"),
        (" | ".join("abcdefghi"), f"weighted_prompts: 9 parts, over the limit of {MAX_PARTS}"),
    ],
)
def test_what_cannot_be_a_weighted_prompt_is_refused_naming_the_part(text, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_weighted_prompts(text)


def test_the_request_refuses_them_before_any_work_and_keeps_the_prompt_unparsed():
    with pytest.raises(ValueError, match="weighted_prompts: part 2 is empty"):
        Request.check(prompt="x", weighted_prompts="a || b")
    request = Request.check(prompt="a 3:2 photo:0.5 | blur:-1", weighted_prompts="  ")
    assert request.prompt == "a 3:2 photo:0.5 | blur:-1" and request.weighted_prompts is None
    assert request.weighted_captions == [] and request.added_targets == 0


def test_each_part_is_seeded_from_the_requests_seed():
    assert [caption_seed(7, part) for part in (1, 2, 3)] == [8, 9, 10]
    assert caption_seed(100_000, 1) == 0  # wraps past 100000, as num_outputs' seeds do
