"""Composed targets: weighted prompts, an image mixed in, embeddings in and init images, through the
real Cog server, in-process and through didp, on the tiny random models (their pictures mean
nothing; the targets, the loss's bookkeeping and the refusals are what is checked)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.preprocess import clip_image_tensor
from commands import didp as cli
from pipeline.request import Request
from pipeline.runner import Pipeline
from testkit import inputs as shared_inputs
from testkit.cog_server import decode_data_uri, image_data_uri
from testkit.predictions import JSON, NPY, PNG

TINY = {**shared_inputs.SMALL, "num_scales": 3, "seed": 11}  # one step
EMBED = {**shared_inputs.EMBED, "seed": 11}


def picture() -> Image.Image:
    y, x = np.mgrid[0:48, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 5, 255 - x * 2], axis=-1).astype(np.uint8))


def npy_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode()


def predict(server, **inputs) -> tuple[list[str], list[np.ndarray], dict]:
    body = server.predict(**inputs)
    assert body["status"] == "succeeded", body.get("error")
    files = [decode_data_uri(uri) for uri in body["output"]]
    arrays = [np.load(io.BytesIO(data), allow_pickle=False) for kind, data in files if kind == NPY]
    assert files[-1][0] == JSON
    return [kind for kind, _ in files], arrays, {**json.loads(files[-1][1]), "logs": body.get("logs", "")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline("tiny", output_root=tmp_path_factory.mktemp("outputs"))


# -- how the inputs combine --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image_weight": 0.5}, "image_weight=0.5 needs an image to mix in"),
        ({"init_steps": 10}, "init_steps=10 needs an init_image"),
        ({"embedding": "e.npy", "image": "p.png"}, "embedding and image both give the target: give one of them"),
        ({"weighted_prompts": "a", "interpolate_to": "b"}, "weighted_prompts cannot be combined with interpolate_to"),
        ({"weighted_prompts": "a", "edit_prompt": "b"}, "weighted_prompts cannot be combined with edit_prompt"),
        ({"image": "p.png", "image_weight": 1, "edit_prompt": "b"}, "image_weight cannot be combined with edit_prompt"),
        ({"embedding": "e.npy", "interpolate_to": "b"}, "embedding cannot be combined with interpolate_to"),
        ({"embedding": "e.npy", "mode": "embed"}, "embedding makes pictures: it needs mode=visualize"),
        ({"init_image": "p.png", "mode": "embed"}, "init_image makes pictures: it needs mode=visualize"),
        (
            {"weighted_prompts": "a", "mode": "embed", "captions": "c.txt"},
            "captions cannot be combined with weighted_prompts",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        Request.check(prompt="a lighthouse", **values)


def test_what_goes_together():
    both = dict(weighted_prompts="a:0.5 | b:-0.5", negative_prompt="fog", negative_weight=0.2, num_outputs=3)
    assert Request.check(prompt="x", **both).added_targets == 2
    assert Request.check(prompt="x", image="p.png", image_weight=-0.5, mode="embed").added_targets == 1
    with_init = Request.check(prompt="x", init_image="p.png", interpolate_to="y", num_outputs=1)
    assert with_init.resolved_init_steps == 50
    assert Request.check(prompt="x", embedding="e.npy", weighted_prompts="a", negative_prompt="b").embedding


# -- through the real Cog server ---------------------------------------------------------------------------


def test_weighted_prompts_in_embed_mode_give_every_captions_embedding_and_weight(server):
    kinds, arrays, result = predict(server, prompt="a lighthouse", weighted_prompts="storm clouds:0.5|blur:-2", **EMBED)
    tokens, text, image, targets = arrays
    assert kinds == [NPY] * 4 + [JSON] and targets.shape == (3, 64)
    assert [(t["source"], t["caption"], t["weight"], t["seed"]) for t in result["targets"]] == [
        ("prompt", "a lighthouse", 1.0, 11),
        ("weighted_prompts", "storm clouds", 0.5, 12),
        ("weighted_prompts", "blur", -2.0, None),
    ]
    assert all(t["similarity"] is None for t in result["targets"])
    np.testing.assert_array_equal(targets[0], image[0])
    # a positive caption: the prior's embedding with seed+1, as a request of that caption and seed gives
    _, (_, _, storm), _ = predict(server, prompt="storm clouds", **{**EMBED, "seed": 12})
    np.testing.assert_allclose(targets[1], storm[0], atol=1e-6, rtol=0)
    # a negative one: its CLIP text embedding
    _, (_, blur_text, _), _ = predict(server, prompt="blur", **EMBED)
    np.testing.assert_allclose(targets[2], blur_text[0], atol=1e-6, rtol=0)


def test_image_weight_mixes_the_pictures_embedding_in_instead_of_replacing(server, models):
    _, plain, _ = predict(server, prompt="a lighthouse", **EMBED)
    uri = image_data_uri(picture())
    _, (_, _, image, targets), result = predict(server, prompt="a lighthouse", image=uri, image_weight=0.7, **EMBED)
    np.testing.assert_array_equal(image, plain[2])  # the prior's embedding stays the prompt's target
    with torch.no_grad():
        expected = models.clip.embed_image(clip_image_tensor(picture(), models.clip))
    np.testing.assert_allclose(targets[1], expected[0].numpy(), atol=1e-6, rtol=0)
    assert [(t["source"], t["weight"]) for t in result["targets"]] == [("prompt", 1.0), ("image", 0.7)]
    assert result["inputs"]["image"] == "(a file)"


def test_an_embedding_file_of_two_rows_gives_two_pictures_named_as_a_sequence(server):
    rows = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    kinds, arrays, result = predict(server, prompt="my embedding", embedding=npy_uri(rows), **TINY)
    assert kinds == [NPY] * 3 + [PNG] * 2 + [JSON]  # one step: the final frames only
    np.testing.assert_allclose(arrays[2], rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6, rtol=0)
    assert [o["file"] for o in result["outputs"]] == ["frame_01.png", "frame_02.png"]
    assert [(t["source"], t["row"]) for t in result["targets"]] == [("embedding", 0), ("embedding", 1)]
    assert [t["similarity"] for t in result["targets"]] == [o["similarity_to_target"] for o in result["outputs"]]
    assert result["prior"] is None and result["inputs"]["embedding"] == "(a file)"


def test_an_init_image_is_fitted_first_and_both_phases_are_reported(server):
    uri = image_data_uri(picture(), "JPEG")
    kinds, _, result = predict(server, prompt="a lighthouse", init_image=uri, init_steps=3, **TINY)
    assert kinds == [NPY] * 3 + [PNG] + [JSON]
    init = result["init"]
    assert init["steps"] == 3 and 0 < init["mse_last_step"] < init["mse_first_step"] < 1
    assert result["final"]["step"] == 1 and result["timings"]["init_seconds"] > 0
    assert "init (fit init_image)" in result["logs"] and "visualise" in result["logs"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"embedding": npy_uri(np.ones(768, dtype=np.float32))}, "embedding: rows of width 768, but the loaded"),
        ({"embedding": npy_uri(np.array([np.nan] * 64, dtype=np.float32))}, "embedding: NaN or infinite values"),
        ({"embedding": npy_uri(np.zeros(64, dtype=np.float32))}, "embedding: row(s) [0] are zero vectors"),
        ({"embedding": npy_uri(np.ones(64, dtype=np.int32))}, "embedding: dtype int32 is not accepted"),
        (
            {"embedding": npy_uri(np.ones((2, 64), dtype=np.float32)), "num_outputs": 2},
            "num_outputs=2 cannot be combined with an embedding of 2 rows",
        ),
        ({"embedding": "/etc/hostname"}, "embedding: give a URL or a data: URI"),
        ({"init_image": image_data_uri(Image.new("RGB", (8, 8)), "GIF")}, "init_image: not a PNG, JPEG or WebP"),
        ({"init_image": "/etc/hostname"}, "init_image: give a URL or a data: URI"),
        ({"weighted_prompts": "a:0"}, "weighted_prompts: part 1 ('a') has weight 0"),
        ({"image_weight": 0.5}, "image_weight=0.5 needs an image"),
    ],
)
def test_bad_files_and_combinations_fail_before_any_work(server, inputs, message):
    body = server.post({"input": {"prompt": "x", **TINY, **inputs}}).json()
    assert body["status"] == "failed" and message in body["error"], body.get("error")
    assert body.get("output") in (None, []) and body["metrics"]["predict_time"] < 2.0


@pytest.mark.parametrize(("name", "value"), [("image_weight", 10.5), ("init_steps", 0), ("weighted_prompts", 3)])
def test_a_bad_value_is_a_422_naming_it(server, name, value):
    response = server.post({"input": {"prompt": "x", name: value}})
    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "input", name]]


@pytest.fixture(scope="module")
def models():
    from prior.weights import load_models

    return load_models("tiny")


# -- in-process: determinism, the loss's targets, memory ---------------------------------------------------


def run(pipeline: Pipeline, tmp_path, **inputs) -> dict:
    job = pipeline.prepare(Request.check(prompt="a lighthouse", **inputs))
    return {path.name: path.read_bytes() for path in pipeline.run(job, pipeline.new_run_directory())}


def test_the_same_seed_gives_the_same_composed_picture_bit_for_bit(pipeline, tmp_path):
    picture().save(tmp_path / "init.png")
    inputs = dict(TINY, weighted_prompts="a forest:0.5 | fog:-0.3", init_image=tmp_path / "init.png", init_steps=2)
    first, second = run(pipeline, tmp_path, **inputs), run(pipeline, tmp_path, **inputs)
    assert list(first) == list(second) and first["step_0001.png"] == second["step_0001.png"]
    one, two = json.loads(first["result.json"]), json.loads(second["result.json"])
    assert one["targets"] == two["targets"] and one["init"] == two["init"]
    assert [t["source"] for t in one["targets"]] == ["prompt", "weighted_prompts", "weighted_prompts"]


def test_the_visualiser_gets_every_target_with_its_weight(pipeline, tmp_path, monkeypatch):
    from pipeline import runner

    seen = {}
    real = runner.visualise_batch

    def spy(targets, *args, **kwargs):
        seen.update(targets=targets.clone(), weights=kwargs["weights"])
        return real(targets, *args, **kwargs)

    monkeypatch.setattr(runner, "visualise_batch", spy)
    files = run(pipeline, tmp_path, **{**TINY, "iterations": 0, "num_outputs": 2}, weighted_prompts="a:2 | b:-1")
    saved = np.load(io.BytesIO(files["target_embeddings.npy"]))
    assert seen["weights"] == [1.0, 2.0, -1.0] and seen["targets"].shape == (2, 3, 64)
    for picture_targets in seen["targets"]:  # both pictures: their own target, then the shared ones
        np.testing.assert_array_equal(picture_targets.numpy(), saved)


def test_the_memory_estimate_covers_added_targets_and_the_init_phase(pipeline, tmp_path, monkeypatch):
    from pipeline.memory import MemoryBudget

    plain = pipeline.peak_bytes(256, 4, 3)
    more = pipeline.peak_bytes(256, 4, 3, targets=9)
    init = pipeline.peak_bytes(256, 4, 3, init_image=True)
    assert more - plain == int(4 * 4 * 8 * 64 * 6 * pipeline_factor(pipeline))  # 8 more targets, 4 cutouts
    assert init - plain >= 3 * 256 * 256 * 4  # the init image held through the run
    picture().save(tmp_path / "init.png")
    budget = MemoryBudget(pipeline.device, (plain + init) // 2, "a test budget")
    monkeypatch.setattr(pipeline, "memory", budget)
    assert pipeline.prepare(Request.check(prompt="x", **TINY)).members == 1
    with pytest.raises(ValueError, match="over the memory budget"):
        pipeline.prepare(Request.check(prompt="x", **TINY, init_image=tmp_path / "init.png"))


def pipeline_factor(pipeline: Pipeline) -> float:
    from dip.loop import default_precision
    from dip.memory import AUTOCAST_FACTOR, BACKWARD_HEADROOM

    return BACKWARD_HEADROOM * (1.0 if default_precision(pipeline.device) == "fp32" else AUTOCAST_FACTOR)


# -- didp --------------------------------------------------------------------------------------------------


def test_didp_takes_an_embedding_an_init_image_and_weighted_prompts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "work"))
    np.save(tmp_path / "e.npy", np.ones((1, 64), dtype=np.float32))
    picture().save(tmp_path / "init.png")
    tiny = [arg for name, value in TINY.items() for arg in ("-i", f"{name}={value}")]
    args = ["-i", "prompt=x", "-i", f"embedding=@{tmp_path / 'e.npy'}", "-i", f"init_image=@{tmp_path / 'init.png'}"]
    args += ["-i", "init_steps=1", "-i", "weighted_prompts=a forest:0.5", *tiny, "--weights", "tiny"]
    assert cli.main([*args, "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [t["source"] for t in result["targets"]] == ["embedding", "weighted_prompts"]
    assert result["init"]["steps"] == 1
    assert np.load(tmp_path / "out" / "target_embeddings.npy").shape == (2, 64)


def test_didp_refuses_bad_files_before_loading_the_models(tmp_path, capsys):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "notes.png").write_text("not a picture")
    for arg, message in [
        (f"embedding=@{tmp_path / 'objects.npy'}", "embedding: the file holds pickled objects"),
        (f"init_image=@{tmp_path / 'notes.png'}", "init_image: not a PNG, JPEG or WebP"),
        (f"embedding=@{tmp_path / 'missing.npy'}", "embedding: no such file"),
        ("weighted_prompts=a \\| b:11", "weighted_prompts: part 1 ('a | b') has weight 11"),
    ]:
        assert cli.main(["-i", "prompt=x", "-i", arg, "--weights", "no-such-weights"]) == 2
        assert message in capsys.readouterr().err


def saved_bytes(forward, parameters) -> int:
    """The bytes autograd saves for the backward pass while ``forward()`` runs (each storage once,
    ``parameters`` left out), as tests/test_faults.py measures them."""
    kept = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def test_the_estimate_covers_what_autograd_keeps_with_many_targets_and_in_the_init_phase(pipeline):
    """Measured against the bytes autograd saves for one step at 256 px, 4 cutouts, in the precision
    the server runs in: a CLIP-guided step with 9 weighted targets, and an init step."""
    from dip.loop import _autocast, _render_and_score, _Run, default_precision
    from dip.memory import init_step_bytes
    from dip.settings import DipSettings

    clip, device = pipeline.models.clip, pipeline.device
    precision = default_precision(device)
    (run,) = [_Run(DipSettings(size=256, num_scales=3, num_cutouts=4, seed=0), 0, clip, device)]
    parameters = [*clip.parameters(), *run.net.parameters()]
    targets = torch.nn.functional.normalize(torch.randn(1, 9, clip.embed_dim, device=device), dim=-1)
    weights = torch.linspace(-1, 1, 9, device=device)
    measured = saved_bytes(
        lambda: _render_and_score([run], [run.net_input], clip, targets, precision, weights=weights), parameters
    )
    estimated = pipeline.peak_bytes(256, 4, 3, targets=9) - pipeline.resident_bytes
    assert measured <= estimated <= 2.5 * measured, (measured >> 20, estimated >> 20)
    image = torch.rand(1, 3, 256, 256, device=device)

    def init_step():
        with _autocast(device, precision):
            picture = run.net(run.net_input).float()
        (picture - image).square().mean()

    measured = saved_bytes(init_step, parameters)
    estimated = init_step_bytes(256, 3, precision)
    assert measured <= estimated <= 2.5 * measured, (measured >> 20, estimated >> 20)


def test_didp_mixes_an_image_in_with_image_weight(tmp_path, monkeypatch, capsys, models):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "work"))
    picture().save(tmp_path / "picture.webp", "WEBP", lossless=True)
    args = ["-i", "prompt=a lighthouse", "-i", f"image=@{tmp_path / 'picture.webp'}", "-i", "image_weight=-0.5"]
    embed = [arg for name, value in EMBED.items() for arg in ("-i", f"{name}={value}")]
    assert cli.main([*args, *embed, "--weights", "tiny", "-o", str(tmp_path / "out")]) == 0
    targets = np.load(tmp_path / "out" / "target_embeddings.npy")
    with torch.no_grad():
        expected = models.clip.embed_image(clip_image_tensor(picture(), models.clip))
    np.testing.assert_allclose(targets[1], expected[0].numpy(), atol=1e-6, rtol=0)  # lossless: the same pixels
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [(t["source"], t["weight"]) for t in result["targets"]] == [("prompt", 1.0), ("image", -0.5)]
