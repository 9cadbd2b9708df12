"""The predictor's prior side in the precision it takes on a GPU, run on the CPU (no GPU
here): the prior network in fp16, with guidance, negative prompts, edits and interpolations.
The visualiser's fp16 (autocast with gradient scaling) is checked in ``test_dip_loop`` at a
small size: on a CPU, fp16 convolutions at the predictor's 256 px take minutes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from testkit.predictor import run_predictor, tiny_predictor


@pytest.fixture(scope="module")
def gpu_precisions():
    """``predict.Predictor`` on the tiny models, set up with CUDA's prior precision."""
    import prior.weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prior.weights, "default_prior_dtype", lambda device: torch.float16)
        instance = tiny_predictor()
    yield instance
    instance.discard_outputs()


@pytest.mark.parametrize(
    "inputs",
    [
        {"guidance_scale": 3.0, "negative_prompt": "blur"},
        {"guidance_scale": 3.0, "edit_prompt": "at night", "interpolation_steps": 3},
        {"interpolate_to": "a forest", "interpolation_steps": 3},
    ],
)
def test_the_prior_side_runs_in_fp16_and_gives_unit_float32_embeddings(gpu_precisions, inputs):
    assert gpu_precisions.pipeline.models.prior.net.dtype == torch.float16
    files = run_predictor(gpu_precisions, mode="embed", prior_steps=16, seed=5, **inputs)
    result = json.loads(files[-1].read_text())
    embeddings = [np.load(path) for path in files if path.suffix == ".npy"][1:]  # after the tokens
    for embedding in embeddings:
        assert embedding.dtype == np.float32 and np.isfinite(embedding).all()
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)
    assert embeddings[-1].shape[0] == inputs.get("interpolation_steps", 1)
    assert result["prior"]["steps"] == 16
