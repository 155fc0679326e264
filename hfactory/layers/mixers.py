"""Token mixers on the channels-last grid ``(B, H, W, C) -> (B, H, W, C)``.

Builders of the ``token_mixer`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .feedforward import make_activation
from .layout import TokenLinear, pool_hw
from .token_sizes import key_size_bias

__all__ = ["Attention", "MaskUnitAttention", "Pooling", "SepConv", "Identity", "apply_rotary"]


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

    Tokens in any layout: ``(B, N, C)``, grid ``(B, H, W, C)`` or units ``(B, U, uh, uw, C)``;
    attention is permutation-equivariant, so all tokens are flattened. With ``q_stride`` (the
    first block of a Hiera q-pooling stage) the projected queries are max-pooled over the
    ``(h, w)`` axes, so the output has the pooled spatial shape and ``dim`` channels while the
    input has ``dim_in`` (timm ``hiera.MaskUnitAttention`` with ``use_mask_unit_attn=False``).
    The kernel is chosen by :func:`hfactory.layers.attention.attention` from ``self.backend``.

    With ``token_sizes`` (tokens merged by an earlier downsampler) the module takes the sizes
    ``(B, N)`` of its input tokens, ``forward(x, sizes)``, and adds ``log(size)`` of each key to
    the scores (``takes_token_sizes``, :mod:`hfactory.layers.token_sizes`).
    """

    per_unit = False

    def __init__(self, dim: int, num_heads: int, dim_head: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rotary: bool = False, dim_in: int | None = None,
                 q_stride: list[int] | None = None, backend: str = "auto", token_sizes: bool = False):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        # forward(x, sizes): add log(key size) to the scores (the token-sizes protocol,
        # hfactory.layers.token_sizes; the plan sets it after a merging downsampler)
        self.takes_token_sizes = token_sizes
        self.rotary = rotary
        self.q_stride = tuple(q_stride) if q_stride else None
        inner = num_heads * dim_head
        # TokenLinear: an nn.Linear that runs on oneDNN on the CPU (speed, see its docstring).
        self.qkv = TokenLinear(dim_in or dim, 3 * inner, bias=qkv_bias)
        self.proj = TokenLinear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, ..., inner)`` -> ``(B', heads, T, dim_head)``; ``B' = B*U`` per unit, else ``B``."""
        b = t.shape[0] * t.shape[1] if self.per_unit else t.shape[0]
        return t.reshape(b, -1, self.num_heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # same split as timm's reshape(..., 3, heads, dim_head)
        if self.q_stride is not None:
            q = pool_hw(q, self.q_stride)
        out_shape = q.shape[:-1]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        bias = None
        if self.takes_token_sizes:
            bias = key_size_bias(sizes, k.shape[0], k.shape[2], "attention", q.dtype)
        o = attention(q, k, v, bias, dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        o = o.transpose(1, 2).reshape(*out_shape, -1)
        return self.proj_drop(self.proj(o))


class MaskUnitAttention(Attention):
    """Hiera's mask-unit attention (arXiv 2306.00989; timm ``hiera.MaskUnitAttention``): attention
    inside each mask unit of the units layout ``(B, U, uh, uw, C)``, each unit a batch entry;
    with ``q_stride`` the queries are max-pooled inside the unit."""

    per_unit = True


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
        # TokenLinear: an nn.Linear that runs on oneDNN on the CPU (speed, see its docstring).
        self.pwconv1 = TokenLinear(dim, hidden_chs, bias=bias)
        self.act1 = make_activation(activation)
        self.dwconv = nn.Conv2d(hidden_chs, hidden_chs, kernel_size, padding=kernel_size // 2,
                                groups=hidden_chs, bias=bias)
        self.pwconv2 = TokenLinear(hidden_chs, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(x)


class Identity(nn.Identity):
    """No token mixing (IdentityFormer, arXiv 2210.13452)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
