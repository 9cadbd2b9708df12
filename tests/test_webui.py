"""The web page's logic without a browser: the form built from the request model, the refusals it
shows, and runs on the tiny pipeline (watched, cancelled, one at a time). The browser test is
``tests/test_webui_browser.py`` (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.inputs import InputSpec
from pipeline.request import Request
from pipeline.runner import Pipeline
from testkit.inputs import SMALL
from webui.form import EVERYDAY, check, request_values, widget_for, widgets
from webui.runs import Busy, Runs, step_of
from webui.view import Watch, refusal_html

ROOT = Path(__file__).resolve().parents[1]


# -- the form -------------------------------------------------------------------------------------


def test_every_input_of_the_model_has_one_widget_everyday_ones_first():
    specs = Request.input_specs()
    form = widgets()
    assert sorted(w.name for w in form) == sorted(spec.name for spec in specs)
    assert [w.name for w in form[: len(EVERYDAY)]] == list(EVERYDAY)
    assert all(w.everyday for w in form[: len(EVERYDAY)])
    advanced = [w.name for w in form[len(EVERYDAY) :]]
    assert advanced == [spec.name for spec in specs if spec.name not in EVERYDAY]  # the model's order
    assert not any(w.everyday for w in form[len(EVERYDAY) :])


def test_widgets_carry_the_api_ranges_defaults_and_descriptions():
    by_name = {w.name: w for w in widgets()}
    specs = {spec.name: spec for spec in Request.input_specs()}
    for name, widget in by_name.items():
        assert widget.spec == specs[name]
        assert (specs[name].description or "") in widget.info
    iterations = by_name["iterations"]
    assert (iterations.widget, iterations.spec.ge, iterations.spec.le, iterations.initial) == ("slider", 0, 1000, 250)
    assert iterations.info == "Optimisation steps. 0 to 1000. Default 250."
    assert by_name["prompt"].widget == "caption" and by_name["prompt"].initial == ""
    assert by_name["seed"].widget == "number"  # -1 to 100000: typed, not dragged
    assert by_name["size"].widget == "choice" and by_name["size"].spec.choices == (256, 512)
    assert by_name["mode"].widget == "choice" and by_name["mode"].initial == "visualize"
    assert by_name["lr_decay"].step == pytest.approx(0.001)  # fine enough for its default, 0.995
    assert by_name["guidance_scale"].step == pytest.approx(0.01)
    assert by_name["interpolation_steps"].widget == "text"  # optional: blank is not given
    assert by_name["interpolation_steps"].info.endswith("2 to 16. Optional.")
    assert by_name["save_animation"].widget == "checkbox"
    assert by_name["image"].widget == "picture"  # a picture upload
    assert by_name["captions"].widget == "file"  # any file
    for name in ("interpolate_to", "edit_prompt", "negative_prompt"):
        assert by_name[name].widget == "text" and not by_name[name].everyday


def test_inputs_added_to_the_model_later_render_under_advanced():
    specs = Request.input_specs()
    later = [
        InputSpec("weighted_prompts", len(specs), "string", "Captions with weights.", optional=True),
        InputSpec("init_image", len(specs) + 1, "path", "A picture to start from.", optional=True),
        InputSpec("embedding", len(specs) + 2, "path", "An image embedding (.npy).", optional=True),
        InputSpec("init_steps", len(specs) + 3, "integer", "Steps.", default=0, ge=0, le=100),
        InputSpec("search_k", len(specs) + 4, "tensor", "A kind this page does not know."),
    ]
    form = widgets(specs + later)
    kinds = {w.name: (w.widget, w.everyday) for w in form}
    assert kinds["weighted_prompts"] == ("text", False)
    assert kinds["init_image"] == ("picture", False)
    assert kinds["embedding"] == ("file", False)
    assert kinds["init_steps"] == ("slider", False)
    assert kinds["search_k"] == ("text", False)
    assert [w.name for w in form[-5:]] == [spec.name for spec in later]
    mode = InputSpec("mode", 1, "string", "Modes.", default="visualize", choices=("visualize", "embed", "search"))
    assert widget_for(mode).widget == "choice"


def test_form_values_become_the_request():
    form = widgets()
    values = {w.name: w.initial for w in form}
    values.update(prompt="a lighthouse", iterations=12.0, seed=7.0, interpolate_to="  ", num_outputs=2)
    values.update(interpolation_steps=" ")
    inputs = request_values(form, [values[w.name] for w in form])
    assert inputs["iterations"] == 12 and isinstance(inputs["iterations"], int)
    assert inputs["seed"] == 7 and isinstance(inputs["seed"], int)
    assert "interpolate_to" not in inputs and "image" not in inputs and "interpolation_steps" not in inputs
    request = check(form, [values[w.name] for w in form])
    assert (request.prompt, request.iterations, request.num_outputs, request.seed) == ("a lighthouse", 12, 2, 7)
    defaults = Request(prompt="a lighthouse", iterations=12, seed=7, num_outputs=2)
    assert request == defaults  # every other widget at its default is the model's default


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"iterations": 2000}, "iterations: Input should be less than or equal to 1000"),
        ({"num_outputs": 2, "interpolate_to": "a forest"}, "num_outputs=2 cannot be combined with an interpolation"),
        ({"interpolation_steps": "4"}, "interpolation_steps needs interpolate_to or edit_prompt"),
        ({"interpolation_steps": "many"}, "interpolation_steps: Input should be a valid integer"),
        ({"interpolate_to": "a forest", "interpolation_steps": "40"}, "interpolation_steps: Input should be less"),
        ({"negative_weight": 0.3}, "negative_weight=0.3 needs a negative_prompt"),
        ({"seed": 2.5}, "seed: Input should be a valid integer"),
    ],
)
def test_refusals_name_the_inputs(changes, message):
    form = widgets()
    values = {w.name: w.initial for w in form} | {"prompt": "a lighthouse"} | changes
    with pytest.raises(ValueError) as refused:
        check(form, [values[w.name] for w in form])
    assert message in str(refused.value)
    shown = refusal_html(str(refused.value))
    assert 'data-state="refused"' in shown and "Refused: " in shown


def test_gradio_is_not_imported_by_predict_or_the_pipeline():
    code = "import sys, predict, pipeline.runner, commands.didp, webui.form, webui.runs, webui.view; "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'fastapi', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_page_builds_from_the_model():
    gradio = pytest.importorskip("gradio")
    from webui.page import build

    runs = Runs(Path("/nonexistent"))
    page = build(runs, tiny=True, weights="tiny")
    assert isinstance(page, gradio.Blocks)
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    for spec in Request.input_specs():
        assert f"input-{spec.name}" in ids
    assert {"didp-run", "didp-cancel", "didp-frames", "didp-final", "didp-downloads", "didp-tiny-note"} <= ids
    image = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "input-image")
    assert isinstance(image, gradio.Image)


# -- runs on the tiny pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = Runs(tmp_path_factory.mktemp("ui-files"))
    runs.pipeline = Pipeline(
        "tiny", output_root=tmp_path_factory.mktemp("ui-outputs"), device="cpu", on_frame=runs.on_frame
    )
    return runs


def _events(run, timeout=120.0):
    events, started = [], time.monotonic()
    for event in run.follow():
        events.append(event)
        assert time.monotonic() - started < timeout
    return events


def test_a_run_streams_frames_then_its_files_and_keeps_them(runs):
    job = runs.prepare(Request.check(prompt="a lighthouse", **{**SMALL, "iterations": 2, "display_freq": 1}, seed=5))
    run = runs.start(job)
    events = _events(run)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done"
    steps = [e.step for e in events if e.kind == "frame"]
    assert steps == [1, 2]
    names = [e.path.name for e in events if e.kind == "file"]
    assert names == [
        "text_tokens.npy",
        "text_embedding.npy",
        "image_embedding.npy",
        "step_0001.png",
        "step_0002.png",
        "result.json",
    ]
    # each frame's metrics come before its picture
    assert kinds.index("frame") < kinds.index("file", kinds.index("frame"))
    assert all(p.is_file() for p in run.kept) and run.kept[0].parent == run.directory
    assert not list(runs.pipeline.output_root.glob("run-*"))  # the pipeline's copy is gone
    watch = Watch(seed=5, iterations=2)
    for event in events:
        watch.add(event)
    assert [caption for _, caption in watch.frames()] == ["step 1", "step 2"]
    assert watch.finals()[0][0].endswith("step_0002.png") and watch.finals()[0][1].startswith("final · to text ")
    assert watch.result()["seed"] == 5
    assert [Path(p).name for p in watch.downloads()] == names[:3] + ["result.json"]
    assert watch.status() == "Done: 6 files, seed 5." and watch.progress() == 1.0
    assert -1 <= watch.similarity <= 1


def test_best_of_n_is_shown_ranked(runs):
    job = runs.prepare(Request.check(prompt="a lighthouse", **SMALL, num_outputs=2, seed=9))
    watch = Watch(seed=9, iterations=1, pictures=2)
    for event in _events(runs.start(job)):
        watch.add(event)
    assert watch.ended == "done"
    finals = watch.finals()
    assert [Path(p).name for p, _ in finals] == ["best_01.png", "best_02.png"]
    outputs = watch.result()["outputs"]
    for (_, caption), output in zip(finals, outputs, strict=True):
        assert f"seed {output['seed']}" in caption and f"to text {output['similarity_to_text']:.3f}" in caption
    assert watch.frames() == []  # the last step's pictures are the ranked ones


def test_a_sequence_shows_its_frames_and_its_animation(runs):
    request = Request.check(prompt="a lighthouse", **SMALL, interpolate_to="a forest", interpolation_steps=2, seed=3)
    watch = Watch(seed=3, iterations=1, pictures=2)
    for event in _events(runs.start(runs.prepare(request))):
        watch.add(event)
    assert watch.ended == "done"
    finals = watch.finals()
    assert [Path(path).name for path, _ in finals] == ["frame_01.png", "frame_02.png"]
    outputs = watch.result()["outputs"]
    for (_, caption), output in zip(finals, outputs, strict=True):
        assert caption == f"frame {output['file'][6:8].lstrip('0')} · seed 3 · to text " + (
            f"{output['similarity_to_text']:.3f} · to target {output['similarity_to_target']:.3f}"
        )
    assert watch.animation().name == "interpolation.webp"
    assert "interpolation.webp" in [Path(p).name for p in watch.downloads()]
    assert "target_embeddings.npy" in [Path(p).name for p in watch.downloads()]


def test_cancel_stops_a_long_run_and_keeps_what_it_wrote(runs):
    job = runs.prepare(Request.check(prompt="a long run", **{**SMALL, "iterations": 1000, "display_freq": 1}))
    run = runs.start(job)
    with pytest.raises(Busy):
        runs.start(job)  # never two at once
    events = []
    for event in run.follow():
        events.append(event)
        if event.kind == "file" and event.path.suffix == ".png":
            break
    asked = time.monotonic()
    assert runs.cancel()
    events += _events(run, timeout=60)
    stopped_after = time.monotonic() - asked
    assert events[-1].kind == "cancelled"
    assert stopped_after < 10, stopped_after  # within a step or two, not at the end of 1000
    steps = [e.step for e in events if e.kind == "frame"]
    assert max(steps) < 1000
    kept = [p.name for p in run.kept]
    assert kept[:3] == ["text_tokens.npy", "text_embedding.npy", "image_embedding.npy"]
    assert "result.json" not in kept and all(p.is_file() for p in run.kept)
    assert sorted(p.name for p in run.directory.iterdir()) == sorted(kept)  # no partial file
    assert not list(runs.pipeline.output_root.glob("run-*"))
    watch = Watch(seed=job.settings.seed, iterations=1000)
    for event in events:
        watch.add(event)
    assert watch.status().startswith(f"Cancelled at step {max(steps)}: kept the {len(kept)} files")
    # the next run works
    after = runs.start(runs.prepare(Request.check(prompt="after", mode="embed", prior_steps=4)))
    assert _events(after)[-1].kind == "done"


def test_cancel_only_by_the_session_that_started_the_run(runs):
    job = runs.prepare(Request.check(prompt="mine", **{**SMALL, "iterations": 1000, "display_freq": 1}))
    run = runs.start(job, owner="a")
    for event in run.follow():
        if event.kind == "frame":
            break
    assert not runs.cancel(owner="b")
    assert runs.cancel(owner="a")
    assert _events(run)[-1].kind == "cancelled"


def test_memory_budget_refusal_comes_before_any_work(tmp_path):
    runs = Runs(tmp_path / "files")
    runs.pipeline = Pipeline("tiny", output_root=tmp_path / "out", device="cpu", memory_budget="1")
    with pytest.raises(ValueError) as refused:
        runs.prepare(Request.check(prompt="too big", **SMALL))
    assert "DIDP_MEMORY_BUDGET_MB" in str(refused.value)
    assert not (tmp_path / "files").exists() and not list((tmp_path / "out").glob("run-*"))


def test_step_files_are_told_apart():
    assert step_of(Path("step_0025.png")) == (25, 1)
    assert step_of(Path("step_0025_02.png")) == (25, 2)
    assert step_of(Path("best_01.png")) is None and step_of(Path("result.json")) is None


def test_result_json_of_a_kept_run_is_read(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"seed": 3}))
    from webui.runs import Event

    watch = Watch(seed=3, iterations=0)
    watch.add(Event("file", path=tmp_path / "result.json"))
    watch.add(Event("done"))
    assert watch.result() == {"seed": 3} and watch.finals() == [] and watch.progress() == 1.0


def test_didp_ui_refuses_a_bad_port_before_loading_anything(capsys):
    from commands.didp import main

    assert main(["ui", "--port", "70000"]) == 2
    assert "--port 70000: give a port from 1 to 65535" in capsys.readouterr().err
