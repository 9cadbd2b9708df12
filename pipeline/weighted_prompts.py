"""Weighted prompts as VQGAN+CLIP writes them: ``storm clouds:0.5 | blur:-0.5``.

Parts are separated by ``|`` (``\\|`` is a literal bar). A part's weight is the text after its
last colon when that text is a number (``-0.5``, ``2``, ``1e-1``), so "a 3:2 photo" stays a
caption; otherwise the whole part is the caption, with weight 1. Captions are stripped of
surrounding whitespace. Every problem is a ``ValueError`` starting with ``weighted_prompts:``.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from dip.settings import MAX_DRAWN_SEED

MAX_PARTS = 8
MAX_WEIGHT = 10.0
_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_BAR = "\x00"  # stands for an escaped bar while splitting (a caption holds no NUL: CLIP drops it anyway)


class WeightedCaption(NamedTuple):
    caption: str
    weight: float


def split_parts(text: str) -> list[str]:
    """``text`` split at every ``|`` that no backslash escapes; ``\\|`` becomes ``|``."""
    return [part.replace(_BAR, "|") for part in text.replace("\\|", _BAR).split("|")]


def parse_part(part: str) -> WeightedCaption:
    """One part: ``caption:weight``, or a caption of weight 1 when no number follows its last colon."""
    caption, colon, after = part.rpartition(":")
    if colon and _NUMBER.fullmatch(after):
        return WeightedCaption(caption.strip(), float(after))
    return WeightedCaption(part.strip(), 1.0)


def parse_weighted_prompts(text: str) -> list[WeightedCaption]:
    """Every part of ``text`` with its weight, checked: no empty part or caption, weights in
    ``[-MAX_WEIGHT, MAX_WEIGHT]`` and not 0, at most ``MAX_PARTS`` parts."""
    parts = split_parts(text)
    if len(parts) > MAX_PARTS:
        raise ValueError(f"weighted_prompts: {len(parts)} parts, over the limit of {MAX_PARTS}")
    found = []
    for number, part in enumerate(parts, start=1):
        if not part.strip():
            raise ValueError(f"weighted_prompts: part {number} is empty; write caption:weight | caption:weight")
        caption, weight = parse_part(part)
        if not caption:
            raise ValueError(f"weighted_prompts: part {number} ({part.strip()!r}) has a weight but no caption")
        if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
            raise ValueError(
                f"weighted_prompts: part {number} ({caption!r}) has weight {weight:g}; "
                f"weights are from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
            )
        if weight == 0:
            raise ValueError(
                f"weighted_prompts: part {number} ({caption!r}) has weight 0, which does nothing; remove it"
            )
        found.append(WeightedCaption(caption, weight))
    return found


def caption_seed(seed: int, part: int) -> int:
    """The prior's seed for part ``part`` (1-based) of a request with ``seed``: ``seed + part``,
    wrapping past 100000, so that the caption's embedding is that of a request with this caption
    as its prompt and this seed."""
    return (seed + part) % (MAX_DRAWN_SEED + 1)
