"""One request: every input's type, range, default and description, and how the inputs combine.

This model is the one place where inputs are declared. The Cog adapter (``predict.py``) spells
them out again in ``run``'s signature, because Cog reads them from there; ``tests/test_inputs.py``
keeps the two, ``didp --help`` and the README's table in agreement. The visualiser's inputs take
their ranges and defaults from ``dip.DipSettings``.

Field by field the model checks what the server's schema checks; ``Request.check`` adds how the
inputs combine, with messages that name them. Only values that do something are refused: a form
that sends every input at its default (as Replicate's does) always passes.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dip.network import validate_size
from dip.settings import MAX_DRAWN_SEED, DipSettings

from .inputs import InputSpec
from .weighted_prompts import WeightedCaption, parse_weighted_prompts

DEFAULT_INTERPOLATION_STEPS = 8
DEFAULT_INIT_STEPS = 50
FILE_INPUTS = ("image", "captions", "embedding", "init_image")
CAPTIONS = ("interpolate_to", "edit_prompt", "negative_prompt")
NOT_BLANK = r"\S"
_DIP_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DipSettings)}


def dip_field(name: str, description: str) -> Any:
    """A visualiser input: its default and inclusive range are ``DipSettings``'s."""
    low, high = DipSettings.RANGES[name]
    return Field(_DIP_DEFAULTS[name], ge=low, le=high, description=description)


def text_or_none(value: str | None) -> str | None:
    """An optional caption: blank (empty or only whitespace) counts as not given."""
    return value if value is not None and value.strip() else None


class Request(BaseModel):
    """A request's inputs, checked field by field and as a whole; a blank optional caption
    (``CAPTIONS``) counts as not given and is held as ``None``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Not blank: a character that is not ASCII whitespace, the server's rule (its regex engine's
    # \S counts U+00A0 and U+3000 as characters), checked by _not_blank.
    prompt: Annotated[
        str,
        Field(
            description="Caption to visualise: what CLIP should see.",
            min_length=1,
            json_schema_extra={"pattern": NOT_BLANK},
        ),
    ]
    mode: Literal["visualize", "embed", "search"] = Field(
        "visualize",
        description="visualize: embeddings and images; embed: only the embeddings (fast); "
        "search: the images of the server's index (DIDP_INDEX) nearest the query.",
    )
    offset_type: Literal["none", "1x1", "full"] = Field(
        _DIP_DEFAULTS["offset_type"],
        description="Deformable convolutions: none, 1x1 (stable) or full (wants a lower offset_lr_fac).",
    )
    num_scales: int = dip_field("num_scales", "Depth of the network (at most 6 at 256 px, 7 at 512 px).")
    size: Literal[256, 512] = Field(_DIP_DEFAULTS["size"], description="Side of the square image in pixels.")
    input_noise_strength: float = dip_field(
        "input_noise_strength", "Fresh noise blended into the network's input, ramped down over the run."
    )
    lr: float = dip_field("lr", "MADGRAD learning rate.")
    offset_lr_fac: float = dip_field("offset_lr_fac", "Learning-rate factor for the offset layers.")
    lr_decay: float = dip_field("lr_decay", "Learning rate multiplied by this after every step.")
    param_noise_strength: float = dip_field(
        "param_noise_strength", "Noise added to the weights after each step, ramped down."
    )
    display_freq: int = dip_field(
        "display_freq", "Emit an image every N steps (the last step always; 0: only the last)."
    )
    iterations: int = dip_field("iterations", "Optimisation steps.")
    num_samples_per_batch: int = Field(
        2, ge=1, le=10, description="Prior candidates; the one closest to the caption is kept."
    )
    num_cutouts: int = dip_field("num_cutouts", "CLIP cutouts per step.")
    guidance_scale: float = Field(1.0, ge=0, le=10, description="Prior classifier-free guidance (1: none).")
    prior_steps: int = Field(
        64, ge=1, le=1000, description="Prior sampling steps (1000: the full ancestral loop of the reference)."
    )
    seed: int = Field(
        _DIP_DEFAULTS["seed"],
        ge=-1,
        le=MAX_DRAWN_SEED,
        description="Random seed; -1 draws one (reported in result.json).",
    )
    image: Path | None = Field(
        None,
        description="A picture (PNG, JPEG or WebP, up to 40 megapixels and 100:1) whose CLIP image embedding "
        "becomes the target instead of the prior's: how CLIP sees it. The prompt then describes it.",
    )
    interpolate_to: str | None = Field(
        None,
        description="A second caption: one image per step of the slerp from the prompt's image embedding "
        "to this caption's, and an animation of them.",
    )
    edit_prompt: str | None = Field(
        None, description="Text diff: turn the target towards (edit_prompt - prompt) in CLIP space."
    )
    edit_strength: float = Field(
        0.5, ge=0, le=1, description="How far an edit turns the target (0: not at all, 1: all the way)."
    )
    interpolation_steps: int | None = Field(
        None,
        ge=2,
        le=16,
        description="Targets in an interpolation (default 8) or an edit sequence (an edit without it: one).",
    )
    negative_prompt: str | None = Field(
        None,
        description="What the picture should not be: steers the prior's guidance (guidance_scale > 1) "
        "and, with negative_weight, the visualiser away from it.",
    )
    negative_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How hard the visualiser pushes away from negative_prompt (0: only the prior uses it).",
    )
    num_outputs: int = Field(
        1,
        ge=1,
        le=8,
        description="Images optimised from different seeds, ranked by similarity to the prompt, best first.",
    )
    save_animation: bool = Field(False, description="Also write an animation of every emitted frame.")
    animation_format: Literal["webp", "gif"] = Field("webp", description="Format of the animations.")
    weighted_prompts: str | None = Field(
        None,
        description="More captions, each with a weight, added to the prompt (weight 1): caption:weight parts "
        "separated by vertical bars, as in VQGAN+CLIP. A weight is read only where the text after a part's last "
        "colon is a number ('a 3:2 photo' stays a caption); a backslash before a bar makes it literal. A positive "
        "caption gets its own prior embedding; a negative one pushes the picture away from its text embedding.",
    )
    image_weight: float | None = Field(
        None,
        ge=-10,
        le=10,
        description="With image: mix instead of replace. The picture's CLIP embedding joins the prompt's prior "
        "embedding as one more target, with this weight (the prompt's is 1).",
    )
    embedding: Path | None = Field(
        None,
        description="A CLIP image embedding to show instead of the prior's: a .npy file of float32 [d] or [1, d]; "
        "[k, d] gives k pictures optimised together (frame_NN.png). The prompt still names the picture for "
        "scoring. With mode=search: the query ([d] or [1, d]) instead of the caption's.",
    )
    init_image: Path | None = Field(
        None,
        description="A picture (PNG, JPEG or WebP) that the network first learns to reproduce, for init_steps "
        "steps; the CLIP-guided iterations then start from it.",
    )
    init_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description=f"Steps fitting the network to init_image before the CLIP-guided iterations "
        f"(default {DEFAULT_INIT_STEPS}).",
    )
    k: int = Field(
        20, ge=1, le=100, description="mode=search: how many of the index's nearest images to return, best first."
    )
    text_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="mode=search: the query mixes the prior's image embedding with the caption's text embedding "
        "by this weight (0: the prior's alone, 1: the text embedding alone).",
    )
    captions: Path | None = Field(
        None,
        description="Many captions to embed in one request (mode=embed): text with one caption a line, or CSV, "
        "JSONL or Parquet with id and caption columns, up to 10,000 rows. Gives embeddings.parquet; the "
        "prompt then only names the request.",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not re.search(NOT_BLANK, value, re.ASCII):
            raise ValueError("prompt is blank: give some text")
        return value

    @field_validator(*CAPTIONS)
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return text_or_none(value)

    @field_validator("weighted_prompts")
    @classmethod
    def _parsed(cls, value: str | None) -> str | None:
        value = text_or_none(value)
        if value is not None:
            parse_weighted_prompts(value)  # refused here, naming the part, before any work
        return value

    @model_validator(mode="after")
    def _combinations(self) -> Request:
        problems = self.combination_problems()
        if problems:
            raise ValueError("; ".join(problems))
        validate_size(self.size, self.num_scales)
        return self

    @classmethod
    def check(cls, **values: Any) -> Request:
        """The request, or a ``ValueError`` whose message names every input that is wrong, or
        that cannot go with another (pydantic's wording for a single field, ours for combinations)."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise ValueError("; ".join(_message(problem) for problem in error.errors())) from None

    def combination_problems(self) -> list[str]:
        """What cannot go together, each naming its inputs."""
        problems = []
        if self.interpolate_to and self.edit_prompt:
            problems.append("interpolate_to and edit_prompt cannot be combined: give one of them")
        if self.interpolation_steps is not None and not (self.interpolate_to or self.edit_prompt):
            problems.append("interpolation_steps needs interpolate_to or edit_prompt")
        if self.num_outputs > 1 and self.is_sequence:
            problems.append(
                f"num_outputs={self.num_outputs} cannot be combined with an interpolation or an edit sequence, "
                "which already give one image per target: set num_outputs=1"
            )
        if self.negative_weight > 0 and not self.negative_prompt:
            problems.append(f"negative_weight={self.negative_weight:g} needs a negative_prompt")
        if self.edit_strength != _default("edit_strength") and not self.edit_prompt:
            problems.append(f"edit_strength={self.edit_strength:g} needs an edit_prompt")
        if self.animation_format != _default("animation_format") and not (self.save_animation or self.is_sequence):
            problems.append(
                f"animation_format={self.animation_format} needs an animation: save_animation=true, "
                "or a sequence (interpolate_to, or edit_prompt with interpolation_steps)"
            )
        problems += self._composition_problems()
        if self.captions is not None:
            if self.mode != "embed":
                problems.append("captions makes embeddings only: it needs mode=embed")
            alone = {
                "image": self.image is not None,
                "interpolate_to": self.interpolate_to,
                "edit_prompt": self.edit_prompt,
                "weighted_prompts": self.weighted_prompts,
            }
            problems += [f"captions cannot be combined with {name}" for name, on in alone.items() if on]
        problems += self._search_problems()
        if self.mode in ("embed", "search"):
            pictures_only = {
                "num_outputs": self.num_outputs > 1,
                "save_animation": self.save_animation,
                "negative_weight": self.negative_weight > 0,
                "embedding": self.embedding is not None and self.mode == "embed",  # a query with mode=search
                "init_image": self.init_image is not None,
            }
            problems += [f"{name} makes pictures: it needs mode=visualize" for name, on in pictures_only.items() if on]
        return problems

    def _composition_problems(self) -> list[str]:
        """How weighted prompts, mixed images, embeddings and init images go with the rest."""
        problems = []
        if self.image_weight is not None and self.image is None:
            problems.append(f"image_weight={self.image_weight:g} needs an image to mix in")
        if self.init_steps is not None and self.init_image is None:
            problems.append(f"init_steps={self.init_steps} needs an init_image")
        if self.embedding is not None and self.image is not None:
            problems.append("embedding and image both give the target: give one of them")
        sequences = {"interpolate_to": self.interpolate_to, "edit_prompt": self.edit_prompt}
        targets = {
            "weighted_prompts": self.weighted_prompts is not None,
            "image_weight": self.image_weight is not None,
            "embedding": self.embedding is not None,
        }
        for name, on in targets.items():
            for other, given in sequences.items():
                if on and given:
                    problems.append(f"{name} cannot be combined with {other}, which makes its own targets")
        return problems

    @property
    def weighted_captions(self) -> list[WeightedCaption]:
        """``weighted_prompts`` parsed: each caption with its weight (none without it)."""
        return parse_weighted_prompts(self.weighted_prompts) if self.weighted_prompts else []

    @property
    def added_targets(self) -> int:
        """Targets of the loss beside each picture's own: the weighted captions and a mixed-in image."""
        return len(self.weighted_captions) + (self.image_weight is not None)

    @property
    def resolved_init_steps(self) -> int:
        """Steps of the init phase: 0 without an init image."""
        if self.init_image is None:
            return 0
        return DEFAULT_INIT_STEPS if self.init_steps is None else self.init_steps

    def _search_problems(self) -> list[str]:
        if self.mode != "search":
            searching = {
                "k": self.k != _default("k"),
                "text_weight": self.text_weight != _default("text_weight"),
            }
            return [f"{name} is a search input: it needs mode=search" for name, on in searching.items() if on]
        problems = [
            f"mode=search cannot be combined with {name}"
            for name, on in {
                "interpolate_to": self.interpolate_to,
                "edit_prompt": self.edit_prompt,
                "weighted_prompts": self.weighted_prompts,
                "image_weight": self.image_weight is not None,
            }.items()
            if on
        ]
        if self.text_weight != _default("text_weight") and (self.image is not None or self.embedding is not None):
            problems.append("text_weight mixes the caption's embeddings: it cannot be combined with image or embedding")
        return problems

    @property
    def is_sequence(self) -> bool:
        """Several targets: an interpolation, or an edit with ``interpolation_steps``."""
        return bool(self.interpolate_to) or (bool(self.edit_prompt) and self.interpolation_steps is not None)

    @property
    def target_count(self) -> int:
        if self.interpolate_to:
            return self.interpolation_steps or DEFAULT_INTERPOLATION_STEPS
        if self.edit_prompt:
            return self.interpolation_steps or 1
        return 1

    @property
    def members(self) -> int:
        """Images optimised together: one per target, or ``num_outputs`` of one target."""
        return max(self.target_count, self.num_outputs)

    def dip_settings(self, seed: int) -> DipSettings:
        """The visualiser's settings for this request, starting from ``seed`` (drawn already)."""
        names = [field.name for field in dataclasses.fields(DipSettings) if field.name != "seed"]
        return DipSettings(**{name: getattr(self, name) for name in names}, seed=seed).validate()

    def echo(self) -> dict[str, Any]:
        """The inputs as ``result.json`` records them: a file input as ``"(a file)"``, never its path."""
        inputs = self.model_dump(mode="json")
        for name in FILE_INPUTS:
            inputs[name] = None if getattr(self, name) is None else "(a file)"
        return inputs

    @classmethod
    def input_specs(cls) -> list[InputSpec]:
        """Every input as ``InputSpec``, in declaration order."""
        return [_spec(name, order, info) for order, (name, info) in enumerate(cls.model_fields.items())]


def _default(name: str) -> Any:
    return Request.model_fields[name].default


def _message(problem: dict) -> str:
    if problem["type"] == "value_error":  # ours, from a validator: already names its inputs
        return str(problem["ctx"]["error"])
    where = ".".join(map(str, problem["loc"]))
    return f"{where}: {problem['msg']}" if where else problem["msg"]


_KINDS = {str: "string", int: "integer", float: "float", bool: "bool", Path: "path"}


def _spec(name: str, order: int, info) -> InputSpec:
    annotation, optional = info.annotation, False
    if isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation):
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
        optional = True
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    rules: dict[str, Any] = {}
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Ge):
            rules["ge"] = rule.ge
        elif isinstance(rule, annotated_types.Le):
            rules["le"] = rule.le
        elif isinstance(rule, annotated_types.MinLen):
            rules["min_length"] = rule.min_length
        elif isinstance(rule, annotated_types.MaxLen):
            rules["max_length"] = rule.max_length
    if isinstance(info.json_schema_extra, dict) and "pattern" in info.json_schema_extra:
        rules["regex"] = info.json_schema_extra["pattern"]
    return InputSpec(
        name=name,
        order=order,
        kind=_KINDS[annotation],
        description=info.description,
        default=None if info.is_required() else info.default,
        optional=optional,
        choices=choices,
        **rules,
    )
