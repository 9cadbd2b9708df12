"""The Gradio page: the form from ``webui.form``, the run from ``webui.runs``, shown with ``webui.view``.

One run at a time: the Run button's event has a queue of its own with one place, so that a second
run waits in the queue (its position shown in the status box) until the first ends.
"""

from __future__ import annotations

import gradio as gr

from .form import Widget, check, widgets
from .runs import Busy, Runs
from .view import Watch, refusal_html, status_html

TINY_NOTE = (
    "**Tiny weights**: CLIP and the prior are random models from a fixed seed. This is a check that "
    "the whole pipeline runs; **the pictures and embeddings mean nothing**. Start with "
    "`--weights laion` for CLIP's real view."
)
CSS = """
.didp-status { padding: 0.5em 0.75em; border-radius: 6px; background: var(--block-background-fill); }
.didp-status progress { width: 100%; display: block; margin-top: 0.4em; }
.didp-refused, .didp-failed { background: #fde8e8; color: #8b1010; font-weight: 600; }
.didp-cancelled { background: #fff4dc; }
.didp-done { background: #e6f6e6; }
#didp-tiny-note { border-left: 4px solid #d98c00; padding-left: 0.75em; }
"""


def component(widget: Widget) -> gr.components.Component:
    """The Gradio component of one form widget (label, description, range, default as the API's)."""
    spec, common = widget.spec, {"label": widget.label, "info": widget.info, "elem_id": f"input-{widget.name}"}
    if widget.widget == "caption":
        return gr.Textbox(value=widget.initial, lines=2, placeholder="a lighthouse on a cliff at night", **common)
    if widget.widget == "text":
        numeric = spec.kind in ("integer", "float")
        hint = "a number, or blank" if numeric else "blank: not given" if spec.optional else None
        return gr.Textbox(value=widget.initial, lines=1, placeholder=hint, **common)
    if widget.widget == "checkbox":
        return gr.Checkbox(value=bool(widget.initial), **common)
    if widget.widget == "choice":
        choices = [(str(choice), choice) for choice in spec.choices]
        if len(choices) <= 4:
            return gr.Radio(choices=choices, value=widget.initial, **common)
        return gr.Dropdown(choices=choices, value=widget.initial, **common)
    if widget.widget == "slider":
        return gr.Slider(minimum=spec.ge, maximum=spec.le, step=widget.step, value=widget.initial, **common)
    if widget.widget == "number":  # out of range is refused by the request, in its words, not by Gradio
        precision = 0 if spec.kind == "integer" else None
        return gr.Number(value=widget.initial, step=widget.step, precision=precision, **common)
    # uploads take no description: it stands above them
    gr.Markdown(f"**{widget.label}**: {widget.info}", elem_classes=["didp-upload-info"])
    del common["info"]
    if widget.widget == "picture":
        return gr.Image(type="filepath", sources=["upload"], height=200, **common)
    return gr.File(type="filepath", file_count="single", **common)


def build(runs: Runs, tiny: bool, weights: str) -> gr.Blocks:
    form = widgets()
    # Gradio keeps a copy of every file it serves: those older than a day go, hourly
    with gr.Blocks(title="deep-image-diffusion-prior", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown(
            "# What CLIP sees\nA caption becomes CLIP's text embedding, the diffusion prior turns it into an "
            "image embedding, and a deep-image-prior network is optimised until CLIP sees that embedding. "
            f"Weights: `{weights}`."
        )
        if tiny:
            gr.Markdown(TINY_NOTE, elem_id="didp-tiny-note")
        inputs: list[gr.components.Component] = []
        with gr.Row():
            with gr.Column(scale=2):
                for widget in (w for w in form if w.everyday):
                    inputs.append(component(widget))
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="didp-run")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="didp-cancel")
                with gr.Accordion("Advanced", open=False, elem_id="didp-advanced"):
                    for widget in (w for w in form if not w.everyday):
                        inputs.append(component(widget))
            with gr.Column(scale=3):
                status = gr.HTML(status_html("Ready.", "ready"), elem_id="didp-status")
                frames = gr.Gallery(
                    label="Frames, as they come", columns=5, height=190, fit_columns=False, elem_id="didp-frames"
                )
                finals = gr.Gallery(
                    label="Final picture(s), best first",
                    columns=3,
                    height=340,
                    object_fit="contain",
                    fit_columns=False,  # a single picture stays square, not stretched across
                    elem_id="didp-final",
                )
                animation = gr.Image(
                    label="Animation (sequences, save_animation)",
                    type="filepath",
                    interactive=False,
                    height=260,
                    visible=False,  # shown once a run writes an animation
                    elem_id="didp-animation",
                )
                downloads = gr.File(
                    label="Embeddings (.npy), result.json, animations",
                    file_count="multiple",
                    interactive=False,
                    elem_id="didp-downloads",
                )
                with gr.Row():
                    seed_used = gr.Number(
                        None, label="Seed of this run", interactive=False, precision=0, elem_id="didp-seed"
                    )
                    reuse = gr.Button("Use this seed again", elem_id="didp-reuse-seed")

        outputs = [status, frames, finals, animation, downloads, seed_used]
        by_name = {widget.name: c for widget, c in zip(form, inputs, strict=True)}  # form: everyday first

        def run(values: dict, request: gr.Request):
            owner = getattr(request, "session_hash", None)
            try:
                job = runs.prepare(check(form, [values[c] for c in inputs]))
                runs.wait_idle(timeout=60)  # a run whose page went away is being cancelled
                started = runs.start(job, owner=owner)
            except (ValueError, Busy) as error:  # before any work: inputs, combinations, budget, busy
                yield refusal_html(str(error)), None, None, gr.update(value=None, visible=False), None, None
                return
            settings = job.settings
            watch = Watch(
                seed=settings.seed,
                iterations=settings.iterations if job.request.mode == "visualize" else 0,
                pictures=job.request.members,
            )
            yield watch.status_html(), [], [], gr.update(value=None, visible=False), None, settings.seed
            try:
                for event in started.follow():
                    watch.add(event)
                    if event.kind == "file" and event.path.suffix not in (".png", ".json", ".webp", ".gif"):
                        continue  # an embedding: shown with the downloads at the end
                    yield _shown(watch)
                yield _shown(watch)
            finally:  # the page went away (closed, reloaded): its run stops rather than hold the model
                if started.ended is None:
                    runs.cancel(owner=owner)

        def _shown(watch: Watch):
            return (
                watch.status_html(),
                watch.frames(),
                watch.finals(),
                gr.update(value=str(watch.animation()) if watch.animation() else None, visible=bool(watch.animation())),
                watch.downloads() or None,
                watch.seed,
            )

        def cancel(request: gr.Request):
            runs.cancel(owner=getattr(request, "session_hash", None))

        run_button.click(
            run,
            inputs=set(inputs),
            outputs=outputs,
            concurrency_limit=1,
            concurrency_id="didp-run",
            show_progress="full",  # the queue position, on the status box only
            show_progress_on=[status],
        )
        cancel_button.click(cancel, inputs=None, outputs=None, queue=False)
        seed_input = by_name.get("seed")
        if seed_input is not None:
            reuse.click(lambda seed: seed, inputs=seed_used, outputs=seed_input, queue=False)
    return page


def theme() -> gr.themes.Base:
    """The default theme with the system's fonts: the page loads nothing from outside."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
