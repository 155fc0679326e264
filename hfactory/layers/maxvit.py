"""MaxViT modules: the convolutional stem, MBConv with squeeze-excitation (downsampler and token
mixer), block / grid partition attention with a relative position bias, and the empty
feedforward; channels-last grids ``(B, H, W, C)`` in and out.

Source: Tu et al., arXiv 2204.01697; the reference behaviour is timm ``models/maxxvit.py``
(``Stem``, ``MbConvBlock``, ``Downsample2d``, ``PartitionAttentionCl``, ``AttentionCl``) and
``layers/pos_embed_rel.py`` (``RelPosBiasTf``), whose parameter names these modules keep (the
bias table is stored as Swin's ``((2h-1)(2w-1), heads)``, see :class:`PartitionAttention`).
Builders of the registry entries in :mod:`hfactory.spec.maxvit` (params and plan arithmetic).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..spec.maxvit import same_padding
from .attention import attention
from .feedforward import make_activation
from .layout import TokenLinear

__all__ = ["ConvStem", "MBConv", "MBConvDownsample", "SqueezeExcite", "PartitionAttention", "NoFeedforward",
           "BatchNormAct"]


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    # A channels-last grid viewed as NCHW: convs and BatchNorm run on it in channels_last memory
    # format (no copy), and their channels-last outputs permute back to a contiguous (B, H, W, C).
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class SamePadConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow SAME padding computed from the input (``padding='same'``, as
    timm ``layers.Conv2dSame``: with stride 2 the extra zero row/column goes at the bottom/right),
    or PyTorch's symmetric ``kernel_size // 2`` (``padding='symmetric'``). Input/output NCHW."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, padding: str = "symmetric",
                 groups: int = 1, bias: bool = True):
        # SAME with stride 1 and an odd kernel is the symmetric padding: a static conv padding.
        self.dynamic = padding == "same" and stride > 1
        super().__init__(in_chs, out_chs, kernel_size, stride, 0 if self.dynamic else kernel_size // 2,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            k, s = self.kernel_size[0], self.stride[0]
            (top, bottom), (left, right) = (same_padding(k, s, n) for n in x.shape[-2:])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm then an activation (timm ``BatchNormAct2d`` names: ``weight``, ``bias``,
    ``running_mean``, ``running_var``); ``activation=None``: BatchNorm only. NCHW in and out."""

    def __init__(self, chs: int, eps: float, activation: Optional[str] = None):
        super().__init__(chs, eps=eps)
        self.act = make_activation(activation) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvStem(nn.Module):
    """MaxViT's stem, ``(B, H, W, C_in) -> (B, H/2, W/2, widths[1])`` (timm ``maxxvit.Stem``):
    ``conv1`` (stride 2) -> ``norm1`` (BatchNorm + activation) -> ``conv2`` (stride 1)."""

    def __init__(self, in_chs: int, widths: list[int], kernel_size: int = 3, bias: bool = False,
                 norm_eps: float = 1e-5, activation: str = "gelu", padding: str = "symmetric"):
        super().__init__()
        self.conv1 = SamePadConv2d(in_chs, widths[0], kernel_size, 2, padding, bias=bias)
        self.norm1 = BatchNormAct(widths[0], norm_eps, activation)
        self.conv2 = SamePadConv2d(widths[0], widths[1], kernel_size, 1, padding, bias=bias)

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nchw(_to_nchw(x)).permute(0, 2, 3, 1)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (arXiv 1709.01507; timm ``layers.SEModule`` names ``fc1``, ``fc2``):
    ``x * sigmoid(fc2(act(fc1(mean_HW(x)))))`` with 1x1 convs; NCHW in and out."""

    def __init__(self, chs: int, rd_chs: int, activation: str = "silu"):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd_chs, 1)
        self.act = make_activation(activation)
        self.fc2 = nn.Conv2d(rd_chs, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """MBConv branch, ``(B, H, W, C_in) -> (B, H/stride, W/stride, C_out)`` (arXiv 2204.01697; timm
    ``maxxvit.MbConvBlock``, ``stride_mode='dw'``, names kept): ``pre_norm`` (BatchNorm) ->
    ``conv1_1x1`` (no bias) -> ``norm1`` (BN + act) -> ``conv2_kxk`` (depthwise, ``stride``, no
    bias) -> ``norm2`` (BN + act) -> ``se`` -> ``conv3_1x1`` (``bias``). As a token mixer
    (``dim`` given, stride 1) it returns the branch only; its block adds the identity shortcut."""

    def __init__(self, dim: Optional[int] = None, mid_chs: int = 0, se_chs: int = 0, kernel_size: int = 3,
                 activation: str = "gelu", se_activation: str = "silu", norm_eps: float = 1e-5,
                 padding: str = "symmetric", bias: bool = True, *, in_chs: Optional[int] = None,
                 out_chs: Optional[int] = None, stride: int = 1):
        super().__init__()
        in_chs, out_chs = in_chs or dim, out_chs or dim
        self.pre_norm = BatchNormAct(in_chs, norm_eps)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = BatchNormAct(mid_chs, norm_eps, activation)
        self.conv2_kxk = SamePadConv2d(mid_chs, mid_chs, kernel_size, stride, padding, groups=mid_chs, bias=False)
        self.norm2 = BatchNormAct(mid_chs, norm_eps, activation)
        self.se = SqueezeExcite(mid_chs, se_chs, se_activation) if se_chs else nn.Identity()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, bias=bias)

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        x = self.se(self.norm2(self.conv2_kxk(x)))
        return self.conv3_1x1(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nchw(_to_nchw(x)).permute(0, 2, 3, 1)


class _Shortcut(nn.Module):
    """The downsampling MBConv's shortcut (timm ``maxxvit.Downsample2d``, ``pool_type='avg2'``):
    2x2 average pool (SAME-padded like the branch when ``padding='same'``), then ``expand``, a
    1x1 conv, when the width changes. NCHW in and out."""

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True, padding: str = "symmetric"):
        super().__init__()
        self.same = padding == "same"
        self.expand = nn.Conv2d(in_chs, out_chs, 1, bias=bias) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            (top, bottom), (left, right) = (same_padding(2, 2, n) for n in x.shape[-2:])
            if top or bottom or left or right:  # odd sides only (the plan keeps them even)
                x = F.pad(x, (left, right, top, bottom))
        return self.expand(F.avg_pool2d(x, 2, 2))


class MBConvDownsample(MBConv):
    """A stage's first MBConv, ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)`` (or ``/4`` after a
    ``stem``): ``[stem ->] shortcut(x) + branch(x)``, the branch a stride-2 :class:`MBConv`, the
    shortcut a 2x2 average pool plus a 1x1 conv (timm ``MbConvBlock`` with ``stride=2``)."""

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, se_chs: int, kernel_size: int = 3,
                 activation: str = "gelu", se_activation: str = "silu", norm_eps: float = 1e-5,
                 padding: str = "symmetric", bias: bool = True, stem: Optional[nn.Module] = None):
        super().__init__(None, mid_chs, se_chs, kernel_size, activation, se_activation, norm_eps, padding, bias,
                         in_chs=in_chs, out_chs=out_chs, stride=2)
        self.stem = stem
        self.shortcut = _Shortcut(in_chs, out_chs, bias, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.stem, ConvStem):
            x = self.stem.forward_nchw(_to_nchw(x))
        else:
            x = _to_nchw(x if self.stem is None else self.stem(x))
        return (self.shortcut(x) + self.forward_nchw(x)).permute(0, 2, 3, 1)


def _one_hot_offsets(n: int) -> torch.Tensor:
    """``(n, n, 2n-1)`` one-hot: entry ``[q, k, q - k + n - 1]`` is 1 (the offset index of Swin's
    table, :func:`hfactory.layers.swin.relative_position_index`, along one axis)."""
    q = torch.arange(n)
    return F.one_hot(q[:, None] - q[None, :] + n - 1, 2 * n - 1).float()


class PartitionAttention(nn.Module):
    """Block or grid attention, ``(B, H, W, C) -> (B, H, W, C)`` (arXiv 2204.01697; timm
    ``maxxvit.PartitionAttentionCl._partition_attn`` + ``AttentionCl`` with ``head_first=False``
    + ``RelPosBiasTf``).

    ``partition='block'``: windows of ``partition_size`` ``(ph, pw)`` adjacent tokens;
    ``'grid'``: groups of ``ph * pw`` tokens spaced ``(H / ph, W / pw)`` apart. Inside each group,
    ``softmax(q k^T / sqrt(dim_head) + bias) v`` per head, then ``proj``; ``qkv`` lays out
    ``(3, heads, dim_head)``. The bias of query ``a`` and key ``b`` is
    ``relative_position_bias_table[index(a - b)]``, a ``((2ph-1)(2pw-1), heads)`` table in Swin's
    layout (:func:`hfactory.layers.swin.relative_position_index`), gathered by two one-hot einsums
    as in timm ``RelPosBiasTf`` (the same operation, so the same counted MACs); timm's ``(heads, 2ph-1, 2pw-1)``
    table, indexed by ``b - a``, maps onto it flipped (:mod:`hfactory.convert.maxvit`).
    ``window_size`` is the partition size (read by the table resize on load). Attention runs
    through :func:`hfactory.layers.attention.attention` (``backend``).
    """

    _no_weight_decay = ("relative_position_bias_table",)

    def __init__(self, dim: int, num_heads: int, dim_head: int, partition: str, partition_size: list[int],
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        if partition not in ("block", "grid"):
            raise ValueError(f"partition {partition!r}: valid are block, grid")
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.partition = partition
        self.window_size = tuple(partition_size)
        inner = num_heads * dim_head
        self.qkv = TokenLinear(dim, 3 * inner, bias=qkv_bias)
        self.proj = TokenLinear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        ph, pw = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ph - 1) * (2 * pw - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # one-hot lookups (q, k, offset) per axis: the bias is gathered by two einsums, as TF's
        # MaxViT and timm do, so the operation (and the counted MACs) are the reference's
        self.register_buffer("lookup_h", _one_hot_offsets(ph), persistent=False)
        self.register_buffer("lookup_w", _one_hot_offsets(pw), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.partition}, size={self.window_size}, heads={self.num_heads}"

    def relative_position_bias(self) -> torch.Tensor:
        """The ``(heads, ph*pw, ph*pw)`` bias of queries (rows) and keys (columns), row-major tokens:
        ``table[relative_position_index]`` (:func:`hfactory.layers.swin.relative_position_index`)."""
        ph, pw = self.window_size
        table = self.relative_position_bias_table.reshape(2 * ph - 1, 2 * pw - 1, self.num_heads)
        bias = torch.einsum("uvn,qku->nqkv", table, self.lookup_h.to(table.dtype))
        bias = torch.einsum("nqkv,rsv->nqrks", bias, self.lookup_w.to(table.dtype))
        return bias.reshape(self.num_heads, ph * pw, ph * pw)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B * groups, ph * pw, C)``."""
        b, h, w, c = x.shape
        ph, pw = self.window_size
        if self.partition == "block":  # (B, H/ph, ph, W/pw, pw, C): windows of adjacent tokens
            x = x.reshape(b, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5)
        else:  # (B, ph, H/ph, pw, W/pw, C): one token per lattice cell, at the same place in each
            x = x.reshape(b, ph, h // ph, pw, w // pw, c).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, ph * pw, c)

    def _merge(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, h, w, _ = shape
        ph, pw = self.window_size
        c = x.shape[-1]
        if self.partition == "block":
            x = x.reshape(b, h // ph, w // pw, ph, pw, c).permute(0, 1, 3, 2, 4, 5)
        else:
            x = x.reshape(b, h // ph, w // pw, ph, pw, c).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{self.partition}_attention needs a (B, H, W, C) grid, got shape {tuple(x.shape)}")
        shape = x.shape
        t = self._split(x)
        n, m, _ = t.shape
        q, k, v = self.qkv(t).reshape(n, m, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias().unsqueeze(0).to(q.dtype)
        o = attention(q, k, v, bias, scale=self.dim_head ** -0.5,
                      dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        o = o.transpose(1, 2).reshape(n, m, -1)
        return self._merge(self.proj_drop(self.proj(o)), shape)


class NoFeedforward(nn.Module):
    """The ``none`` feedforward: a zero branch, ``(..., C) -> (1, ..., 1)`` zeros that broadcast
    against the input. It declares ``zero_branch``, so :class:`~hfactory.layers.block.Block`
    drops its whole second sublayer (norm2, scales, drop path) and never calls it."""

    zero_branch = True

    def __init__(self, dim: Optional[int] = None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((1,) * x.ndim)
