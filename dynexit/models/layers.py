"""Attention building blocks of the latent branch.

Shapes: tokens are (batch, tokens, channels); feature maps are (batch, channels, height, width).
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``; the q/k/v projections are
fused (one matmul for self-attention, one for keys and values in cross-attention) so that the many small
latent-token layers launch as few kernels as possible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynexit.models.pooled_depthwise import pooled_depthwise_residual


class MLP(nn.Module):
    """Pre-norm feed-forward: LayerNorm -> Linear(C, w*C) -> GELU -> Linear(w*C, C) -> dropout."""

    def __init__(self, channels: int, widening: int = 1, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, widening * channels)
        self.fc2 = nn.Linear(widening * channels, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over latent tokens; q/k/v have the width of the tokens."""

    def __init__(self, channels: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> three (B, heads, N, C / heads) views, in one reshape (chunking first costs more calls).
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Single-head attention of query tokens onto context tokens.

    ``qk_channels`` is the width of queries, keys and values (the official model shrinks it to 1/8 of
    the query width when feature-map pixels query the latents). ``key_tokens``, when given, adds a learned
    position embedding to the keys after their projection (the official "relative position bias", which
    is in effect absolute over the pooled token grid).
    """

    def __init__(
        self,
        q_channels: int,
        kv_channels: int,
        qk_channels: int,
        dropout: float = 0.0,
        key_tokens: int | None = None,
    ):
        super().__init__()
        self.qk_channels = qk_channels
        self.dropout = dropout
        self.q = nn.Linear(q_channels, qk_channels, bias=False)
        self.kv = nn.Linear(kv_channels, 2 * qk_channels, bias=False)
        self.proj = nn.Linear(qk_channels, q_channels)
        if key_tokens is not None:
            self.key_pos = nn.Parameter(torch.zeros(1, key_tokens, qk_channels))
        else:
            self.register_parameter("key_pos", None)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        if self.key_pos is not None:
            k = k + self.key_pos
        q = self.q(queries)
        # One head: add the head axis for SDPA, drop it after.
        out = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.squeeze(1))


class SelfAttentionLayer(nn.Module):
    """z += Attn(LN(z)); z += MLP(z)."""

    def __init__(self, channels: int, num_heads: int, widening: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = SelfAttention(channels, num_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.mlp = MLP(channels, widening, dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.drop(self.attn(self.norm(z)))
        return z + self.mlp(z)


class CrossAttentionLayer(nn.Module):
    """q += Attn(LN_q(q), LN_kv(context)); q += MLP(q), with an MLP of widening 1."""

    def __init__(
        self,
        q_channels: int,
        kv_channels: int,
        qk_channels: int,
        dropout: float = 0.0,
        key_tokens: int | None = None,
    ):
        super().__init__()
        self.q_norm = nn.LayerNorm(q_channels)
        self.kv_norm = nn.LayerNorm(kv_channels)
        self.attn = CrossAttention(q_channels, kv_channels, qk_channels, dropout, key_tokens)
        self.drop = nn.Dropout(dropout)
        self.mlp = MLP(q_channels, 1, dropout)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        queries = queries + self.drop(self.attn(self.q_norm(queries), self.kv_norm(context)))
        return queries + self.mlp(queries)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)


class FeaturesToLatents(nn.Module):
    """x2z: the latents read the feature map, pooled to a fixed token grid.

    With ``dwc`` a depthwise 7x7 convolution is added to the map as a residual positional encoding
    before pooling, computed through the pooling where the cells allow (``pooled_depthwise``).
    """

    def __init__(self, channels: int, token_grid: int, dwc: bool, dropout: float = 0.0):
        super().__init__()
        self.dwc = nn.Conv2d(channels, channels, 7, padding=3, groups=channels) if dwc else None
        self.pool = nn.AdaptiveAvgPool2d(token_grid)
        self.cross = CrossAttentionLayer(channels, channels, channels, dropout, key_tokens=token_grid**2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.dwc is not None:
            tokens = pooled_depthwise_residual(x, self.dwc, self.pool.output_size)
        else:
            tokens = self.pool(x)
        return self.cross(z, map_to_tokens(tokens))


class LatentsToFeatures(nn.Module):
    """z2x (and the last cross-attention): every pixel of the map reads the latents."""

    def __init__(self, map_channels: int, latent_channels: int, dropout: float = 0.0):
        super().__init__()
        self.cross = CrossAttentionLayer(map_channels, latent_channels, map_channels // 8, dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # One copy to contiguous tokens up front (none for channels_last maps): every later op over the
        # pixels then runs on contiguous memory instead of strided views.
        return tokens_to_map(self.cross(map_to_tokens(x).contiguous(), z), h, w)


class TokenMixer(nn.Module):
    """Changes the number of latent tokens: LayerNorm + Linear over the token axis."""

    def __init__(self, tokens_in: int, tokens_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(tokens_in)
        self.fc = nn.Linear(tokens_in, tokens_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(z.transpose(1, 2))).transpose(1, 2)


class TokenExpander(nn.Module):
    """Changes the width of latent tokens: LayerNorm + Linear over channels."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels_in)
        self.fc = nn.Linear(channels_in, channels_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(z))
