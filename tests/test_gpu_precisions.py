"""The predictor's prior side in the precision it takes on a GPU, run on the CPU (no GPU
here): the prior network in fp16, with guidance, negative prompts, edits and interpolations.
The visualiser's fp16 (autocast with gradient scaling) is checked in ``test_dip_loop`` at a
small size: on a CPU, fp16 convolutions at the predictor's 256 px take minutes."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def gpu_precisions():
    """``predict.Predictor`` on the tiny models, set up with CUDA's precisions."""
    import dip.loop
    import predict
    import prior.weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIDP_WEIGHTS", "tiny")
        patch.delenv("DIDP_MEMORY_BUDGET_MB", raising=False)
        patch.setattr(prior.weights, "default_prior_dtype", lambda device: torch.float16)
        patch.setattr(dip.loop, "default_precision", lambda device: "fp16")
        patch.setattr(predict, "default_precision", lambda device: "fp16")
        instance = predict.Predictor()
        instance.record_metric = lambda name, value: None
        instance.setup()
        yield instance
        instance.discard_outputs()


def run(predictor, **inputs) -> tuple[list, dict]:
    defaults = {
        name: getattr(parameter.default, "default", parameter.default)
        for name, parameter in inspect.signature(predictor.run).parameters.items()
    }
    files = list(predictor.run(**{**defaults, "mode": "embed", "prior_steps": 16, "seed": 5, **inputs}))
    return files, json.loads(Path(files[-1]).read_text())


@pytest.mark.parametrize(
    "inputs",
    [
        {"guidance_scale": 3.0, "negative_prompt": "blur"},
        {"guidance_scale": 3.0, "edit_prompt": "at night", "interpolation_steps": 3},
        {"interpolate_to": "a forest", "interpolation_steps": 3},
    ],
)
def test_the_prior_side_runs_in_fp16_and_gives_unit_float32_embeddings(gpu_precisions, inputs):
    assert gpu_precisions.models.prior.net.dtype == torch.float16
    files, result = run(gpu_precisions, prompt="a lighthouse", **inputs)
    embeddings = [np.load(path) for path in files if str(path).endswith(".npy")][1:]  # after the tokens
    for embedding in embeddings:
        assert embedding.dtype == np.float32 and np.isfinite(embedding).all()
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)
    assert embeddings[-1].shape[0] == inputs.get("interpolation_steps", 1)
    assert result["prior"]["steps"] == 16
