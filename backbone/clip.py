"""CLIP as the prior and the visualiser need it, on top of open-clip-torch.

The prior was trained on OpenAI CLIP ViT-L/14 outputs: the l2-normalised text embedding and
the ``ln_final`` states of all 77 token positions, with zero padding as the key mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import regex
import torch
import torch.nn.functional as F
from torch import nn

from .hardware import compute_dtype

CONTEXT_LENGTH = 77
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Tokens:
    """Token ids ``[b, 77]`` (int64, zero padded) and, per caption, whether it was cut."""

    ids: torch.Tensor
    truncated: list[bool]


@dataclass
class TextEncoding:
    """What the prior is conditioned on, for a batch of ``b`` captions."""

    embed: torch.Tensor  # [b, d] l2-normalised CLIP text embedding
    encodings: torch.Tensor  # [b, 77, d_text] ln_final states of every position
    mask: torch.Tensor  # [b, 77] bool, True where a token is present

    def repeat_interleave(self, n: int) -> TextEncoding:
        return TextEncoding(*(t.repeat_interleave(n, dim=0) for t in (self.embed, self.encodings, self.mask)))


# OpenAI CLIP's own split of a cleaned caption (clip/simple_tokenizer.py), which the prior's
# training captions went through: its special tokens typed into a caption become those tokens
# (an "<|endoftext|>" ends the caption's embedding there). open_clip's split knows other ones.
_OPENAI_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_OPENAI_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class Tokenizer:
    """OpenAI's CLIP BPE tokenizer, truncating at 77 tokens: the vocabulary, merges and text
    cleaning shipped with open_clip, the split into words of OpenAI's ``clip.tokenize``."""

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length
        self._bpe = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self._specials = dict(zip(_OPENAI_SPECIALS, (self._bpe.sot_token_id, self._bpe.eot_token_id), strict=True))

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, without the start and end tokens."""
        bpe, ids = self._bpe, []
        for word in _OPENAI_SPLIT.findall(bpe.clean_fn(text)):
            if word in self._specials:
                ids.append(self._specials[word])
                continue
            word = "".join(bpe.byte_encoder[byte] for byte in word.encode("utf-8"))
            ids.extend(bpe.encoder[piece] for piece in bpe.bpe(word).split(" "))
        return ids

    def __call__(self, texts: str | list[str]) -> Tokens:
        if isinstance(texts, str):
            texts = [texts]
        bpe = self._bpe
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        truncated = []
        for row, text in enumerate(texts):
            tokens = [bpe.sot_token_id, *self.encode(text), bpe.eot_token_id]
            truncated.append(len(tokens) > self.context_length)
            if truncated[-1]:
                tokens = tokens[: self.context_length - 1] + [bpe.eot_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return Tokens(ids, truncated)


# ATen runs a float32 convolution of one image with a 1x1 kernel on oneDNN only with more than one
# thread and over this many input elements (else on its own kernel, a BLAS matmul as F.linear's).
ONEDNN_MIN_ELEMENTS = 20480


def _as_pixels(rows: torch.Tensor) -> torch.Tensor:
    """``[..., c]`` -> the channels-last image ``[1, c, rows, 1]`` of its rows (a view if contiguous)."""
    return rows.contiguous().view(1, -1, 1, rows.shape[-1]).permute(0, 3, 1, 2)


def _as_rows(pixels: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``_as_pixels``, to ``[*shape, c]``."""
    return pixels.permute(0, 2, 3, 1).reshape(*shape, pixels.shape[1])


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` of float32 CPU tensors as 1x1 convolutions, the rows of ``x`` the pixels of an
    image. Autograd keeps what it keeps for ``F.linear``: the input only if the weight needs a
    gradient (for a convolution it would keep both, always)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return _as_rows(F.conv2d(_as_pixels(x), weight[:, :, None, None], bias), x.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if need_x:
            pixels = _as_pixels(grad)
            # the input gradient reads only the input's shape and layout: an unfilled stand-in
            stand_in = _as_pixels(torch.empty(pixels.shape[2], weight.shape[1], dtype=grad.dtype))
            args = (None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])
            grad_pixels = torch.ops.aten.convolution_backward(pixels, stand_in, weight[:, :, None, None], *args)[0]
            grad_x = _as_rows(grad_pixels, grad.shape[:-1])
        if need_weight:
            grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)
        if need_bias:
            grad_bias = grad.flatten(0, -2).sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, run on oneDNN as 1x1 convolutions when it is float32 on the CPU.

    PyTorch gives a float32 ``F.linear`` on the CPU to MKL, which takes its AVX2 code path on AMD
    CPUs; a 1x1 convolution goes to oneDNN, which takes the AVX-512 one. On CLIP's shapes (ViT-B/32
    and ViT-L/14, 8 cutouts) forward and backward ran 2.0-2.1 times as fast on a Zen 5 CPU; results
    differ from ``F.linear``'s by float32 rounding, and autograd keeps the same tensors. Under
    autocast, in other dtypes, on other devices, and where PyTorch would not give the convolution to
    oneDNN (one thread, small inputs: ``ONEDNN_MIN_ELEMENTS``) it is ``F.linear``.
    """
    if not (x.device.type == "cpu" and compute_dtype(x) == torch.float32 and weight.dtype == torch.float32):
        return F.linear(x, weight, bias)
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    if not onednn or torch.get_num_threads() < 2 or x.dim() < 2 or x.numel() <= ONEDNN_MIN_ELEMENTS:
        return F.linear(x, weight, bias)
    return _OneDnnLinear.apply(x, weight, bias)


class Linear(nn.Linear):
    """An ``nn.Linear`` computed by ``linear``, holding the parameters of the one it replaces (state
    dict keys are unchanged)."""

    def __init__(self, module: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.weight = module.weight
        self.bias = module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PatchEmbedding(nn.Module):
    """A ViT's patchify conv (kernel = stride, no padding, no bias) as one matmul.

    ``[b, 3, h, w] -> [b, width, h // p, w // p]``, the conv's output. The patches do not
    overlap, so they are a reshape of the image, and the conv is one ``[b * n, 3 p^2]`` by
    ``[3 p^2, width]`` matmul. oneDNN's strided conv, forward and backward, was 3 times as slow
    in float32 and 6.5 times in bf16 (8 cutouts, ViT-B/32, CPU). ``weight`` is the conv's own
    parameter, so state dict keys are unchanged.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        patch = conv.kernel_size
        if conv.stride != patch or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"not a patchify conv: {conv}")
        if conv.bias is not None:
            raise ValueError("a patchify conv with a bias is not supported")
        self.weight = conv.weight
        self.patch = patch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (ph, pw), (b, c, h, w) = self.patch, images.shape
        gh, gw = h // ph, w // pw  # like the conv, drop a remainder
        patches = images[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        embeds = linear(patches, self.weight.flatten(1))  # [b, n, width]
        return embeds.unflatten(1, (gh, gw)).permute(0, 3, 1, 2)


def cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for bf16 ``[b, heads, tokens, d]`` on the CPU, as matmuls.

    Forward+backward, 8 images with heads of 64: ViT-L/14's 257 tokens (16 heads) 28 ms a layer
    against 53 for PyTorch's CPU flash kernel and 56 for its math backend; ViT-B/32's 50 tokens
    (12 heads) 1.5 ms against 5.9 and 2.2. A bf16 matmul rounds its output, and a logit rounded
    to 8 bits of mantissa loses more the larger it is, so a first, gradient-free pass finds each
    row's largest logit and the second subtracts it inside the matmul (``baddbmm`` accumulates in
    fp32 before it rounds): the logits that dominate the softmax come out near 0, where bf16 is
    fine. The softmax is in fp32 and shift-invariant, so the gradient is unchanged. Against fp64
    from the same bf16 inputs, outputs and gradients are off by 0.0023-0.0034 relative, the
    flash kernel's by 0.0017-0.0039 and the math backend's (which computes in fp32) by 0.0017
    (logits of std 4 and 30; ``tests/test_clip.py``).
    """
    batch, heads, tokens, dim = q.shape
    q = (q * dim**-0.5).flatten(0, 1)
    kt = k.flatten(0, 1).transpose(-1, -2)
    with torch.no_grad():
        row_max = torch.bmm(q, kt).amax(-1, keepdim=True)
    logits = torch.baddbmm(-row_max.expand(-1, -1, kt.shape[-1]), q, kt)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(probs, v.flatten(0, 1)).view(batch, heads, tokens, dim)


def takes_cpu_bf16_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``SelfAttention`` (unmasked) runs ``cpu_bf16_attention`` for inputs on ``device`` in
    ``dtype``. That attention keeps each layer's scores for the backward pass, tokens x tokens per
    head; the flash kernels ``F.scaled_dot_product_attention`` runs otherwise keep none."""
    return device.type == "cpu" and dtype == torch.bfloat16


class SelfAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (sequence-first, no extras) as plain self-attention, with its
    own parameters, so state dict keys are unchanged.

    ``F.scaled_dot_product_attention`` as the module itself uses, except for bf16 on the CPU,
    where ``cpu_bf16_attention`` is twice as fast. Called as the module is: ``(x, x, x,
    need_weights=False, attn_mask=None)`` -> ``(out, None)``.
    """

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        extras = attention.bias_k is not None or attention.add_zero_attn or attention.dropout
        if attention.batch_first or not attention._qkv_same_embed_dim or extras:
            raise ValueError(f"only sequence-first self-attention without extras is supported: {attention}")
        self.num_heads = attention.num_heads
        self.in_proj_weight = attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = Linear(attention.out_proj)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask: torch.Tensor | None = None):
        if key is not query or value is not query or need_weights:
            raise ValueError("SelfAttention takes query = key = value and gives no weights")
        if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.dim() != 2):
            raise ValueError("SelfAttention takes no mask or an additive float [tokens, tokens] mask")
        tokens, batch, width = query.shape
        qkv = linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(tokens, batch, 3, self.num_heads, width // self.num_heads).permute(2, 1, 3, 0, 4)
        if attn_mask is None and takes_cpu_bf16_attention(q.device, q.dtype):
            out = cpu_bf16_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(tokens, batch, width)), None


@dataclass(frozen=True)
class ImageTower:
    """The shape of CLIP's vision transformer: what a memory estimate needs to know of it."""

    tokens: int  # per image, the class token included
    width: int
    layers: int
    heads: int


class ClipEncoder(nn.Module):
    """An open_clip ``CLIP`` with the two views the project needs.

    ``encode_text`` gives the prior's conditioning; ``encode_image`` is differentiable and takes
    images already resized to ``image_size`` and normalised with ``normalize``.
    """

    def __init__(self, model: open_clip.model.CLIP):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        # Sequence-first attention in the image tower: batch-first made nn.MultiheadAttention's
        # backward copy its input projection once per token (ViT-L/14, 8 cutouts, CPU: fp32
        # 16.3 s -> 10.4 s, bf16 68 s -> 4.6 s per forward+backward); outputs agree to 2e-6.
        # Its attention modules become SelfAttention (the same parameters; faster bf16 on a CPU).
        model.visual.transformer.batch_first = False
        for block in model.visual.transformer.resblocks:
            if isinstance(block.attn, nn.MultiheadAttention):
                block.attn.batch_first = False
                block.attn = SelfAttention(block.attn)
        model.visual.conv1 = PatchEmbedding(model.visual.conv1)
        for parent in list(model.modules()):  # the MLPs' linears
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    setattr(parent, name, Linear(child))
        self.tokenize = Tokenizer(model.context_length)
        self.image_size = int(model.visual.image_size[0])
        self.image_tokens = int(model.visual.grid_size[0] * model.visual.grid_size[1]) + 1  # with the class token
        self.embed_dim = int(model.text_projection.shape[1])
        tower = model.visual.transformer
        self.image_tower = ImageTower(
            self.image_tokens, int(tower.width), int(tower.layers), int(tower.resblocks[0].attn.num_heads)
        )
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, h, w]`` in [0, 1] -> CLIP's input statistics."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> TextEncoding:
        """Token ids ``[b, 77]`` -> embedding, ``ln_final`` states and key mask, all float32."""
        states: list[torch.Tensor] = []
        handle = self.model.ln_final.register_forward_hook(lambda _m, _i, out: states.append(out))
        try:
            embed = self.model.encode_text(ids)
        finally:
            handle.remove()
        return TextEncoding(F.normalize(embed.float(), dim=-1), states[0].float(), ids != 0)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[b, 3, S, S]`` -> raw image embeddings ``[b, d]`` (differentiable)."""
        return self.model.encode_image(images)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[b, 3, h, w]`` in [0, 1] -> l2-normalised embeddings ``[b, d]`` (float32).

        Resizes with antialiased bicubic interpolation to ``image_size`` (no crop).
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", antialias=True)
        return F.normalize(self.encode_image(self.normalize(images)).float(), dim=-1)


def clip_model(config: dict) -> open_clip.model.CLIP:
    """An open_clip ``CLIP`` from a model config dict (random init from the global RNG)."""
    return open_clip.model.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=config.get("quick_gelu", True),
    )


def build_clip(config: dict) -> ClipEncoder:
    """A randomly initialised float32 CLIP encoder (uses the global RNG)."""
    return ClipEncoder(clip_model(config))


def openai_clip_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """The open_clip model config of an OpenAI-format ViT CLIP state dict, read off its shapes."""
    patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = state_dict["ln_final.weight"].shape[0]
    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": patch * grid,
            "patch_size": patch,
            "width": state_dict["visual.conv1.weight"].shape[0],
            "layers": sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in state_dict),
        },
        "text_cfg": {
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "width": width,
            "heads": width // 64,
            "layers": len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
        },
    }
