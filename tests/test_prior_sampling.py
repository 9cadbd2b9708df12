"""Sampling: 1000-step parity with 0.11.5's ``DiffusionPrior.sample``, DDIM, guidance, seeds."""

from __future__ import annotations

import warnings

import pytest
import torch

from prior.checkpoint import Checkpoint, save_safetensors
from prior.config import PriorConfig
from prior.model import PriorNetwork
from prior.sampling import make_denoiser, rank_candidates, sample_ddim, sample_ddpm, sample_image_embeds
from prior.schedule import NoiseSchedule, strided_timesteps
from prior.weights import load_clip
from testkit.oracles import SMALL_PRIOR, oracle_prior

CAPTIONS = ["a red cube on a blue floor", "an oil painting of a lighthouse at night"]


@pytest.fixture(scope="module")
def clip_pair(small_clip_model, tmp_path_factory):
    """The oracle's OpenAIClipAdapter and our encoder, from the same OpenAI-format weights."""
    import clip as openai_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle2_pytorch.dalle2_pytorch import OpenAIClipAdapter

    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_safetensors(small_clip_model.state_dict(), path)
    ours = load_clip(Checkpoint(path))

    original_load = openai_clip.load
    openai_clip.load = lambda name: (small_clip_model, openai_clip.clip._transform(224))
    try:
        adapter = OpenAIClipAdapter("ViT-L/14")
    finally:
        openai_clip.load = original_load
    return adapter, ours


@pytest.fixture(scope="module")
def oracle_and_ours(clip_pair):
    adapter, clip = clip_pair
    oracle = oracle_prior(SMALL_PRIOR, clip=adapter)
    net = PriorNetwork(PriorConfig(**SMALL_PRIOR)).eval()
    net.load_state_dict({k.removeprefix("net."): v for k, v in oracle.state_dict().items() if k.startswith("net.")})
    return oracle, net, clip


def test_1000_step_sampling_matches_0_11_5(oracle_and_ours):
    """Same weights and noise: the same embeddings and the same chosen candidate.

    Tolerance 1e-4 absolute on embeddings of norm ~1 after 1000 steps (float32; CLIP via
    open_clip vs OpenAI's code differs by ~1e-7 and the loop carries it).
    """
    oracle, net, clip = oracle_and_ours
    tokens = clip.tokenize(CAPTIONS).ids
    torch.manual_seed(1234)
    expected = oracle.sample(tokens, num_samples_per_batch=2, cond_scale=1.0)

    text = clip.encode_text(tokens)
    got = sample_image_embeds(net, NoiseSchedule.cosine(), text, torch.Generator().manual_seed(1234), steps=None)
    torch.testing.assert_close(got.image_embeds, expected, atol=1e-4, rtol=0)
    # the same candidate was chosen: the other one is well outside the tolerance
    others = got.candidates[torch.arange(2), 1 - got.best]
    assert ((others - expected).abs().max(dim=-1).values > 1e-3).all()


def test_strided_timesteps_span_the_schedule():
    steps = strided_timesteps(1000, 64)
    assert len(steps) == 64 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    assert strided_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        strided_timesteps(1000, 0)


def test_ddim_with_eta_1_at_every_step_is_ancestral_ddpm(oracle_and_ours):
    """DDIM(eta=1) over all 1000 steps is the DDPM posterior step; with the same noise draws
    both loops agree to float32 rounding of the schedule (1e-4)."""
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    schedule = NoiseSchedule.cosine()
    with torch.inference_mode():
        denoise = make_denoiser(net, text, 2, 1.0)
        ddpm = sample_ddpm(denoise, schedule, (2, 64), torch.Generator().manual_seed(5))
        ddim = sample_ddim(denoise, schedule, (2, 64), torch.Generator().manual_seed(5), steps=1000, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_eta_0_is_deterministic_given_the_initial_noise(oracle_and_ours):
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    schedule = NoiseSchedule.cosine()
    draws = []
    with torch.inference_mode():
        denoise = make_denoiser(net, text, 1, 1.0)
        g = torch.Generator().manual_seed(9)
        a = sample_ddim(denoise, schedule, (1, 64), g, steps=16, eta=0.0)
        draws.append(g.get_state())
        b = sample_ddim(denoise, schedule, (1, 64), torch.Generator().manual_seed(9), steps=16, eta=0.0)
    assert torch.equal(a, b)
    # only the initial noise was drawn
    reference = torch.Generator().manual_seed(9)
    torch.randn((1, 64), generator=reference)
    assert torch.equal(draws[0], reference.get_state())


def test_same_seed_same_embedding_and_different_seeds_differ(oracle_and_ours):
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    schedule = NoiseSchedule.cosine()

    def run(seed):
        return sample_image_embeds(net, schedule, text, torch.Generator().manual_seed(seed), steps=8).image_embeds

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_guided_sampling_batches_both_branches_in_one_forward(oracle_and_ours, monkeypatch):
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    batch_sizes = []
    original = PriorNetwork.step

    def spy(self, x, t, cache):
        batch_sizes.append(x.shape[0])
        return original(self, x, t, cache)

    monkeypatch.setattr(PriorNetwork, "step", spy)
    sample_image_embeds(
        net, NoiseSchedule.cosine(), text, torch.Generator().manual_seed(0), candidates=3, steps=4, cond_scale=2.0
    )
    assert batch_sizes == [6, 6, 6, 6]


def test_guided_step_is_uncond_plus_scaled_difference(oracle_and_ours):
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS).ids)
    x = torch.randn(4, 64)
    t = torch.full((4,), 321)
    rep = text.repeat_interleave(2)
    with torch.inference_mode():
        guided = make_denoiser(net, text, 2, 2.5)(x, 321)
        cond = net(x, t, rep.embed, rep.encodings, rep.mask, torch.ones(4, dtype=torch.bool))
        uncond = net(x, t, rep.embed, rep.encodings, rep.mask, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(guided, uncond + (cond - uncond) * 2.5, atol=1e-5, rtol=0)


def test_a_negative_caption_takes_the_unconditional_branchs_place(oracle_and_ours):
    """``uncond`` is the network conditioned on the negative caption (uncached forward), 1e-5 in fp32."""
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS).ids)
    negative = clip.encode_text(clip.tokenize(["blurry, low quality"]).ids)
    x = torch.randn(4, 64)
    t = torch.full((4,), 321)
    rep = text.repeat_interleave(2)
    neg = negative.repeat_interleave(4)
    keep = torch.ones(4, dtype=torch.bool)
    with torch.inference_mode():
        guided = make_denoiser(net, text, 2, 2.5, negative)(x, 321)
        cond = net(x, t, rep.embed, rep.encodings, rep.mask, keep)
        uncond = net(x, t, neg.embed, neg.encodings, neg.mask, keep)
        plain = make_denoiser(net, text, 2, 2.5)(x, 321)
    torch.testing.assert_close(guided, uncond + (cond - uncond) * 2.5, atol=1e-5, rtol=0)
    assert (guided - plain).abs().max() > 1e-3  # the negative changes the guided prediction


def test_a_negative_caption_needs_guidance_to_act(oracle_and_ours):
    _, net, clip = oracle_and_ours
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    negative = clip.encode_text(clip.tokenize(["blurry"]).ids)

    def sample(scale, neg):
        generator = torch.Generator().manual_seed(5)
        return sample_image_embeds(
            net, NoiseSchedule.cosine(), text, generator, steps=6, cond_scale=scale, negative=neg
        ).image_embeds

    assert torch.equal(sample(1.0, negative), sample(1.0, None))  # no second branch at scale 1
    assert not torch.allclose(sample(3.0, negative), sample(3.0, None))
    with pytest.raises(ValueError, match="negative holds 2 captions; give 1 or 1"):
        make_denoiser(net, text, 1, 2.0, clip.encode_text(clip.tokenize(CAPTIONS).ids))


def test_guidance_is_refused_for_a_prior_trained_without_dropout():
    net = PriorNetwork(PriorConfig(**SMALL_PRIOR, cond_drop_prob=0.0)).eval()
    from backbone.clip import TextEncoding

    text = TextEncoding(torch.randn(1, 64), torch.randn(1, 77, 64), torch.ones(1, 77, dtype=torch.bool))
    with pytest.raises(ValueError, match="cond_scale must be 1"):
        make_denoiser(net, text, 1, 2.0)


def test_ranking_keeps_the_candidate_closest_to_the_text():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[[0.0, 1.0], [2.0, 0.1]], [[5.0, 5.0], [0.0, -1.0]]])
    sample = rank_candidates(text, candidates)
    assert sample.best.tolist() == [1, 0]
    assert torch.equal(sample.image_embeds, torch.tensor([[2.0, 0.1], [5.0, 5.0]]))
    torch.testing.assert_close(sample.similarities[1], torch.tensor([2**-0.5, -1.0]))


def test_strided_sampling_works_with_a_schedule_stored_in_fp16(oracle_and_ours):
    """fp16 rounds alphas_cumprod[0] to 1 and the last to 0; the strided sampler uses the
    exact schedule that the stored buffers were checked against."""
    _, net, clip = oracle_and_ours
    stored = {k: v.half() for k, v in NoiseSchedule.cosine().state_dict().items()}
    schedule = NoiseSchedule.from_state_dict(stored)
    text = clip.encode_text(clip.tokenize(CAPTIONS[:1]).ids)
    sample = sample_image_embeds(net, schedule, text, torch.Generator().manual_seed(0), steps=4)
    assert torch.isfinite(sample.image_embeds).all()


def test_a_schedule_that_is_not_cosine_is_refused():
    stored = NoiseSchedule.cosine().state_dict()
    stored["alphas_cumprod"] = torch.linspace(0.9999, 0.0001, 1000)
    with pytest.raises(ValueError, match="alphas_cumprod is not the cosine schedule"):
        NoiseSchedule.from_state_dict(stored)


@pytest.mark.parametrize(("dtype", "least"), [(torch.bfloat16, 0.9995), (torch.float16, 0.99995)])
@pytest.mark.parametrize(("steps", "cond_scale"), [(16, 1.0), (64, 3.0), (None, 3.0)])
def test_sampling_with_the_network_in_bf16_or_fp16_stays_close_to_fp32(dtype, least, steps, cond_scale):
    """The whole sampler, DDIM and the full ancestral loop, guided or not, with the network in the
    CPU's default (bf16) or CUDA's (fp16) precision, on the tiny models and the same seed.
    Measured minimum cosines: bf16 0.99984-0.99997, fp16 0.999994-0.9999996."""
    from prior.weights import load_models

    embeds = {}
    for run_dtype in (torch.float32, dtype):
        models = load_models("tiny", "cpu", prior_dtype=run_dtype)
        text = models.clip.encode_text(models.clip.tokenize(["a lighthouse", "a red bicycle"]).ids)
        sample = sample_image_embeds(
            models.prior.net,
            models.prior.schedule,
            text,
            torch.Generator().manual_seed(0),
            steps=steps,
            cond_scale=cond_scale,
        )
        embeds[run_dtype] = sample.image_embeds
    assert embeds[dtype].dtype == torch.float32 and torch.isfinite(embeds[dtype]).all()
    cosine = torch.nn.functional.cosine_similarity(embeds[dtype], embeds[torch.float32], dim=-1)
    assert cosine.min() > least, cosine
