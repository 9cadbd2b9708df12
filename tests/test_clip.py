"""CLIP through open_clip against OpenAI's own code (clip-anytorch), from the same weights.

Tolerance: 1e-5 absolute (float32, embeddings of norm 1 and ln_final states of order 1).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from prior.checkpoint import Checkpoint, save_safetensors
from prior.clip import (
    CPU_BF16_MATH_ATTENTION_TOKENS,
    PatchEmbedding,
    Tokenizer,
    clip_model,
    openai_clip_config,
)
from prior.weights import load_clip

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip as openai_clip

ATOL = 1e-5
TEXTS = ["a photo of a cat", "", "Ünïcödé — ☃ emoji 🎨 and RTL שלום", "a " * 100]


@pytest.fixture(scope="module")
def encoders(small_clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_safetensors(small_clip_model.state_dict(), path)
    return small_clip_model, load_clip(Checkpoint(path))


def test_tokens_match_openai_tokenizer_with_truncation():
    ours = Tokenizer()(TEXTS)
    expected = openai_clip.tokenize(TEXTS, truncate=True)
    assert torch.equal(ours.ids, expected)
    assert ours.ids.dtype == torch.int64 and ours.ids.shape == (4, 77)
    assert ours.truncated == [False, False, False, True]


def test_a_prompt_of_exactly_77_tokens_is_not_truncated():
    tokens = Tokenizer()("a " * 75)
    assert tokens.truncated == [False] and tokens.ids[0, 76] == 49407


@torch.no_grad()
def test_text_embedding_and_ln_final_states_match_openai_clip(encoders):
    reference, ours = encoders
    ids = openai_clip.tokenize(TEXTS, truncate=True)
    states = []
    handle = reference.ln_final.register_forward_hook(lambda _m, _i, out: states.append(out))
    expected_embed = F.normalize(reference.encode_text(ids).float(), dim=-1)
    handle.remove()

    got = ours.encode_text(ids)
    assert got.embed.shape == (4, 64) and got.encodings.shape == (4, 77, 64)
    torch.testing.assert_close(got.embed, expected_embed, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.encodings, states[0].float(), atol=ATOL, rtol=0)
    assert torch.equal(got.mask, ids != 0)


@torch.no_grad()
def test_image_embedding_matches_openai_clip(encoders):
    reference, ours = encoders
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    normalized = ours.normalize(images)
    torch.testing.assert_close(ours.encode_image(normalized), reference.encode_image(normalized), atol=ATOL, rtol=0)


def test_image_embedding_is_differentiable_with_frozen_weights(encoders):
    _, ours = encoders
    images = torch.rand(2, 3, 224, 224, requires_grad=True)
    ours.encode_image(ours.normalize(images)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())


def test_embed_image_resizes_and_normalises(encoders):
    _, ours = encoders
    embeds = ours.embed_image(torch.rand(2, 3, 256, 256))
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("size", [64, 70])  # 70: the conv drops the remainder, and so must the matmul
def test_patch_embedding_equals_the_patchify_conv_forward_and_backward(size):
    """Tolerance: 1e-4 absolute (float32 sums of 3 * 16**2 products of order 1)."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, 16, stride=16, bias=False)
    torch.nn.init.normal_(conv.weight, generator=generator)
    patchify = PatchEmbedding(conv)
    assert patchify.weight is conv.weight
    images = torch.rand(2, 3, size, size, generator=generator, requires_grad=True)
    expected = conv(images)
    out = patchify(images)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    grad = torch.randn(expected.shape, generator=generator)
    expected_grads = torch.autograd.grad(expected, (images, conv.weight), grad)
    grads = torch.autograd.grad(out, (images, patchify.weight), grad)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_patch_embedding_refuses_other_convs():
    with pytest.raises(ValueError, match="not a patchify conv"):
        PatchEmbedding(torch.nn.Conv2d(3, 8, 3, stride=2))


def test_the_encoder_keeps_the_state_dict_keys(small_clip_model, encoders):
    _, ours = encoders
    assert isinstance(ours.model.visual.conv1, PatchEmbedding)
    with torch.device("meta"):
        plain = clip_model(openai_clip_config(small_clip_model.state_dict()))
    assert set(ours.model.state_dict()) == set(plain.state_dict())


def _attention_ops(encoder, images: torch.Tensor, dtype: torch.dtype | None) -> set[str]:
    """Names of the attention ops that ``encode_image`` runs forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    images = images.clone().requires_grad_()
    with Record(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        encoder.encode_image(images).float().sum().backward()
    return seen


def test_short_sequences_in_bf16_on_the_cpu_take_plain_matmul_attention(encoders):
    _, ours = encoders
    assert ours.image_tokens <= CPU_BF16_MATH_ATTENTION_TOKENS  # the small test CLIP
    images = ours.normalize(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert not any("flash" in name for name in _attention_ops(ours, images, torch.bfloat16))
    assert any("flash" in name for name in _attention_ops(ours, images, None))  # fp32: unchanged


def test_plain_matmul_attention_gives_the_flash_kernels_embedding(encoders, monkeypatch):
    """Tolerance: 0.05 on l2-normalised embeddings (bf16 keeps 8 bits of mantissa)."""
    _, ours = encoders
    images = ours.normalize(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        math = F.normalize(ours.encode_image(images).float(), dim=-1)
        monkeypatch.setattr(ours, "image_tokens", CPU_BF16_MATH_ATTENTION_TOKENS + 1)
        flash = F.normalize(ours.encode_image(images).float(), dim=-1)
    torch.testing.assert_close(math, flash, atol=0.05, rtol=0)
