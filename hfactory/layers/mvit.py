"""MViTv2 modules: pooling attention with decomposed relative positions and residual pooling;
channels-last grids ``(B, H, W, C)`` in and out.

Source: Li et al., "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection", arXiv 2112.01526; the reference behaviour is timm ``models/mvitv2.py``
(``MultiScaleAttention``, ``cal_rel_pos_type``, ``checkpoint_filter_fn``'s table resize), whose
parameter names this module keeps. Builder of the ``token_mixer`` registry entry
``mvit_attention`` (params and plan arithmetic in :mod:`hfactory.spec.mvit`); the stage
transition ``mvit_q_pool`` is fused into :class:`hfactory.layers.block.Block`
(``expand="proj_overlap"``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

__all__ = ["MViTAttention", "rel_pos_offsets", "resize_rel_pos"]


def rel_pos_offsets(q: int, k: int, device=None) -> torch.Tensor:
    """``(q, k)`` long row indices into one axis' relative-position table for ``q`` query and ``k``
    key positions: ``i * max(k/q, 1) - j * max(q/k, 1) + (k - 1) * max(q/k, 1)``, truncated (the
    offsets of the coarser grid are stretched to the finer one's spacing; timm
    ``cal_rel_pos_type``, computed in the same float32 arithmetic so truncation agrees)."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    d = (torch.arange(q, device=device, dtype=torch.long).unsqueeze(-1) * q_ratio
         - torch.arange(k, device=device, dtype=torch.long).unsqueeze(0) * k_ratio)
    d += (k - 1) * k_ratio
    return d.long()


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize one axis' table ``(L, D) -> (length, D)`` by linear interpolation over the rows
    (``align_corners=False``), as timm's ``mvitv2.checkpoint_filter_fn`` does on load."""
    if table.shape[0] == length:
        return table
    y = F.interpolate(table.T.unsqueeze(0).float(), size=length, mode="linear")
    return y.squeeze(0).T.to(table.dtype)


def _make_pool(pool: str, dim_head: int, kernel: tuple[int, int], stride: tuple[int, int], eps: float):
    """The pooling of one of q/k/v and its norm; ``(None, None)`` for kernel and stride 1."""
    if kernel == (1, 1) and stride == (1, 1):
        return None, None
    padding = (kernel[0] // 2, kernel[1] // 2)
    if pool == "conv":
        conv = nn.Conv2d(dim_head, dim_head, kernel, stride=stride, padding=padding, groups=dim_head, bias=False)
        return conv, nn.LayerNorm(dim_head, eps=eps)
    op = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    return op(kernel, stride, padding), None


class MViTAttention(nn.Module):
    """MViTv2 pooling attention, ``(B, H, W, C_in) -> (B, H / sq, W / sw, C)`` (arXiv 2112.01526;
    timm ``mvitv2.MultiScaleAttention``), ``C = num_heads * dim_head``, ``(sq, sw) = q_stride``.

    1. ``qkv = Linear(C_in, 3C)`` split ``[q|k|v]``, heads major inside each;
    2. each of q, k, v pooled per head on the grid, ``(B*heads, dim_head, H, W)``: ``pool_q``
       (``kernel_q``, stride ``q_stride``) then ``norm_q`` (LayerNorm over ``dim_head``), the
       same with ``kv_stride`` for k and v; a pooling of kernel and stride 1 is skipped;
    3. ``softmax(q k^T / sqrt(dim_head) + bias) v`` through
       :func:`hfactory.layers.attention.attention`, the bias ``(B, heads, Nq, Nk)`` being the
       decomposed relative positions ``bias[(i, j), (m, n)] = q_ij . rel_pos_h[dh(i, m)] +
       q_ij . rel_pos_w[dw(j, n)]`` (:func:`rel_pos_offsets`) of the pooled, normed queries;
    4. ``+ q`` (residual pooling), heads concatenated, ``proj = Linear(C, C)``.

    ``rel_pos_h`` ``(Lh, dim_head)`` / ``rel_pos_w`` ``(Lw, dim_head)`` are sized by the plan
    (``rel_pos_size``) for the grid of the spec's ``img_size``; at another input grid they are
    resized linearly to ``2 * max(q, kv) - 1`` rows per axis (:func:`resize_rel_pos`), which
    equals timm's model built at that size with the weights loaded through its
    ``checkpoint_filter_fn``. ``grid``, ``q_grid`` and ``kv_grid`` are the plan's (for
    ``extra_repr``); the module pools whatever grid it receives.
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, grid: list[int], q_grid: list[int],
                 kv_grid: list[int], rel_pos_size: list[int], kernel_q: list[int] = (3, 3),
                 kernel_kv: list[int] = (3, 3), kv_stride: list[int] = (1, 1), pool: str = "conv",
                 rel_pos: bool = True, residual_pooling: bool = True, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 attn_drop: float = 0.0, dim_in: Optional[int] = None, q_stride: Optional[list[int]] = None,
                 backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.residual_pooling = residual_pooling
        self.grid, self.q_grid, self.kv_grid = tuple(grid), tuple(q_grid), tuple(kv_grid)
        self.q_stride = tuple(q_stride) if q_stride else (1, 1)
        self.kv_stride = tuple(kv_stride)
        inner = num_heads * dim_head
        self.qkv = nn.Linear(dim_in or dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.pool_q, self.norm_q = _make_pool(pool, dim_head, tuple(kernel_q), self.q_stride, norm_eps)
        self.pool_k, self.norm_k = _make_pool(pool, dim_head, tuple(kernel_kv), self.kv_stride, norm_eps)
        self.pool_v, self.norm_v = _make_pool(pool, dim_head, tuple(kernel_kv), self.kv_stride, norm_eps)
        if rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(rel_pos_size[0], dim_head))
            self.rel_pos_w = nn.Parameter(torch.zeros(rel_pos_size[1], dim_head))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, grid={self.grid}, q_stride={self.q_stride}, kv_stride={self.kv_stride}, "
                f"q_grid={self.q_grid}, kv_grid={self.kv_grid}")

    def _pool(self, t: torch.Tensor, pool: Optional[nn.Module], norm: Optional[nn.Module], b: int):
        """``(B*heads, H, W, dim_head)`` -> pooled ``(B, heads, N', dim_head)`` and its grid."""
        if pool is not None:
            # Speed: the pooling sees an NCHW view of channels-last memory, where oneDNN's
            # depth-wise conv is fast (~2x over an NCHW copy on the CPU); the result stays
            # channels-last, so the permute back is a contiguous (B*heads, H', W', D).
            t = pool(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        hh, ww = t.shape[1:3]
        t = t.reshape(b, self.num_heads, hh * ww, self.dim_head)
        if norm is not None:
            t = norm(t)
        return t, (hh, ww)

    def _rel_pos_bias(self, q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]) -> torch.Tensor:
        """The decomposed relative-position bias ``(B, heads, Nq, Nk)`` of the queries ``q``
        ``(B, heads, Nq, dim_head)``."""
        (qh, qw), (kh, kw) = q_hw, k_hw
        tab_h = resize_rel_pos(self.rel_pos_h, 2 * max(qh, kh) - 1)
        tab_w = resize_rel_pos(self.rel_pos_w, 2 * max(qw, kw) - 1)
        rh = tab_h[rel_pos_offsets(qh, kh, q.device)]  # (qh, kh, D)
        rw = tab_w[rel_pos_offsets(qw, kw, q.device)]  # (qw, kw, D)
        b, n = q.shape[:2]
        rq = q.reshape(b, n, qh, qw, self.dim_head)
        bias_h = torch.einsum("bnhwd,hkd->bnhwk", rq, rh)
        bias_w = torch.einsum("bnhwd,wkd->bnhwk", rq, rw)
        return (bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)).reshape(b, n, qh * qw, kh * kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.dim_head).permute(3, 0, 4, 1, 2, 5)
        q, k, v = (t.reshape(b * self.num_heads, h, w, self.dim_head) for t in qkv.unbind(0))
        q, q_hw = self._pool(q, self.pool_q, self.norm_q, b)
        k, k_hw = self._pool(k, self.pool_k, self.norm_k, b)
        v, _ = self._pool(v, self.pool_v, self.norm_v, b)
        bias = self._rel_pos_bias(q, q_hw, k_hw) if self.rel_pos_h is not None else None
        o = attention(q, k, v, bias, scale=self.dim_head ** -0.5,
                      dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        if self.residual_pooling:
            o = o + q
        o = o.transpose(1, 2).reshape(b, q_hw[0], q_hw[1], self.num_heads * self.dim_head)
        return self.proj(o)
