"""Swin Transformer V2 modules: scaled-cosine (shifted-)window attention with a continuous
relative-position bias, and V2's patch merging; channels-last grids.

Source: Liu et al., arXiv 2111.09883; the reference behaviour is timm
``models/swin_transformer_v2.py`` (``WindowAttention`` + ``SwinTransformerV2Block._attn``,
``PatchMerging``), whose parameter names these modules keep. Builders of the ``token_mixer`` /
``downsample`` registry entries ``window_attention_v2`` / ``patch_merging_v2`` (params and plan
arithmetic in :mod:`hfactory.spec.swinv2`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..spec.swin import padded_grid, window_and_shift
from .attention import attention
from .downsample import build_norm
from .layout import TokenLinear, is_symbolic
from .swin import crop_grid, merge_windows, pad_grid, relative_position_index, same_grid, window_mask

__all__ = ["WindowAttentionV2", "PatchMergingV2", "log_relative_coords"]

#: timm's clamp of the learned logit scale: ``exp(logit_scale) <= 1 / 0.01``.
LOGIT_SCALE_MAX = math.log(100.0)


def log_relative_coords(window: tuple[int, int], pretrained: tuple[int, int] = (0, 0), device=None) -> torch.Tensor:
    """``((2wh-1)*(2ww-1), 2)`` float32 log-spaced relative coordinates of a ``window`` (Swin V2's
    continuous position bias input, rows in the order of :func:`relative_position_index`): the
    offsets ``dy, dx`` divided by ``pretrained - 1`` (or ``window - 1`` when ``pretrained`` is 0;
    at least 1), times 8, then ``sign(t) * log2(|t| + 1) / 3``."""
    norm = pretrained if pretrained[0] > 0 else window
    axes = [torch.arange(-(w - 1), w, device=device, dtype=torch.float32) / max(n - 1, 1) * 8
            for w, n in zip(window, norm)]
    t = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


class WindowAttentionV2(nn.Module):
    """Swin V2 (shifted-)window attention, ``(B, H, W, C)`` in and out (arXiv 2111.09883; timm
    ``swin_transformer_v2.WindowAttention`` inside ``SwinTransformerV2Block._attn``).

    The grid is rolled by ``-shift_size``, zero-padded at the end to ``padded_grid`` (timm's order:
    roll, then pad), cut into windows of ``N = wh*ww`` tokens and attended with
    ``softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(cpb_mlp(coords))[index]
    + mask) v``; the mask is timm's -100 between shift regions, taken on the padded grid (padded
    keys are not masked, as in timm). Then windows are put back, cropped, rolled by
    ``+shift_size`` and projected. Another input size gets its geometry by the plan's rule
    (:func:`~hfactory.spec.swin.window_and_shift` with ``window_size`` as the largest window),
    and the bias MLP gives the table for that window.

    ``qkv_bias``: learned ``q_bias`` and ``v_bias`` ``(heads*dim_head,)``; the k bias is zero.
    Attention runs through :func:`hfactory.layers.attention.attention` with ``scale=1`` (the
    normalised queries carry the logit scale).
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int, grid: list[int], window_size: list[int],
                 shift_size: list[int], padded_grid: list[int], shifted: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window_size: list[int] = (0, 0),
                 cpb_hidden: int = 512, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.grid, self.window_size = tuple(grid), tuple(window_size)
        self.shift_size, self.padded_grid, self.shifted = tuple(shift_size), tuple(padded_grid), shifted
        self.pretrained_window_size = tuple(pretrained_window_size)
        inner = num_heads * dim_head
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self.qkv = TokenLinear(dim, 3 * inner, bias=False)  # nn.Linear on oneDNN (speed)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.proj = TokenLinear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # timm's no_weight_decay: every parameter named logit_scale or under cpb_mlp
        self._no_weight_decay = ("logit_scale", *(f"cpb_mlp.{n}" for n, _ in self.cpb_mlp.named_parameters()))
        self.register_buffer("relative_coords_table", log_relative_coords(self.window_size,
                                                                          self.pretrained_window_size),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.register_buffer("attn_mask", window_mask(self.padded_grid, self.padded_grid, self.window_size,
                                                      self.shift_size), persistent=False)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, grid={self.grid}, window={self.window_size}, shift={self.shift_size}, "
                f"padded_grid={self.padded_grid}")

    def _geometry(self, grid: tuple[int, int], device):
        """(window, shift, padded grid, mask, coords, relative index) for an input grid."""
        if same_grid(grid, self.grid):
            return (self.window_size, self.shift_size, self.padded_grid, self.attn_mask,
                    self.relative_coords_table, self.relative_position_index)
        # On torch.export's symbolic sizes, ``window_and_shift`` compares the grid with the window
        # in Python: the graph then holds for the sizes on the traced side of that comparison
        # (the window's bias comes from an MLP of its own size, so a clipped window is another
        # computation, unlike Swin V1's). export_model states that range.
        window, shift = window_and_shift(grid, self.window_size, self.shifted)
        if is_symbolic(*grid):  # rounded up without a negative floor division (ONNX)
            padded = tuple((g + k - 1) // k * k for g, k in zip(grid, window))
        else:
            padded = padded_grid(grid, window)
        return (window, shift, padded, window_mask(padded, padded, window, shift, device=device),
                log_relative_coords(window, self.pretrained_window_size, device=device),
                relative_position_index(window, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        (wh, ww), (sh, sw), (hp, wp), mask, coords, index = self._geometry((h, w), x.device)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        x = pad_grid(x, (hp, wp))
        nh, nw, n, heads, d = hp // wh, wp // ww, wh * ww, self.num_heads, self.dim_head
        x = x.reshape(b, nh, wh, nw, ww, c).transpose(2, 3).reshape(b, nh * nw, n, c)
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(b, nh * nw, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
        q, k, v = qkv.unbind(0)
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        table = self.cpb_mlp(coords.to(x.dtype))  # ((2wh-1)(2ww-1), heads)
        rel = 16 * torch.sigmoid(table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1))  # (heads, N, N)
        if mask is None:
            q, k, v = (t.reshape(b * nh * nw, heads, n, d) for t in (q, k, v))
            rel = rel.unsqueeze(0)
        else:  # windows folded into the head axis so the per-window mask broadcasts over the batch
            q, k, v = (t.reshape(b, nh * nw * heads, n, d) for t in (q, k, v))
            rel = (rel.unsqueeze(0) + mask.unsqueeze(1).to(rel.dtype)).reshape(1, nh * nw * heads, n, n)
        o = attention(q, k, v, rel.to(q.dtype), scale=1.0, dropout_p=self.attn_drop if self.training else 0.0,
                      backend=self.backend)
        o = crop_grid(merge_windows(o, b, (nh, nw), (wh, ww), heads, d), (h, w))
        if sh or sw:
            o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
        return self.proj_drop(self.proj(o))


class PatchMergingV2(nn.Module):
    """Swin V2's patch merging (arXiv 2111.09883; timm ``swin_transformer_v2.PatchMerging``, names
    ``reduction``, ``norm``): ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)``; an odd axis is
    zero-padded at the end, each 2x2 neighbourhood concatenated to ``4C`` channels in timm's order,
    projected without bias, then normed over ``C_out`` (V1 norms before the projection)."""

    def __init__(self, in_chs: int, out_chs: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.reduction = TokenLinear(4 * in_chs, out_chs, bias=False)  # nn.Linear on oneDNN (speed)
        self.norm = build_norm(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if is_symbolic(h, w):  # torch.export: pad by (h + 1) // 2 * 2 - h, no branch or remainder
            x = F.pad(x, (0, 0, 0, (w + 1) // 2 * 2 - w, 0, (h + 1) // 2 * 2 - h))
            h, w = x.shape[1:3]
        elif h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))
