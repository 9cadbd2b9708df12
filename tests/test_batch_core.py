"""Many captions in one pass: a caption's embeddings do not depend on its batch, its position or
its neighbours, and equal a single request's with the row's seed.

Tolerances: with the prior in float32, batches of 1, 7 and 64 agree to 1e-6 (the rounding of
matmuls of different shapes); in bf16 (this CPU's default) to 5e-3 per component of a unit
vector (bf16 keeps 8 bits of mantissa, and a one-row matmul takes another kernel). The text
embeddings (CLIP runs in float32) agree to 1e-6 either way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.embeddings import CaptionEmbeddings, PriorSettings, embed_captions, row_seed
from pipeline.request import Request
from pipeline.runner import Pipeline
from prior.weights import load_models

WORDS = ["cat", "dog", "bird", "tree", "house", "river", "cloud", "lamp"]
CAPTIONS = [f"a photo of a {WORDS[i % 8]} number {i}" for i in range(64)]
SEEDS = [row_seed(7, i) for i in range(64)]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 5e-3}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def models(request):
    return load_models("tiny", prior_dtype=request.param)


def in_batches(models, size: int, settings: PriorSettings | None = None) -> CaptionEmbeddings:
    settings = settings or PriorSettings()
    parts = [embed_captions(models, CAPTIONS[i : i + size], SEEDS[i : i + size], settings) for i in range(0, 64, size)]
    return CaptionEmbeddings(
        torch.cat([p.text for p in parts]),
        torch.cat([p.image for p in parts]),
        torch.cat([p.similarity for p in parts]),
        [t for p in parts for t in p.truncated],
    )


@pytest.mark.parametrize("size", [1, 7])
def test_a_captions_embeddings_do_not_depend_on_the_batch_size(models, size):
    whole, batched = in_batches(models, 64), in_batches(models, size)
    tolerance = TOLERANCE[models.prior.net.dtype]
    np.testing.assert_allclose(batched.image.numpy(), whole.image.numpy(), atol=tolerance, rtol=0)
    np.testing.assert_allclose(batched.text.numpy(), whole.text.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(batched.similarity.numpy(), whole.similarity.numpy(), atol=tolerance, rtol=0)


def test_guidance_and_a_negative_prompt_batch_the_same_way(models):
    settings = PriorSettings(candidates=3, guidance_scale=3.0, prior_steps=16, negative_prompt="blur")
    whole, batched = in_batches(models, 64, settings), in_batches(models, 7, settings)
    np.testing.assert_allclose(batched.image.numpy(), whole.image.numpy(), atol=TOLERANCE[models.prior.net.dtype])


def test_a_captions_embeddings_do_not_depend_on_its_neighbours_or_their_order(models):
    order = list(reversed(range(64)))
    shuffled = embed_captions(models, [CAPTIONS[i] for i in order], [SEEDS[i] for i in order])
    whole = in_batches(models, 64)
    tolerance = TOLERANCE[models.prior.net.dtype]
    np.testing.assert_allclose(shuffled.image.numpy()[order], whole.image.numpy(), atol=tolerance)


def test_embeddings_are_unit_vectors_and_the_similarity_is_the_chosen_candidates(models):
    batch = embed_captions(models, CAPTIONS[:5], SEEDS[:5])
    np.testing.assert_allclose(batch.image.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch.text.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    cosines = (batch.image * batch.text).sum(-1)
    np.testing.assert_allclose(batch.similarity.numpy(), cosines.numpy(), atol=1e-2)  # of the unnormalised candidate


def test_a_row_equals_a_single_request_with_the_rows_seed(tmp_path):
    pipeline = Pipeline("tiny", output_root=tmp_path)
    settings = PriorSettings(candidates=2, prior_steps=16)
    row = embed_captions(pipeline.models, CAPTIONS[:7], SEEDS[:7], settings)
    request = Request.check(prompt=CAPTIONS[3], mode="embed", prior_steps=16, seed=SEEDS[3])
    out = pipeline.new_run_directory()
    files = {path.name: path for path in pipeline.run(pipeline.prepare(request), out)}
    single = np.load(files["image_embedding.npy"])[0]
    np.testing.assert_allclose(row.image[3].numpy(), single, atol=TOLERANCE[pipeline.models.prior.net.dtype])
    np.testing.assert_allclose(row.text[3].numpy(), np.load(files["text_embedding.npy"])[0], atol=1e-6)
    out.discard()


def test_row_seeds_are_request_seeds_fixed_by_the_job_seed_and_the_row_id():
    assert row_seed(7, 3) == row_seed(7, "3") == row_seed(7, 3)  # the id's text decides
    assert len({row_seed(7, i) for i in range(1000)}) > 990
    assert row_seed(7, 3) != row_seed(8, 3)
    assert all(0 <= row_seed(seed, i) <= 100_000 for seed in (0, 7, 100_000) for i in range(100))


def test_bad_arguments_are_refused_by_name(models):
    with pytest.raises(ValueError, match="2 captions but 1 seeds"):
        embed_captions(models, ["a", "b"], [1])
    with pytest.raises(ValueError, match="no captions"):
        embed_captions(models, [], [])
