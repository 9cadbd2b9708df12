"""What ``result.json`` holds, defined in one place.

A field that is left unset is left out of the file (``exclude_unset``): ``image`` only for a
picture input, ``truncated_inputs`` only when a caption was cut at CLIP's 77 tokens,
``prior_interpolate_to`` only for an interpolation, ``final`` only with pictures, ``outputs``
only for pictures optimised together, ``captions`` only for a ``captions`` file, ``init`` only
with an init image; ``targets`` for every request but a ``captions`` file. A NaN or an
infinity (a diverged run's loss) is written as ``null``, so the file is always standard JSON.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class PriorChoice(_Model):
    """How the prior's candidate was chosen: each candidate's cosine to the caption's text
    embedding, the chosen one's index, and the sampling steps."""

    candidate_similarities: list[float]
    chosen_candidate: int
    steps: int


class PictureSize(_Model):
    width: int
    height: int


class Score(_Model):
    """One picture: its loss, and its CLIP embedding's cosine to its target and to the prompt's
    text embedding (and to the negative prompt's, with one); ``seed`` for pictures optimised
    together."""

    loss: float | None
    similarity_to_target: float | None
    similarity_to_text: float | None = None
    similarity_to_negative: float | None = None
    seed: int | None = None


class FinalScore(Score):
    """The final (or best) picture's score, at its step."""

    step: int | None = None


class OutputPicture(Score):
    """One of the final pictures of a run that optimised several together, by file name."""

    file: str


class TargetScore(_Model):
    """One target of the visualiser's loss (``weighted_spherical_loss``), in the order of
    ``target_embeddings.npy`` where that file holds them.

    ``source``: ``prompt`` (the prior's embedding of the prompt), ``weighted_prompts``, ``image``,
    ``embedding`` (a row of the file, ``row``), ``negative_prompt`` (its text embedding, pushed away
    from with ``negative_weight``), or for a sequence ``interpolate_to`` or ``edit_prompt`` (one per
    frame, ``row``). ``similarity``: the cosine of the final picture's CLIP embedding to it (its own
    picture for a row; else the best, or the first, picture); null with ``mode=embed``. ``seed``:
    the prior's, for a target the prior sampled. Every entry has every field."""

    source: str
    weight: float
    caption: str | None = None
    row: int | None = None
    seed: int | None = None
    similarity: float | None = None


class InitPhase(_Model):
    """The init phase: its steps, and the pictures' mean squared error to the init image (pixels in
    [0, 1], the mean over the pictures) at its first and its last step."""

    steps: int
    mse_first_step: float | None
    mse_last_step: float | None


class CaptionCounts(_Model):
    """A ``captions`` request: its rows, those embedded (in ``embeddings.parquet``), those set
    aside (in ``errors.parquet``, with the reason) and those cut at CLIP's 77 tokens."""

    rows: int
    embedded: int
    errors: int
    truncated: int


class SearchMatch(_Model):
    """One of the index's images: its rank (1 the best), its id as given to didp index, and its
    cosine similarity to the query."""

    rank: int
    id: str
    score: float


class SearchResult(_Model):
    """``mode=search`` (and, with an index, a visualisation's ``nearest``): the query's kind
    (prior, text, mix, image, embedding, picture), the index searched and the matches, best first."""

    query: str
    text_weight: float | None = None
    k: int
    index_items: int
    index_kind: str  # exact or ivf
    nprobe: int | None = None
    index_recall_at_10: float | None = None  # measured against exact search when the index was built
    matches: list[SearchMatch]
    query_embedding: list[float] | None = None


class Result(_Model):
    inputs: dict[str, Any]
    seed: int
    device: str
    weights: dict[str, str]
    image: PictureSize | None = None
    truncated_inputs: list[str] | None = None
    prior: PriorChoice | None = None
    prior_interpolate_to: PriorChoice | None = None
    prompt_truncated: bool = False
    final: FinalScore | None = None
    outputs: list[OutputPicture] | None = None
    captions: CaptionCounts | None = None
    targets: list[TargetScore] | None = None
    init: InitPhase | None = None
    search: SearchResult | None = None
    nearest: SearchResult | None = None
    timings: dict[str, float] = {}
    versions: dict[str, str] = {}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_unset=True)
