"""What a request asks for beyond one caption and one picture, checked as a whole before any work.

The schema checks each input on its own (types, ranges, choices); this checks how they combine,
with messages that name the inputs. Only values that do something are refused: a form that sends
every input at its default (as Replicate's does) always passes.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INTERPOLATION_STEPS = 8


def text_or_none(value: str | None) -> str | None:
    """An optional caption: blank (empty or only whitespace) counts as not given."""
    return value if value is not None and value.strip() else None


@dataclass(frozen=True)
class Request:
    """The request's inputs beyond one caption and one picture; a blank optional caption
    (``CAPTIONS``) counts as not given and is held as ``None``."""

    CAPTIONS = ("interpolate_to", "edit_prompt", "negative_prompt")

    mode: str = "visualize"
    interpolate_to: str | None = None
    edit_prompt: str | None = None
    edit_strength: float = 0.5
    interpolation_steps: int | None = None
    negative_prompt: str | None = None
    negative_weight: float = 0.0
    num_outputs: int = 1
    save_animation: bool = False
    animation_format: str = "webp"

    def __post_init__(self):
        for name in self.CAPTIONS:
            object.__setattr__(self, name, text_or_none(getattr(self, name)))

    @classmethod
    def check(cls, **values) -> Request:
        """The request, or a ``ValueError`` that names the inputs that cannot go together."""
        request = cls(**values)
        problems = []
        if request.interpolate_to and request.edit_prompt:
            problems.append("interpolate_to and edit_prompt cannot be combined: give one of them")
        if request.interpolation_steps is not None and not (request.interpolate_to or request.edit_prompt):
            problems.append("interpolation_steps needs interpolate_to or edit_prompt")
        if request.num_outputs > 1 and request.is_sequence:
            problems.append(
                f"num_outputs={request.num_outputs} cannot be combined with an interpolation or an edit sequence, "
                "which already give one image per target: set num_outputs=1"
            )
        if request.negative_weight > 0 and not request.negative_prompt:
            problems.append(f"negative_weight={request.negative_weight:g} needs a negative_prompt")
        if request.edit_strength != cls.edit_strength and not request.edit_prompt:
            problems.append(f"edit_strength={request.edit_strength:g} needs an edit_prompt")
        if request.animation_format != cls.animation_format and not (request.save_animation or request.is_sequence):
            problems.append(
                f"animation_format={request.animation_format} needs an animation: save_animation=true, "
                "or a sequence (interpolate_to, or edit_prompt with interpolation_steps)"
            )
        if request.mode == "embed":
            pictures_only = {
                "num_outputs": request.num_outputs > 1,
                "save_animation": request.save_animation,
                "negative_weight": request.negative_weight > 0,
            }
            problems += [f"{name} makes pictures: it needs mode=visualize" for name, on in pictures_only.items() if on]
        if problems:
            raise ValueError("; ".join(problems))
        return request

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
