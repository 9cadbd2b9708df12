"""CLIP through open_clip against OpenAI's own code (clip-anytorch), from the same weights.

Tolerance: 1e-5 absolute (float32, embeddings of norm 1 and ln_final states of order 1).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from backbone.clip import (
    ONEDNN_MIN_ELEMENTS,
    Linear,
    PatchEmbedding,
    SelfAttention,
    Tokenizer,
    clip_model,
    cpu_bf16_attention,
    linear,
    openai_clip_config,
)
from prior.checkpoint import Checkpoint, save_safetensors
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


@pytest.mark.parametrize(
    "text",
    [
        "a cat <|endoftext|> on a mat",  # the reference ends the caption's embedding at the first end token
        "<|startoftext|>a cat",
        "A CAT <|EndOfText|>",  # cleaned to lower case first, as the reference does
        "&lt;|endoftext|&gt; escaped",  # and HTML-unescaped
        "<start_of_text> <end_of_text>",  # open_clip's own special tokens are plain text to OpenAI's
        "a<|endoftext|>b's 12 ☃",
    ],
)
def test_special_tokens_typed_into_a_caption_are_tokenised_as_the_reference_does(text):
    assert torch.equal(Tokenizer()(text).ids, openai_clip.tokenize([text], truncate=True))


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


def test_self_attention_is_the_multihead_attention_it_replaces():
    """Tolerance: 1e-6 absolute, float32 (the same parameters and operations)."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(64, 4)  # sequence-first, as in the encoder
    ours = SelfAttention(attention)
    assert dict(ours.named_parameters()) == dict(attention.named_parameters())  # shared, same names
    x = torch.randn(50, 3, 64, requires_grad=True)  # [tokens, batch, width]
    expected = attention(x, x, x, need_weights=False)[0]
    out, weights = ours(x, x, x, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    grad = torch.randn(out.shape)
    (want,) = torch.autograd.grad(expected, x, grad)
    (got,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [50, 257])  # ViT-B/32, ViT-L/14
@pytest.mark.parametrize("logit_std", [4.0, 30.0])
def test_cpu_bf16_attention_is_as_precise_as_the_flash_kernel(tokens, logit_std):
    """Outputs and gradients against fp64 from the same bf16 inputs, relative (norm of the error
    over the norm): at most 1.5 times the flash kernel's own error, and below 0.006 (rounding the
    output to bf16 alone gives 0.002)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(tokens)
    spread = (logit_std * 8 / 64) ** 0.5  # q.k / 8 of this std for heads of 64
    q, k = ((torch.randn(4, 4, tokens, 64, generator=generator) * spread).bfloat16() for _ in range(2))
    v, grad = (torch.randn(4, 4, tokens, 64, generator=generator).bfloat16() for _ in range(2))

    def outputs(attention, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        return [out.detach(), *torch.autograd.grad(out, inputs, grad.to(dtype))]

    def flash(*inputs):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*inputs)

    exact = outputs(F.scaled_dot_product_attention, torch.float64)

    def errors(attention):
        got = outputs(attention, torch.bfloat16)
        return [((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, exact, strict=True)]

    ours, theirs = errors(cpu_bf16_attention), errors(flash)
    assert all(a <= max(1.5 * b, 0.003) and a < 0.006 for a, b in zip(ours, theirs, strict=True)), (ours, theirs)


def test_the_encoder_takes_the_bf16_attention_on_the_cpu_and_sdpa_otherwise(encoders, monkeypatch):
    import backbone.clip

    _, ours = encoders
    calls = []
    real = backbone.clip.cpu_bf16_attention
    monkeypatch.setattr(backbone.clip, "cpu_bf16_attention", lambda *a: calls.append(1) or real(*a))
    images = ours.normalize(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        fp32 = F.normalize(ours.encode_image(images), dim=-1)
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.normalize(ours.encode_image(images).float(), dim=-1)
    assert len(calls) == len(ours.model.visual.transformer.resblocks)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)  # bf16 keeps 8 bits of mantissa


@pytest.fixture
def two_threads():
    """ATen gives a 1x1 convolution of one image to oneDNN only with more than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def kernels(function) -> set[str]:
    """The names of the aten ops that ``function()`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    return {event.key for event in profiler.key_averages()}


def test_linear_is_f_linear_in_float32_through_onednn(two_threads):
    """Forward and both gradients against F.linear: 1e-5 relative to each tensor's largest value
    (float32 sums in another order). oneDNN's convolution is what runs, forward and backward."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 200, 64, generator=generator, requires_grad=True)  # [batch, tokens, width]
    weight = torch.randn(96, 64, generator=generator, requires_grad=True)
    bias = torch.randn(96, generator=generator, requires_grad=True)
    grad = torch.randn(2, 200, 96, generator=generator)
    assert x.numel() > ONEDNN_MIN_ELEMENTS
    out = linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert out.shape == expected.shape and out.is_contiguous()
    got = [out, *torch.autograd.grad(out, (x, weight, bias), grad)]
    want = [expected, *torch.autograd.grad(expected, (x, weight, bias), grad)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max().item(), rtol=0)
    ran = kernels(lambda: torch.autograd.grad(linear(x, weight.detach(), bias.detach()), x, grad))  # frozen, as CLIP
    assert {"aten::mkldnn_convolution", "aten::convolution_backward"} <= ran
    assert not {"aten::addmm", "aten::mm", "aten::_slow_conv2d_forward"} & ran


def test_linear_is_f_linear_itself_where_onednn_would_not_run(two_threads):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(200, 64, generator=generator), torch.randn(96, 64, generator=generator)
    small = x[:100]  # 6400 elements
    assert torch.equal(linear(small, weight), F.linear(small, weight))
    torch.set_num_threads(1)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    torch.set_num_threads(2)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert linear(x[:0], weight).shape == (0, 96)


def test_linear_is_f_linear_itself_under_autocast_and_in_other_dtypes():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(10, 16, generator=generator), torch.randn(8, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))
    assert torch.equal(linear(x[0], weight), F.linear(x[0], weight))  # one row: [in] -> [out]


def test_the_encoder_runs_its_linears_through_linear(encoders):
    _, ours = encoders
    block = ours.model.visual.transformer.resblocks[0]
    for module in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj, ours.model.transformer.resblocks[0].mlp.c_fc):
        assert isinstance(module, Linear) and isinstance(module, torch.nn.Linear)  # as open_clip may check
        assert (module.out_features, module.in_features) == module.weight.shape
    assert not any(type(m) is torch.nn.Linear for m in ours.modules())


@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_keeps_for_the_backward_pass_what_f_linear_keeps(weight_grad, two_threads):
    """A convolution would keep its input as well as its weight: for CLIP's frozen linears in
    float32 that was 45% more memory for the backward pass (ViT-B/32, 8 cutouts)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 100, 96, generator=generator, requires_grad=True)  # over ONEDNN_MIN_ELEMENTS
    weight = torch.randn(8, 96, generator=generator, requires_grad=weight_grad)

    def kept(function):  # the storages autograd keeps
        storages = set()

        def pack(tensor):
            storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function(x, weight)
        return storages

    expected = {t.untyped_storage().data_ptr() for t in ([weight, x] if weight_grad else [weight])}
    assert kept(linear) == kept(F.linear) == expected
