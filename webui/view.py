"""What the page shows of a run, as plain data: its status line and progress, its frames, its final
pictures with their scores, its downloads. Built from the run's events and ``result.json``; nothing
here imports Gradio, so that it is tested without a browser."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from .runs import Event, step_of

FINAL_PREFIXES = ("best_", "frame_")
DOWNLOAD_SUFFIXES = (".npy", ".json", ".parquet", ".webp", ".gif")


@dataclass
class Watch:
    """A run as the page follows it. ``iterations``: its steps (0 for embeddings only)."""

    seed: int
    iterations: int
    pictures: int = 1
    files: list[Path] = field(default_factory=list)
    step: int | None = None
    similarity: float | None = None
    it_per_s: float | None = None
    ended: str | None = None
    message: str = ""
    _last_frame: tuple[int, float] | None = None

    def add(self, event: Event) -> None:
        if event.kind == "file":
            self.files.append(event.path)
        elif event.kind == "frame":
            if self._last_frame is not None and event.step > self._last_frame[0] and event.at > self._last_frame[1]:
                self.it_per_s = (event.step - self._last_frame[0]) / (event.at - self._last_frame[1])
            self._last_frame = (event.step, event.at)
            self.step = event.step
            sims = [m["similarity"] for m in event.metrics if m.get("similarity") is not None]
            self.similarity = sum(sims) / len(sims) if sims else None
        else:
            self.ended, self.message = event.kind, event.message

    # -- what the page shows ---------------------------------------------------------------------

    def frames(self) -> list[tuple[str, str]]:
        """The intermediate pictures in the order they came, captioned with their step."""
        shown = []
        for path in self.files:
            where = step_of(path)
            if where is not None:
                step, picture = where
                caption = f"step {step}" if self.pictures == 1 else f"step {step} · #{picture}"
                shown.append((str(path), caption))
        return shown

    def finals(self) -> list[tuple[str, str]]:
        """The final pictures: ranked (best-of-N) or in sequence order, captioned with their scores;
        a single picture's last frame once the run is done."""
        result = self.result()
        by_file = {o["file"]: o for o in (result or {}).get("outputs") or []}
        finals = []
        for path in self.files:
            if path.suffix == ".png" and path.name.startswith(FINAL_PREFIXES):
                kind, number = path.stem.split("_")
                label = f"rank {int(number)}" if kind == "best" else f"frame {int(number)}"
                finals.append((str(path), _caption(label, by_file.get(path.name))))
        if not finals and self.ended == "done" and result and result.get("final"):
            last = [p for p in self.files if step_of(p) is not None]
            if last:
                finals.append((str(last[-1]), _caption("final", result["final"])))
        return finals

    def animation(self) -> Path | None:
        """The sequence's animation, else the progress animation, once written."""
        animations = [p for p in self.files if p.suffix in (".webp", ".gif")]
        ordered = sorted(animations, key=lambda p: p.stem == "progress")
        return ordered[0] if ordered else None

    def downloads(self) -> list[str]:
        """The embeddings, result.json, any animation and parquet files (not the PNGs, shown above)."""
        return [str(p) for p in self.files if p.suffix in DOWNLOAD_SUFFIXES]

    def result(self) -> dict | None:
        for path in self.files:
            if path.name == "result.json":
                return json.loads(path.read_text())
        return None

    def progress(self) -> float:
        if self.ended == "done":
            return 1.0
        if not self.iterations or self.step is None:
            return 0.0
        return min(1.0, self.step / self.iterations)

    def status(self) -> str:
        """One line: what the run is doing or how it ended."""
        kept = len(self.files)
        if self.ended == "done":
            return f"Done: {kept} files, seed {self.seed}."
        if self.ended == "cancelled":
            at = f" at step {self.step}" if self.step is not None else ""
            return f"Cancelled{at}: kept the {kept} files written so far (no result.json)."
        if self.ended == "failed":
            return f"Failed: {self.message}. Kept the {kept} files written so far."
        if self.step is None:
            return f"Seed {self.seed}: encoding the caption and sampling the prior…"
        parts = [f"step {self.step} / {self.iterations}"]
        if self.similarity is not None:
            parts.append(f"similarity {self.similarity:.3f}")
        if self.it_per_s is not None:
            parts.append(f"{self.it_per_s:.2f} it/s")
        return f"Seed {self.seed}: " + " · ".join(parts)

    def status_html(self) -> str:
        state = self.ended or "running"
        return status_html(self.status(), state, self.progress())


def status_html(text: str, state: str, progress: float | None = None) -> str:
    """The status box: a line of text (``state``: running, done, cancelled, failed, refused) and
    a progress bar."""
    bar = ""
    if progress is not None:
        bar = f'<progress id="didp-progress" max="1" value="{progress:.4f}"></progress>'
    return (
        f'<div class="didp-status didp-{state}" data-state="{state}">'
        f'<span id="didp-status-text">{html.escape(text)}</span>{bar}</div>'
    )


def refusal_html(message: str) -> str:
    return status_html(f"Refused: {message}", "refused")


def _caption(label: str, score: dict | None) -> str:
    if not score:
        return label
    parts = [label]
    if score.get("seed") is not None:
        parts.append(f"seed {score['seed']}")
    if score.get("similarity_to_text") is not None:
        parts.append(f"to text {score['similarity_to_text']:.3f}")
    if score.get("similarity_to_target") is not None:
        parts.append(f"to target {score['similarity_to_target']:.3f}")
    return " · ".join(parts)
