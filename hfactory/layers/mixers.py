"""Token mixers on the channels-last grid ``(B, H, W, C) -> (B, H, W, C)``.

Builders of the ``token_mixer`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .feedforward import make_activation

__all__ = ["Attention", "Pooling", "SepConv", "Identity", "apply_rotary"]


def apply_rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding over the sequence axis of ``x`` ``(B, H, N, D)`` (D even).

    As xformers' ``RotaryEmbedding`` (RoFormer, arXiv 2104.09864): frequencies
    ``base^(-2i/D)``, the feature halves rotated (``rotate_half``), position = token index.
    """
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(n, device=x.device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens (ViT, arXiv 2010.11929; timm
    ``vision_transformer.Attention`` parameter names ``qkv`` and ``proj``).

    Input ``(B, H, W, C)`` or ``(B, N, C)``; the output has the input's shape. Tokens are
    flattened, so order does not matter (attention is permutation-equivariant). The kernel is
    chosen by :func:`hfactory.layers.attention.attention` from ``self.backend``.
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rotary: bool = False, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.rotary = rotary
        inner = num_heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        x = self.proj(x.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(x).reshape(shape)


class Pooling(nn.Module):
    """PoolFormer's token mixer ``avgpool(x) - x`` (arXiv 2111.11418; timm ``metaformer.Pooling``):
    stride 1, padding ``pool_size // 2``, padded cells not counted. ``(B, H, W, C)`` in and out."""

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return y - x


class SepConv(nn.Module):
    """ConvFormer's separable conv (arXiv 2210.13452; timm ``metaformer.SepConv`` names
    ``pwconv1``, ``act``, ``dwconv``, ``pwconv2``): ``(B, H, W, C) -> (B, H, W, C)``."""

    def __init__(self, dim: int, hidden_chs: int, kernel_size: int = 7, activation: str = "star_relu",
                 bias: bool = False):
        super().__init__()
        self.pwconv1 = nn.Linear(dim, hidden_chs, bias=bias)
        self.act = make_activation(activation)
        self.dwconv = nn.Conv2d(hidden_chs, hidden_chs, kernel_size, padding=kernel_size // 2,
                                groups=hidden_chs, bias=bias)
        self.pwconv2 = nn.Linear(hidden_chs, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(x)


class Identity(nn.Identity):
    """No token mixing (IdentityFormer, arXiv 2210.13452)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
