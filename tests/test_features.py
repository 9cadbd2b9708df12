"""Variations, interpolations, text diffs, negative prompts, best-of-N and animations, through the real
Cog server and through ``didp``, on the tiny random models (their pictures mean nothing; the
plumbing, the embeddings and the bookkeeping are what is checked)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.preprocess import clip_image_tensor
from commands import didp as cli
from pipeline.media import load_image
from prior.manipulate import slerp
from prior.weights import load_models
from testkit import inputs as shared_inputs
from testkit.cog_server import decode_data_uri, image_data_uri
from testkit.predictions import JSON, NPY, PNG

SMALL = {**shared_inputs.SMALL, "iterations": 2, "num_scales": 3, "seed": 11}
EMBED = {**shared_inputs.EMBED, "seed": 11}


def known_picture() -> Image.Image:
    """A picture with structure in it: a colour gradient with a dark disc."""
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, 255 - x - y // 2], axis=-1).astype(np.uint8)
    pixels[(x - 64) ** 2 + (y - 48) ** 2 < 30**2] = (20, 20, 40)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def models():
    """The server's tiny models, in this process (the same seed, so the same weights)."""
    return load_models("tiny")


def predict(server, **inputs) -> tuple[dict, list[tuple[str, bytes]]]:
    response = server.post({"input": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body, [decode_data_uri(uri) for uri in body["output"]]


def npys(files: list[tuple[str, bytes]]) -> list[np.ndarray]:
    return [np.load(io.BytesIO(data), allow_pickle=False) for kind, data in files if kind == NPY]


def result_of(files: list[tuple[str, bytes]]) -> dict:
    kind, data = files[-1]
    assert kind == JSON
    return json.loads(data)


# -- image variations ------------------------------------------------------------------------------------


def test_an_image_input_gives_the_embedding_clip_gives_that_picture(server, models):
    body, files = predict(server, prompt="a dark disc on a gradient", image=image_data_uri(known_picture()), **EMBED)
    _, text, image = npys(files)
    with torch.no_grad():
        expected = models.clip.embed_image(clip_image_tensor(known_picture(), models.clip))
    # the server decodes the PNG itself: the same pixels, the same fp32 CLIP; 1e-6 for summation order
    np.testing.assert_allclose(image, expected.numpy(), atol=1e-6, rtol=0)
    result = result_of(files)
    assert result["prior"] is None and result["image"] == {"width": 128, "height": 96}
    assert result["inputs"]["image"] == "(a file)"  # no server path in the result


def test_an_image_input_is_visualised(server):
    body, files = predict(server, prompt="a dark disc", image=image_data_uri(known_picture(), "WEBP"), **SMALL)
    kinds = [kind for kind, _ in files]
    assert kinds == [NPY, NPY, NPY, PNG, PNG, JSON]
    assert result_of(files)["final"]["step"] == 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (image_data_uri(Image.new("RGB", (8, 8)), "GIF"), "image: not a PNG, JPEG or WebP"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode(), "image: "),
        ("/etc/hostname", "image: give a URL or a data: URI; a path on the server is not accepted"),
        ("../../../etc/passwd", "image: give a URL or a data: URI"),
    ],
)
def test_a_bad_image_input_fails_before_any_work_with_a_clear_message(server, payload, message):
    body = server.post({"input": {"prompt": "x", "image": payload, **EMBED}}).json()
    assert body["status"] == "failed"
    assert message in body["error"], body["error"]
    assert body.get("output") in (None, [])  # nothing was produced


# -- interpolations and text diffs ------------------------------------------------------------------------


def test_interpolation_runs_from_one_prompts_embedding_to_the_others(server):
    _, start_files = predict(server, prompt="a lighthouse", **EMBED)
    _, end_files = predict(server, prompt="a forest", **EMBED)
    body, files = predict(server, prompt="a lighthouse", interpolate_to="a forest", interpolation_steps=3, **SMALL)
    tokens, text, image, targets = npys(files)
    start, end = npys(start_files)[2][0], npys(end_files)[2][0]
    assert targets.shape == (3, image.shape[1])
    np.testing.assert_array_equal(image[0], start)  # the same seed: the same prior sample
    np.testing.assert_allclose(targets[0], start, atol=1e-6, rtol=0)
    np.testing.assert_allclose(targets[-1], end, atol=1e-6, rtol=0)
    middle = slerp(torch.from_numpy(start), torch.from_numpy(end), 0.5)
    np.testing.assert_allclose(targets[1], middle.numpy(), atol=1e-6, rtol=0)
    result = result_of(files)
    assert [o["file"] for o in result["outputs"]] == ["frame_01.png", "frame_02.png", "frame_03.png"]
    kinds = [kind for kind, _ in files]
    # step 1 of each of the 3 members, then the 3 final frames, the animation and result.json
    assert kinds == [NPY] * 4 + [PNG] * 3 + [PNG] * 3 + ["image/webp", JSON]
    animation = Image.open(io.BytesIO(files[-2][1]))
    assert animation.n_frames == 3 and animation.size == (256, 256)


def test_an_edit_at_strength_0_leaves_the_target_and_a_sequence_turns_it(server):
    _, base_files = predict(server, prompt="a lighthouse", **EMBED)
    base = npys(base_files)[2]
    _, files = predict(server, prompt="a lighthouse", edit_prompt="a lighthouse at night", edit_strength=0.0, **EMBED)
    np.testing.assert_allclose(npys(files)[3], base, atol=1e-6, rtol=0)
    _, files = predict(
        server, prompt="a lighthouse", edit_prompt="at night", edit_strength=0.5, interpolation_steps=4, **EMBED
    )
    targets = npys(files)[3]
    angles = np.arccos(np.clip(targets @ base[0], -1, 1))
    np.testing.assert_allclose(np.diff(angles), angles[1], atol=1e-4)  # evenly spaced, from 0
    assert angles[0] < 1e-3 < angles[-1]


# -- negative prompts ---------------------------------------------------------------------------------------


def test_a_negative_prompt_steers_guidance_and_an_empty_one_is_plain_guidance(server):
    guided = dict(EMBED, prompt="a lighthouse", guidance_scale=3.0)
    plain = npys(predict(server, **guided)[1])[2]
    empty = npys(predict(server, **guided, negative_prompt="")[1])[2]
    negative = npys(predict(server, **guided, negative_prompt="a forest")[1])[2]
    np.testing.assert_array_equal(empty, plain)
    assert np.abs(negative - plain).max() > 1e-3


def test_a_negative_prompt_in_the_visualiser_is_scored(server):
    body, files = predict(server, prompt="a lighthouse", negative_prompt="a forest", negative_weight=0.5, **SMALL)
    final = result_of(files)["final"]
    assert -1 <= final["similarity_to_negative"] <= 1


# -- best-of-N and animations -----------------------------------------------------------------------------


def test_best_of_n_writes_the_pictures_best_first_with_their_scores(server):
    body, files = predict(server, prompt="a lighthouse", num_outputs=3, save_animation=True, **SMALL)
    result = result_of(files)
    outputs = result["outputs"]
    assert [o["file"] for o in outputs] == ["best_01.png", "best_02.png", "best_03.png"]
    scores = [o["similarity_to_text"] for o in outputs]
    assert scores == sorted(scores, reverse=True)
    assert sorted(o["seed"] for o in outputs) == [11, 12, 13]
    assert result["final"]["similarity_to_text"] == scores[0]
    kinds = [kind for kind, _ in files]
    assert kinds == [NPY] * 3 + [PNG] * 3 + [PNG] * 3 + ["image/webp", JSON]
    progress = Image.open(io.BytesIO(files[-2][1]))
    assert progress.n_frames == 2 and progress.size == (3 * 256, 256)  # steps 1 and 2, members side by side


def test_a_long_runs_progress_animation_is_thinned_to_its_pixel_budget(tmp_path, monkeypatch):
    from pipeline import media

    paths = []
    for k in range(30):  # 30 frames of 16 x 16, each its own grey
        paths.append(tmp_path / f"step_{k:04d}.png")
        Image.new("RGB", (16, 16), (8 * k, 8 * k, 8 * k)).save(paths[-1])
    monkeypatch.setattr(media, "MAX_ANIMATION_PIXELS", 10 * 16 * 16)
    path = media.animation_of_files([[p] for p in paths], tmp_path / "progress.webp", "webp")
    animation = Image.open(path)
    greys = []
    for index in range(animation.n_frames):
        animation.seek(index)
        greys.append(animation.convert("RGB").getpixel((8, 8))[0])
    expected = [8 * round(i * 29 / 9) for i in range(10)]  # 10 evenly spaced, the first and the last kept
    assert len(greys) == 10 and all(abs(g - e) <= 3 for g, e in zip(greys, expected, strict=True)), greys
    assert media.evenly_spaced(list(range(5)), 8) == [0, 1, 2, 3, 4]
    assert media.evenly_spaced(list(range(101)), 3) == [0, 50, 100]


# -- the new inputs' bad values: 422 from the server, the same from didp -----------------------------------

BAD_VALUES = [
    ("interpolation_steps", 1),
    ("interpolation_steps", 17),
    ("interpolation_steps", 2.5),
    ("edit_strength", -0.1),
    ("edit_strength", 1.5),
    ("negative_weight", 2),
    ("num_outputs", 0),
    ("num_outputs", 9),
    ("animation_format", "mp4"),
    ("save_animation", "yes"),
    ("image", 123),
    ("interpolate_to", 5),
    ("edit_prompt", None),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_of_a_new_input_is_a_422_naming_it(server, name, value):
    response = server.post({"input": {"prompt": "x", name: value}})
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "input", name]]


def test_inputs_that_cannot_go_together_fail_before_any_work(server):
    body = server.post({"input": {"prompt": "x", "interpolate_to": "y", "num_outputs": 2, **SMALL}}).json()
    assert body["status"] == "failed"
    assert "num_outputs=2 cannot be combined with an interpolation" in body["error"]
    assert body["metrics"]["predict_time"] < 1.0


# -- didp ----------------------------------------------------------------------------------------------------


def test_didp_takes_an_image_file_and_writes_the_outputs(tmp_path, capsys, monkeypatch, models):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "work"))
    picture = tmp_path / "picture.png"
    known_picture().save(picture)
    args = ["-i", "prompt=a dark disc", "-i", f"image=@{picture}", "-i", "mode=embed", "-i", "prior_steps=8"]
    assert cli.main([*args, "--weights", "tiny", "-o", str(tmp_path / "out")]) == 0
    image = np.load(tmp_path / "out" / "image_embedding.npy")
    with torch.no_grad():
        expected = models.clip.embed_image(clip_image_tensor(load_image(picture), models.clip))
    np.testing.assert_allclose(image, expected.numpy(), atol=1e-6, rtol=0)
    assert picture.exists()  # the temporary copy is removed, the user's file is not


def test_didp_refuses_a_missing_image_file_and_bad_values_like_the_server(tmp_path, capsys):
    assert cli.main(["-i", "prompt=x", "-i", f"image=@{tmp_path / 'nope.png'}", "--weights", "tiny"]) == 2
    assert "image: no such file" in capsys.readouterr().err
    assert cli.main(["-i", "prompt=x", "-i", "num_outputs=9", "--weights", "tiny"]) == 2
    assert "num_outputs" in capsys.readouterr().err


def test_didp_runs_best_of_n_and_an_interpolation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "work"))
    small = [f"{name}={value}" for name, value in SMALL.items()]  # 2 steps: step 1 renders the shared start
    common = [arg for pair in (("-i", item) for item in small) for arg in pair] + ["--weights", "tiny"]
    out = tmp_path / "best"
    assert cli.main(["-i", "prompt=a lighthouse", "-i", "num_outputs=2", *common, "-o", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert [o["file"] for o in result["outputs"]] == ["best_01.png", "best_02.png"]
    assert all((out / o["file"]).is_file() for o in result["outputs"])
    out = tmp_path / "interpolation"
    args = ["-i", "prompt=a lighthouse", "-i", "interpolate_to=a forest", "-i", "interpolation_steps=2"]
    assert cli.main([*args, "-i", "animation_format=gif", *common, "-o", str(out)]) == 0
    assert Image.open(out / "interpolation.gif").n_frames == 2
    assert np.load(out / "target_embeddings.npy").shape == (2, 64)
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(out / "result.json")


# -- what reaches the visualiser (in-process) ------------------------------------------------------------


def visualised_targets(predictor, monkeypatch, tmp_path, **inputs) -> tuple[list[torch.Tensor], np.ndarray]:
    """The targets handed to the visualiser, and target_embeddings.npy (or image_embedding.npy)."""
    from pipeline import runner
    from pipeline.validation import validate_inputs

    monkeypatch.setattr(predictor.pipeline, "output_root", tmp_path)
    seen = []
    original = runner.visualise_batch

    def spy(target, *args, **kwargs):
        seen.append(target.clone())
        return original(target, *args, **kwargs)

    monkeypatch.setattr(runner, "visualise_batch", spy)
    values = validate_inputs({"prompt": "a lighthouse", **SMALL, "iterations": 0, **inputs})
    produced = {Path(p).name: Path(p) for p in predictor.run(**values)}
    saved = produced.get("target_embeddings.npy") or produced["image_embedding.npy"]
    return seen, np.load(saved)


def test_a_single_edit_is_what_is_visualised(predictor, monkeypatch, tmp_path):
    seen, saved = visualised_targets(predictor, monkeypatch, tmp_path, edit_prompt="at night", edit_strength=0.4)
    (target,) = seen
    assert saved.shape == (1, 64)
    np.testing.assert_array_equal(target.reshape(1, -1).numpy(), saved)
    _, base = visualised_targets(predictor, monkeypatch, tmp_path)
    assert np.abs(saved - base).max() > 1e-3  # the edit moved the target


def test_a_sequence_and_best_of_n_hand_their_targets_over(predictor, monkeypatch, tmp_path):
    seen, saved = visualised_targets(predictor, monkeypatch, tmp_path, interpolate_to="a forest", interpolation_steps=3)
    np.testing.assert_array_equal(seen[0].numpy(), saved)
    seen, saved = visualised_targets(predictor, monkeypatch, tmp_path, num_outputs=3)
    np.testing.assert_array_equal(seen[0].numpy(), np.repeat(saved, 3, axis=0))


def test_an_edit_that_changes_nothing_fails_before_the_prior_runs(predictor, monkeypatch, tmp_path):
    from pipeline import runner
    from pipeline.validation import validate_inputs

    monkeypatch.setattr(predictor.pipeline, "output_root", tmp_path)
    sampled = []
    real = runner.sample_image_embeds
    monkeypatch.setattr(runner, "sample_image_embeds", lambda *a, **k: sampled.append(1) or real(*a, **k))
    # CLIP's tokenizer lowercases: the same tokens, the same embedding, no direction to edit in
    values = validate_inputs({"prompt": "a lighthouse", "edit_prompt": "A Lighthouse", **SMALL})
    with pytest.raises(ValueError, match="the two texts have the same embedding"):
        list(predictor.run(**values))
    assert sampled == [] and list(tmp_path.iterdir()) == []


def test_result_json_records_a_blank_optional_caption_as_not_given(predictor, monkeypatch, tmp_path):
    from pipeline.validation import validate_inputs

    monkeypatch.setattr(predictor.pipeline, "output_root", tmp_path)
    values = validate_inputs({"prompt": "a lighthouse", **SMALL, "iterations": 0, "negative_prompt": "  "})
    produced = {Path(p).name: Path(p) for p in predictor.run(**values)}
    inputs = json.loads(produced["result.json"].read_text())["inputs"]
    assert inputs["negative_prompt"] is None and inputs["prompt"] == "a lighthouse"
