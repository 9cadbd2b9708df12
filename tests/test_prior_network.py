"""The prior network against dalle2-pytorch 0.11.5, and the prefix cache against the full pass.

Tolerance: 1e-5 absolute on outputs of magnitude ~1 in float32 (observed: 0, the same operations
in the same order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prior.config import PriorConfig
from prior.model import PriorNetwork
from prior.schedule import NoiseSchedule
from testkit.oracles import SMALL_PRIOR

ATOL = 1e-5


@pytest.fixture(scope="module")
def nets(small_oracle):
    ours = PriorNetwork(PriorConfig(**SMALL_PRIOR)).eval()
    state = {k.removeprefix("net."): v for k, v in small_oracle.state_dict().items() if k.startswith("net.")}
    ours.load_state_dict(state, strict=True)
    return small_oracle.net, ours


def conditioning(batch: int = 3, dim: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g) * 8
    text_embed = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    encodings = torch.randn(batch, 77, dim, generator=g)
    mask = torch.zeros(batch, 77, dtype=torch.bool)
    for row, length in enumerate([5, 77, 2, 40][:batch]):
        mask[row, :length] = True
    times = torch.tensor([0, 500, 999, 17][:batch])
    return x, times, text_embed, encodings, mask


def test_state_dict_keys_and_shapes_match_0_11_5(nets):
    oracle, ours = nets
    assert {k: v.shape for k, v in oracle.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@torch.no_grad()
def test_conditional_output_matches_0_11_5(nets):
    oracle, ours = nets
    x, t, embed, enc, mask = conditioning()
    expected = oracle(x, t, text_embed=embed, text_encodings=enc, mask=mask.clone())
    got = ours(x, t, embed, enc, mask, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_unconditional_output_matches_0_11_5_null_pass(nets):
    oracle, ours = nets
    x, t, embed, enc, mask = conditioning()
    expected = oracle(x, t, text_embed=embed, text_encodings=enc, mask=mask.clone(), cond_drop_prob=1.0)
    got = ours(x, t, embed, enc, mask, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_guided_output_matches_0_11_5_on_its_first_call(nets):
    oracle, ours = nets
    x, t, embed, enc, mask = conditioning()
    expected = oracle.forward_with_cond_scale(
        x, t, text_embed=embed, text_encodings=enc, mask=mask.clone(), cond_scale=3.0
    )
    cond = ours(x, t, embed, enc, mask, torch.ones(3, dtype=torch.bool))
    uncond = ours(x, t, embed, enc, mask, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(uncond + (cond - uncond) * 3.0, expected, atol=4 * ATOL, rtol=0)


@torch.no_grad()
def test_0_11_5_guidance_zeroes_the_callers_mask(nets):
    """0.11.5's null pass does ``mask &= keep_mask`` in place: after one guided call the
    caller's text mask is all False, so every later step ignores the text encodings."""
    oracle, ours = nets
    x, t, embed, enc, mask = conditioning()
    caller_mask = mask.clone()
    oracle.forward_with_cond_scale(x, t, text_embed=embed, text_encodings=enc, mask=caller_mask, cond_scale=3.0)
    assert mask.any() and not caller_mask.any()

    second = oracle.forward_with_cond_scale(
        x, t, text_embed=embed, text_encodings=enc, mask=caller_mask, cond_scale=3.0
    )
    keep, drop = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
    blind_cond = ours(x, t, embed, enc, torch.zeros_like(mask), keep)
    uncond = ours(x, t, embed, enc, mask, drop)
    torch.testing.assert_close(second, uncond + (blind_cond - uncond) * 3.0, atol=4 * ATOL, rtol=0)
    intended = uncond + (ours(x, t, embed, enc, mask, keep) - uncond) * 3.0
    assert (second - intended).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("keep", [True, False])
def test_prefix_cached_step_equals_full_forward(nets, keep):
    _, ours = nets
    x, t, embed, enc, mask = conditioning()
    keep_rows = torch.full((3,), keep)
    full = ours(x, t, embed, enc, mask, keep_rows)
    cache = ours.encode_prefix(embed, enc, mask, torch.ones(3, dtype=torch.bool))
    if not keep:
        cache = ours.drop_text(cache)
    torch.testing.assert_close(ours.step(x, t, cache), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_prefix_cache_is_reused_across_timesteps(nets):
    _, ours = nets
    x, _, embed, enc, mask = conditioning()
    cache = ours.encode_prefix(embed, enc, mask, torch.ones(3, dtype=torch.bool))
    for step in (999, 500, 3, 0):
        t = torch.full((3,), step)
        full = ours(x, t, embed, enc, mask, torch.ones(3, dtype=torch.bool))
        torch.testing.assert_close(ours.step(x, t, cache), full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(("dtype", "least"), [(torch.bfloat16, 0.999), (torch.float16, 0.99999)])
def test_a_network_in_bf16_or_fp16_stays_close_to_fp32(nets, dtype, least):
    """bf16: the CPU's default; fp16: CUDA's (the checkpoint's own precision), run here on the CPU."""
    _, ours = nets
    x, t, embed, enc, mask = conditioning()
    reference = ours(x, t, embed, enc, mask, torch.ones(3, dtype=torch.bool))
    low = PriorNetwork(ours.config).eval()
    low.load_state_dict(ours.state_dict())
    low.cast(dtype)
    assert low.causal_transformer.layers[0][0].rotary_emb.freqs.dtype == torch.float32
    got = low(x, t, embed, enc, mask, torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(got).all()  # returned in float32
    cosine = F.cosine_similarity(got.float(), reference, dim=-1)
    assert cosine.min() > least, cosine


def test_cosine_schedule_matches_0_11_5_buffers(small_oracle):
    ours = NoiseSchedule.cosine(1000).state_dict()
    theirs = {k.removeprefix("noise_scheduler."): v for k, v in small_oracle.state_dict().items() if "noise_sch" in k}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
