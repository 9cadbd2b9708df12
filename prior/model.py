"""The dalle2-pytorch 0.11.5 diffusion prior network, reimplemented for inference.

Module and parameter names follow 0.11.5 exactly (``causal_transformer.layers.3.0.to_q.weight``
...), so a 0.11.5 ``net.*`` state dict loads as it is. Sequence of one forward::

    [77 text encodings, text embedding, timestep embedding, noised image embedding, query]

The prediction (x0, at ``image_embed_scale``) is the query token's output. Attention is causal,
so the 78 text tokens never see the last three: their keys and values are the same at every
diffusion step. ``encode_prefix`` computes them once and ``step`` then runs only the last three
tokens. ``forward`` runs all 81 tokens through the same code; it is the reference for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig

NUM_TAIL_TOKENS = 3  # timestep, noised image embedding, learned query


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose few-row bf16 CPU product runs as ``W @ x.T``.

    A diffusion step feeds only a handful of rows, so it is bound by reading the weights; for
    bf16 on the CPU that orientation streams them about 1.6 times faster than ``x @ W.T``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= 32:
            return (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


class LayerNorm(nn.Module):
    """0.11.5's LayerNorm: a learned ``gamma`` and a persistent (zero) ``beta`` buffer."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int, post_activation_norm: bool) -> nn.Sequential:
    """LN, Linear(dim, 2*inner), SwiGLU, LN(inner) (normformer), [dropout], Linear(inner, dim)."""
    inner = mult * dim
    return nn.Sequential(
        LayerNorm(dim),
        Linear(dim, inner * 2),
        SwiGLU(),
        LayerNorm(inner) if post_activation_norm else nn.Identity(),
        nn.Identity(),  # dropout in training; keeps the 0.11.5 indices of the next layer
        Linear(inner, dim),
    )


class RotaryEmbedding(nn.Module):
    """rotary-embedding-torch 0.1.5 ("lang" frequencies, interleaved pairs), as a buffer."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n]`` integer positions -> ``[n, dim]`` rotation angles, each frequency twice."""
        return (positions.to(self.freqs.dtype)[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x [..., n, d]`` by position."""
    width = cos.shape[-1]
    x_rot, x_pass = x[..., :width], x[..., width:]
    x1, x2 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
    half_turn = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + half_turn * sin, x_pass), dim=-1)


class RelPosBias(nn.Module):
    """T5 relative position bias (causal buckets), ``[heads, queries, keys]``."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        n = (q_pos[:, None] - k_pos[None, :]).clamp(min=0)
        max_exact = self.num_buckets // 2
        large = (
            max_exact
            + (
                torch.log(n.float() / max_exact)
                / math.log(self.max_distance / max_exact)
                * (self.num_buckets - max_exact)
            ).long()
        )
        large = large.clamp(max=self.num_buckets - 1)
        bucket = torch.where(n < max_exact, n, large)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-query attention: ``heads`` queries share one key/value head; a learned null k/v."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads, self.dim_head = config.heads, config.dim_head
        self.scale = config.dim_head**-0.5
        inner = config.heads * config.dim_head
        self.norm = LayerNorm(config.dim)
        self.null_kv = nn.Parameter(torch.randn(2, config.dim_head))
        self.to_q = Linear(config.dim, inner)
        self.to_kv = Linear(config.dim, config.dim_head * 2)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim)
        self.to_out = nn.Sequential(Linear(inner, config.dim), LayerNorm(config.dim))

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        attn_bias: torch.Tensor,
    ) -> torch.Tensor:
        """``x [b, n, dim]`` -> ``[b, n, dim]``; its keys and values go into the last ``n`` rows of
        the buffers ``kv`` (``[b, 1 + p + n, dim_head]``: the null key, ``p`` earlier tokens, these).

        ``attn_bias [b, n, heads, 1 + p + n]``. With one shared key head, the queries of every
        head and position form the rows of a single batched product (no transposes needed).
        """
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head) * self.scale
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q = rotate(q.transpose(1, 2), *rotation).transpose(1, 2)
        keys, values = kv
        keys[:, -n:] = rotate(k, *rotation)
        values[:, -n:] = v
        sim = torch.baddbmm(attn_bias.reshape(b, n * self.heads, -1), q.reshape(b, n * self.heads, -1), keys.mT)
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(values.dtype)
        return self.to_out(torch.bmm(attn, values).view(b, n, -1))


class CausalTransformer(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.rel_pos_bias = RelPosBias(config.heads)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(config), feed_forward(config.dim, config.ff_mult, config.normformer)])
            for _ in range(config.depth)
        )
        self.norm = LayerNorm(config.dim)
        self.project_out = Linear(config.dim, config.dim)

    def attn_bias(self, start: int, n: int, key_mask: torch.Tensor) -> torch.Tensor:
        """Additive bias ``[b, n, heads, 1 + start + n]`` for queries at ``start..start+n-1``.

        Key 0 is the null key. Relative positions count it, as 0.11.5 does (n queries by
        n + 1 keys); the causal mask lets query ``i`` see keys ``0..i+1``; ``key_mask [b,
        start + n]`` hides absent tokens.
        """
        device = key_mask.device
        q_pos = torch.arange(start, start + n, device=device)
        k_pos = torch.arange(start + n + 1, device=device)
        bias = self.rel_pos_bias(q_pos, k_pos).float().transpose(0, 1)
        visible = (k_pos[None, :] <= q_pos[:, None] + 1)[:, None, :] & F.pad(key_mask, (1, 0), value=True)[
            :, None, None
        ]
        return bias.masked_fill(~visible, float("-inf"))

    def kv_buffers(self, batch: int, length: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, key and value buffers ``[batch, 1 + length, dim_head]`` holding the null k/v."""
        buffers = []
        for attn, _ in self.layers:
            null = attn.null_kv.to(like.dtype)
            keys = like.new_empty(batch, 1 + length, attn.dim_head)
            values = torch.empty_like(keys)
            keys[:, 0], values[:, 0] = null[0], null[1]
            buffers.append((keys, values))
        return buffers

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        attn_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Run tokens at positions ``start..`` after the ``start`` tokens whose keys and values fill
        the buffers ``kv`` (one pair per layer, see ``kv_buffers``); theirs are written in too."""
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        angles = self.layers[0][0].rotary_emb.angles(positions)
        rotation = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # angles stay float32
        bias = attn_bias.to(x.dtype)
        for (attn, ff), layer_kv in zip(self.layers, kv, strict=True):
            x = attn(x, rotation, layer_kv, bias) + x
            x = ff(x) + x
        return x


@dataclass
class PrefixCache:
    """Keys and values of the 78 text tokens at every layer, with room for the 3 tail tokens,
    and the attention bias of the tail tokens."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [b, 1 + 78 + 3, dim_head] each
    attn_bias: torch.Tensor  # [b, 3, heads, 82]

    @property
    def start(self) -> int:
        """Position of the first tail token (78)."""
        return self.kv[0][0].shape[1] - 1 - NUM_TAIL_TOKENS

    @staticmethod
    def cat(caches: list[PrefixCache]) -> PrefixCache:
        """Stack the rows of several caches (for example the conditional and unconditional branch)."""
        layers = zip(*(c.kv for c in caches), strict=True)
        kv = [(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer])) for layer in layers]
        return PrefixCache(kv, torch.cat([c.attn_bias for c in caches], dim=0))

    def repeat_interleave(self, n: int) -> PrefixCache:
        """Each row ``n`` times in a row (captions -> candidates)."""
        kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv]
        return PrefixCache(kv, self.attn_bias.repeat_interleave(n, 0))


class PriorNetwork(nn.Module):
    """0.11.5 ``DiffusionPriorNetwork`` (``net.*``), predicting x0 of the scaled image embedding."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.to_time_embeds = nn.Sequential(nn.Embedding(config.num_timesteps, config.dim))
        self.learned_query = nn.Parameter(torch.randn(config.dim))
        self.causal_transformer = CausalTransformer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.learned_query.dtype

    def cast(self, dtype: torch.dtype) -> PriorNetwork:
        """Run in ``dtype``: parameters and LayerNorm offsets are cast, rotary frequencies stay
        float32 (positions up to 80 times a frequency need float32 angles)."""
        for module in self.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
            if isinstance(module, LayerNorm):
                module.beta = module.beta.to(dtype)
        return self

    def _prefix_tokens(self, text_embed: torch.Tensor, text_encodings: torch.Tensor) -> torch.Tensor:
        return torch.cat((text_encodings, text_embed[:, None]), dim=1).to(self.dtype)

    def _tail_tokens(self, image_embed: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b = image_embed.shape[0]
        return torch.cat(
            (
                self.to_time_embeds(timesteps)[:, None],
                image_embed[:, None].to(self.dtype),
                self.learned_query.expand(b, 1, -1),
            ),
            dim=1,
        )

    def _key_mask(self, text_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[b, 78]``: text tokens present and kept, the text embedding kept (``keep [b]``)."""
        return torch.cat((text_mask & keep[:, None], keep[:, None]), dim=1)

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        t = self.causal_transformer
        return t.project_out(t.norm(x[:, -1])).float()

    def forward(
        self,
        image_embed: torch.Tensor,
        timesteps: torch.Tensor,
        text_embed: torch.Tensor,
        text_encodings: torch.Tensor,
        text_mask: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """All 81 tokens in one pass: ``[b, dim]`` x0 prediction (float32).

        ``keep [b]`` is False for unconditional rows (0.11.5's ``cond_drop_prob=1``).
        """
        tokens = torch.cat(
            (self._prefix_tokens(text_embed, text_encodings), self._tail_tokens(image_embed, timesteps)), 1
        )
        key_mask = F.pad(self._key_mask(text_mask, keep), (0, NUM_TAIL_TOKENS), value=True)
        transformer = self.causal_transformer
        kv = transformer.kv_buffers(tokens.shape[0], tokens.shape[1], tokens)
        return self._readout(transformer(tokens, 0, kv, transformer.attn_bias(0, tokens.shape[1], key_mask)))

    def encode_prefix(
        self, text_embed: torch.Tensor, text_encodings: torch.Tensor, text_mask: torch.Tensor, keep: torch.Tensor
    ) -> PrefixCache:
        """The per-request part of every step: run the 78 text tokens once."""
        tokens = self._prefix_tokens(text_embed, text_encodings)
        b, n, _ = tokens.shape
        key_mask = self._key_mask(text_mask, keep)
        transformer = self.causal_transformer
        kv = transformer.kv_buffers(b, n + NUM_TAIL_TOKENS, tokens)
        prefix_kv = [(k[:, : 1 + n], v[:, : 1 + n]) for k, v in kv]  # views: filled in place
        transformer(tokens, 0, prefix_kv, transformer.attn_bias(0, n, key_mask))
        tail_mask = F.pad(key_mask, (0, NUM_TAIL_TOKENS), value=True)
        return PrefixCache(kv, transformer.attn_bias(n, NUM_TAIL_TOKENS, tail_mask))

    def drop_text(self, cache: PrefixCache) -> PrefixCache:
        """The unconditional branch of ``cache``: every text key hidden, as 0.11.5's null pass.

        Hidden keys need no values of their own, so the buffers are shared.
        """
        b, n = cache.attn_bias.shape[0], cache.start
        key_mask = torch.zeros(b, n + NUM_TAIL_TOKENS, dtype=torch.bool, device=cache.attn_bias.device)
        key_mask[:, n:] = True
        return PrefixCache(cache.kv, self.causal_transformer.attn_bias(n, NUM_TAIL_TOKENS, key_mask))

    def step(self, image_embed: torch.Tensor, timesteps: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """The x0 prediction from the 3 tail tokens after a cached prefix: ``[b, dim]`` float32.

        Writes the tail's keys and values into the cache's spare rows.
        """
        tokens = self._tail_tokens(image_embed, timesteps)
        return self._readout(self.causal_transformer(tokens, cache.start, cache.kv, cache.attn_bias))
