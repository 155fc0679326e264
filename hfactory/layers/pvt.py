"""PVTv2 modules: spatial-reduction attention (and the linear variant) and the MLP with a
depth-wise conv; channels-last grids ``(B, H, W, C)`` in and out.

Source: Wang et al., arXiv 2106.13797; the reference behaviour is timm ``models/pvt_v2.py``
(``Attention``, ``MlpWithDepthwiseConv``), whose parameter names these modules keep. Builders of
the ``token_mixer`` / ``feedforward`` registry entries ``sr_attention`` / ``dwconv_mlp`` (params
and plan arithmetic in :mod:`hfactory.spec.pvt`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import attention
from .feedforward import make_activation

__all__ = ["SpatialReductionAttention", "DWConvMlp"]


class SpatialReductionAttention(nn.Module):
    """PVTv2 spatial-reduction attention, ``(B, H, W, C) -> (B, H, W, C)`` (arXiv 2106.13797; timm
    ``pvt_v2.Attention``).

    ``q = q(x)`` over all ``H*W`` tokens; keys and values ``kv(r)`` from ``r``: the tokens
    themselves (``sr_ratio`` 1), ``norm(sr(x))`` with ``sr`` a ``sr_ratio``-strided conv
    (``(H // sr) * (W // sr)`` keys), or, ``linear``, ``GELU(norm(sr(adaptive_avg_pool(x, pool_size))))``
    with ``sr`` a 1x1 conv (``pool_size**2`` keys). Then ``proj`` of the heads' outputs.
    Attention runs through :func:`hfactory.layers.attention.attention` (``backend``).
    ``kv_grid`` is the plan's reduced grid (informational; any input size works).
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, sr_ratio: int = 1, linear: bool = False,
                 pool_size: int = 7, qkv_bias: bool = True, norm_eps: float = 1e-5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kv_grid: Optional[list[int]] = None, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.sr_ratio, self.linear = sr_ratio, linear
        inner = num_heads * dim_head
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if linear else None
        if linear or sr_ratio > 1:
            k = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=k, stride=k)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        else:
            self.sr = self.norm = None
        self.act = nn.GELU() if linear else None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q = self.q(x).reshape(b, h * w, self.num_heads, self.dim_head).transpose(1, 2)
        r = x
        if self.sr is not None:
            r = x.permute(0, 3, 1, 2)
            if self.pool is not None:
                r = self.pool(r)
            r = self.norm(self.sr(r).flatten(2).transpose(1, 2))
            if self.act is not None:
                r = self.act(r)
        kv = self.kv(r.reshape(b, -1, c)).reshape(b, -1, 2, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        o = attention(q, k, v, scale=self.dim_head ** -0.5,
                      dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        o = o.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj_drop(self.proj(o))


class DWConvMlp(nn.Module):
    """PVTv2's MLP, ``(B, H, W, C) -> (B, H, W, C)`` (arXiv 2106.13797; timm
    ``pvt_v2.MlpWithDepthwiseConv``): ``fc1 -> [ReLU if extra_relu] -> depthwise kernel_size conv
    (padding kernel_size // 2, bias) -> act -> drop -> fc2 -> drop``."""

    def __init__(self, dim: int, hidden_features: int, kernel_size: int = 3, activation: str = "gelu",
                 extra_relu: bool = False, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, kernel_size, 1, kernel_size // 2,
                                groups=hidden_features)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"dwconv_mlp needs a (B, H, W, C) grid, got shape {tuple(x.shape)}")
        x = self.relu(self.fc1(x)).permute(0, 3, 1, 2)
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))
