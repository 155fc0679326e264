"""Swin Transformer modules: (shifted-)window attention and patch merging, channels-last grids.

Source: Liu et al., arXiv 2103.14030; the reference behaviour is timm ``models/swin_transformer.py``
(``WindowAttention`` + ``SwinTransformerBlock._attn``, ``PatchMerging``), whose parameter names
these modules keep. Builders of the ``token_mixer`` / ``downsample`` registry entries
``window_attention`` / ``patch_merging`` (params and plan arithmetic in :mod:`hfactory.spec.swin`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..spec.swin import padded_grid, window_and_shift
from .attention import attention
from .downsample import build_norm
from .layout import TokenLinear, is_symbolic

__all__ = ["WindowAttention", "PatchMerging", "relative_position_index", "window_mask", "SHIFT_MASK_VALUE",
           "same_grid", "pad_grid", "crop_grid", "merge_windows"]

#: timm's additive mask between tokens of one shifted window that come from different regions.
SHIFT_MASK_VALUE = -100.0


def same_grid(a, b) -> bool:
    """Whether grids ``a`` and ``b`` are provably equal. Under ``torch.export`` a symbolic size is
    not equal to a number unless the tracer can prove it, so a dynamic size takes the general
    path (pad, crop) instead of pinning the size with a guard."""
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def pad_grid(x: torch.Tensor, padded) -> torch.Tensor:
    """``(B, H, W, C)`` zero-padded at the end of H and W to ``padded``."""
    h, w = x.shape[1:3]
    return x if same_grid((h, w), padded) else F.pad(x, (0, 0, 0, padded[1] - w, 0, padded[0] - h))


def crop_grid(x: torch.Tensor, grid) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` cropped to ``grid`` (a negative pad: a new contiguous tensor, which the
    ONNX exporter handles where a slice view of a windowed tensor failed)."""
    hp, wp = x.shape[1:3]
    return x if same_grid((hp, wp), grid) else F.pad(x, (0, 0, 0, grid[1] - wp, 0, grid[0] - hp))


def merge_windows(o: torch.Tensor, b: int, n_windows: tuple, window: tuple, heads: int, d: int) -> torch.Tensor:
    """Attention output of ``B * nh * nw`` windows (``(B*nW, heads, N, d)`` or
    ``(B, nW*heads, N, d)``, windows row-major) back to the ``(B, nh*wh, nw*ww, heads*d)`` grid.
    The copy before ``view`` keeps the ONNX exporter from re-tracing the reshape of a permuted
    tensor as a view, which fails at dynamic sizes."""
    (nh, nw), (wh, ww) = n_windows, window
    o = o.reshape(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
    return o.clone(memory_format=torch.contiguous_format).view(b, nh * wh, nw * ww, heads * d)


def relative_position_index(window: tuple[int, int], table_window: Optional[tuple[int, int]] = None,
                            device=None) -> torch.Tensor:
    """``(N, N)`` indices (``N = wh*ww``) into a ``((2th-1)(2tw-1), heads)`` relative-position table
    for a ``table_window = (th, tw)`` (default: ``window``); timm's ``get_relative_position_index``
    when both are equal. A smaller ``window`` uses the table's central offsets."""
    wh, ww = window
    th, tw = table_window or window
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # (2, N), row-major
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


def _partition(t: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(Hp, Wp, ...)`` -> ``(nW, wh*ww, ...)``, windows row-major (timm's ``window_partition``)."""
    (hp, wp), (wh, ww) = t.shape[:2], window
    rest = t.shape[2:]
    t = t.reshape(hp // wh, wh, wp // ww, ww, *rest).transpose(1, 2)
    return t.reshape((hp // wh) * (wp // ww), wh * ww, *rest)


def window_mask(grid: tuple[int, int], padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                device=None) -> Optional[torch.Tensor]:
    """Additive mask ``(nW, N, N)`` (float32) of the windows of a padded, cyclically shifted grid,
    or None when there is neither shift nor padding.

    The grid ``(H, W)`` is zero-padded at the end to ``padded`` and rolled by ``-shift`` (per axis
    an int, or a 0-d int64 tensor that is 0 or ``window // 2``, see :func:`_run_time_shift`). Within a
    window, tokens of different shift regions get ``-100`` (timm's ``get_attn_mask``; the regions
    are ``[0, Hp-wh)``, ``[Hp-wh, Hp-sh)``, ``[Hp-sh, Hp)`` per shifted axis), and padded keys
    ``-inf``. Every window holds a real token of each query's region (padding < window), so no row
    is fully masked.
    """
    if not any(isinstance(t, torch.Tensor) for t in shift) and not any(shift) and same_grid(padded, grid):
        return None

    def axis(n, n_pad, w, s):
        r = torch.arange(n_pad, device=device)
        if isinstance(s, torch.Tensor):  # a shift known at run time only (0 or w // 2)
            region = ((r >= n_pad - w).long() + (r >= n_pad - s).long()) * (s > 0).long()
        else:
            region = (r >= n_pad - w).long() + (r >= n_pad - s).long() if s else torch.zeros_like(r)
        # Position r of the rolled grid holds padded index (r + s) mod n_pad, a real token when that
        # is below n: for r < n_pad - s it is r + s; above, r + s - n_pad < s <= n. Comparisons
        # only: the ONNX exporter cannot translate a remainder by a symbolic size.
        real = (r < n - s) | (r >= n_pad - s)
        return region, real

    (rh, real_h), (rw, real_w) = (axis(n, p, w, s) for n, p, w, s in zip(grid, padded, window, shift))
    region = _partition(rh[:, None] * 3 + rw[None, :], window)  # (nW, N)
    real = _partition(real_h[:, None] & real_w[None, :], window)  # (nW, N)
    n = window[0] * window[1]
    mask = torch.zeros(region.shape[0], n, n, device=device)
    mask = mask.masked_fill(region[:, :, None] != region[:, None, :], SHIFT_MASK_VALUE)
    return mask.masked_fill(~real[:, None, :], float("-inf"))


def _run_time_shift(n, window: int, device) -> torch.Tensor:
    """The shift of a shifted block's axis of ``n`` tokens as a 0-d int64 tensor: ``window // 2``
    when ``n > window``, else 0 (:func:`~hfactory.spec.swin.window_and_shift`), computed by tensor
    operations so that a symbolic ``n`` is not compared in Python (a guard that pins the size)."""
    return (torch.arange(n, device=device) >= window).any().long() * (window // 2)


def _roll_index(n_pad, shift: torch.Tensor, device) -> torch.Tensor:
    """Indices that roll an axis of ``n_pad`` by ``-shift`` with ``index_select`` (``shift`` a 0-d
    tensor in ``[0, n_pad)``; the inverse roll is ``-shift``, given as ``shift = -s``)."""
    r = torch.arange(n_pad, device=device) + shift
    return torch.where(r >= n_pad, r - n_pad, torch.where(r < 0, r + n_pad, r))


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with relative-position bias, ``(B, H, W, C)`` in
    and out (W-MSA / SW-MSA, arXiv 2103.14030; timm ``WindowAttention`` inside
    ``SwinTransformerBlock._attn``).

    The grid is zero-padded at the end to a multiple of the window (Swin's detection code), rolled
    by ``-shift_size``, cut into windows of ``N = wh*ww`` tokens, attended with the bias
    ``table[relative_position_index]`` plus the shift/padding mask (:func:`window_mask`), put back,
    rolled by ``+shift_size`` and cropped. All numbers come from the plan for ``grid``; another
    input size (an encoder run at another resolution) gets the same rule (:func:`window_and_shift`,
    with ``window_size`` as the largest window) and its mask is computed on the fly.

    Attention runs through :func:`hfactory.layers.attention.attention` (``self.backend``). With a
    mask, the windows of a sample are folded into the head axis, ``(B, nW*heads, N, d)``, so the
    ``(1, nW*heads, N, N)`` bias broadcasts over the batch; without one, ``(B*nW, heads, N, d)``
    with a ``(1, heads, N, N)`` bias.
    """

    _no_weight_decay = ("relative_position_bias_table",)

    def __init__(self, dim: int, num_heads: int, dim_head: int, grid: list[int], window_size: list[int],
                 shift_size: list[int], padded_grid: list[int], shifted: bool = False, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.grid, self.window_size = tuple(grid), tuple(window_size)
        self.shift_size, self.padded_grid, self.shifted = tuple(shift_size), tuple(padded_grid), shifted
        wh, ww = self.window_size
        inner = num_heads * dim_head
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.register_buffer("attn_mask", window_mask(self.grid, self.padded_grid, self.window_size,
                                                      self.shift_size), persistent=False)
        # TokenLinear: an nn.Linear that runs on oneDNN on the CPU (speed, see its docstring).
        self.qkv = TokenLinear(dim, 3 * inner, bias=qkv_bias)
        self.proj = TokenLinear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, grid={self.grid}, window={self.window_size}, shift={self.shift_size}, "
                f"padded_grid={self.padded_grid}")

    def _geometry(self, grid: tuple[int, int], device):
        """(window, shift, padded grid, mask, relative index) for an input grid."""
        if same_grid(grid, self.grid):
            return self.window_size, self.shift_size, self.padded_grid, self.attn_mask, self.relative_position_index
        window, shift = window_and_shift(grid, self.window_size, self.shifted)
        padded = padded_grid(grid, window)
        index = relative_position_index(window, self.window_size, device=device)
        return window, shift, padded, window_mask(grid, padded, window, shift, device=device), index

    def _geometry_any_size(self, x: torch.Tensor):
        """``_geometry`` for symbolic sizes (``torch.export`` with a dynamic height and width), with no
        Python branch on the size: the window stays ``window_size`` and the grid is padded to its
        multiple; an axis no longer than the window (where timm clips the window to the grid)
        becomes one window with padded keys masked, which gives the same attention (the bias of
        the clipped window is the central part of the full one); a shifted block's shift is a
        tensor that is 0 on such an axis (:func:`_run_time_shift`). Returns the input padded and
        rolled, and (window, shift tensors or 0, padded grid, mask, relative index)."""
        _, h, w, _ = x.shape
        (wh, ww), dev = self.window_size, x.device
        hp, wp = (h + wh - 1) // wh * wh, (w + ww - 1) // ww * ww
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        if self.shifted:
            shift = (_run_time_shift(h, wh, dev), _run_time_shift(w, ww, dev))
            x = x.index_select(1, _roll_index(hp, shift[0], dev)).index_select(2, _roll_index(wp, shift[1], dev))
        else:
            shift = (0, 0)
        mask = window_mask((h, w), (hp, wp), self.window_size, shift, device=dev)
        return x, (self.window_size, shift, (hp, wp), mask, self.relative_position_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if is_symbolic(h, w):
            return self._forward_any_size(x)
        (wh, ww), (sh, sw), (hp, wp), mask, index = self._geometry((h, w), x.device)
        x = pad_grid(x, (hp, wp))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        o = self._attend(x, (wh, ww), (hp // wh, wp // ww), mask, index)
        if sh or sw:
            o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
        return self.proj_drop(self.proj(crop_grid(o, (h, w))))

    def _attend(self, x: torch.Tensor, window, n_windows, mask, index) -> torch.Tensor:
        """Attention in the windows of the padded (and rolled) grid ``x`` ``(B, Hp, Wp, C)`` ->
        ``(B, Hp, Wp, heads * d)``, with the relative-position bias plus ``mask`` (``(nW, N, N)``
        or None)."""
        b, c = x.shape[0], x.shape[3]
        (wh, ww), (nh, nw) = window, n_windows
        n, heads, d = wh * ww, self.num_heads, self.dim_head
        x = x.reshape(b, nh, wh, nw, ww, c).transpose(2, 3).reshape(b, nh * nw, n, c)
        # same channel split as timm's reshape(B_, N, 3, heads, d)
        qkv = self.qkv(x).reshape(b, nh * nw, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
        bias = self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        if mask is None:  # one bias for every window: windows folded into the batch
            q, k, v = qkv.reshape(3, b * nh * nw, heads, n, d).unbind(0)
            bias = bias.unsqueeze(0)
        else:  # a mask per window: windows x heads as the head axis, the bias broadcast over the batch
            q, k, v = qkv.reshape(3, b, nh * nw * heads, n, d).unbind(0)
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).reshape(1, nh * nw * heads, n, n)
        o = attention(q, k, v, bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0,
                      backend=self.backend)
        return merge_windows(o, b, (nh, nw), (wh, ww), heads, d)

    def _forward_any_size(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on symbolic sizes (see :meth:`_geometry_any_size`): same values."""
        h, w = x.shape[1:3]
        x, (window, shift, (hp, wp), mask, index) = self._geometry_any_size(x)
        o = self._attend(x, window, (hp // window[0], wp // window[1]), mask, index)
        if self.shifted:
            dev = x.device
            o = o.index_select(1, _roll_index(hp, -shift[0], dev)).index_select(2, _roll_index(wp, -shift[1], dev))
        return self.proj_drop(self.proj(crop_grid(o, (h, w))))


class PatchMerging(nn.Module):
    """Swin's patch merging (arXiv 2103.14030; timm ``PatchMerging``, names ``norm``, ``reduction``):
    ``(B, H, W, C) -> (B, H/2, W/2, C_out)``; each 2x2 neighbourhood concatenated to ``4C``
    channels in timm's order (``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``),
    normed over ``4C`` and projected without bias. The plan has checked that H and W are even."""

    def __init__(self, in_chs: int, out_chs: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.norm = build_norm(norm)
        self.reduction = TokenLinear(4 * in_chs, out_chs, bias=False)  # nn.Linear on oneDNN (speed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))
