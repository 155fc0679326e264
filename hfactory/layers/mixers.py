"""Token mixers on the channels-last grid ``(B, H, W, C) -> (B, H, W, C)``.

Builders of the ``token_mixer`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

__all__ = ["Attention", "Pooling", "Identity"]


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens (ViT, arXiv 2010.11929; timm
    ``vision_transformer.Attention`` parameter names ``qkv`` and ``proj``).

    Input ``(B, H, W, C)`` or ``(B, N, C)``; the output has the input's shape. Tokens are
    flattened, so order does not matter (attention is permutation-equivariant). The kernel is
    chosen by :func:`hfactory.layers.attention.attention` from ``self.backend``.
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        inner = num_heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
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


class Identity(nn.Identity):
    """No token mixing (IdentityFormer, arXiv 2210.13452)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
