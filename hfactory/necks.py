"""Necks on an encoder's multi-scale maps (optional modules; nothing in the core uses them).

- :class:`FpnNeck`: SAM2's feature pyramid (Ravi et al., "SAM 2", arXiv 2408.00714;
  facebookresearch/sam2 ``sam2/modeling/backbones/image_encoder.py`` ``FpnNeck``): a 1x1 lateral
  conv per level, a nearest (or bilinear) 2x top-down sum on chosen levels, no output convs, and a
  sine position encoding of every output level.
- :class:`SinePositionEncoding`: DETR's normalised sine encoding as SAM2's
  ``PositionEmbeddingSine`` (``sam2/modeling/position_encoding.py``).

Works on any encoder whose maps halve from level to level (``encoder.forward_intermediates(x,
intermediates_only=True)`` of every hfactory encoder with stride-2 stages, e.g. the
``sam2_hiera_*`` presets): ``FpnNeck.from_encoder(encoder)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

__all__ = ["FpnNeck", "SinePositionEncoding"]


class SinePositionEncoding(nn.Module):
    """Sine position encoding ``(B, C, H, W) -> (B, dim, H, W)`` (float32, no gradient), SAM2's
    ``PositionEmbeddingSine(dim, temperature, normalize=True, scale=2*pi)``.

    Row ``y`` and column ``x`` run ``1..H`` / ``1..W``, divided by ``H + 1e-6`` / ``W + 1e-6`` and
    multiplied by ``scale``; each is encoded with ``dim / 2`` features ``p / temperature^(2*(k//2)/(dim/2))``,
    sines at even ``k`` and cosines at odd ``k`` interleaved (sin, cos, sin, ...); the output is
    ``[y features | x features]`` on the channel axis.

    Raises:
        ValueError: ``dim`` is not even.
    """

    def __init__(self, dim: int = 256, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if dim % 2:
            raise UsageError(f"SinePositionEncoding dim {dim}: must be even (half for rows, half for columns)")
        self.half, self.temperature, self.scale = dim // 2, temperature, scale

    def _axis(self, n: int, device) -> torch.Tensor:
        """``(n, dim/2)`` features of positions ``1..n`` (normalised)."""
        p = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6) * self.scale
        k = torch.arange(self.half, dtype=torch.float32, device=device)
        angles = p[:, None] / self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.half)
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        fy, fx = self._axis(h, x.device), self._axis(w, x.device)  # (H, d/2), (W, d/2)
        pos = torch.cat((fy[:, None, :].expand(h, w, self.half), fx[None, :, :].expand(h, w, self.half)), dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)


class FpnNeck(nn.Module):
    """SAM2's FPN neck: maps ``xs`` = ``[(B, C_0, H, W), (B, C_1, H/2, W/2), ...]`` (highest
    resolution first, NCHW, as ``forward_intermediates`` returns them) to ``(features, pos)``, two
    lists in the same order of ``(B, d_model, H_i, W_i)`` maps.

    Level ``i`` is ``lateral_i = convs[n - i](xs[i])`` (1x1 conv; ``convs[0]`` goes with the lowest
    resolution, SAM2's parameter order, so SAM2's ``image_encoder.neck.convs.*`` keys load as they
    are), computed from the lowest resolution up: when ``i`` is in ``top_down_levels`` and a coarser
    level exists, ``lateral_i + interpolate(out_{i+1}.float(), 2x, interp)`` (halved with
    ``fuse: avg``), else ``lateral_i`` alone. ``pos[i]`` is :class:`SinePositionEncoding` of
    ``out_i``, in its dtype. SAM2.1 configs: ``d_model`` 256, ``top_down_levels`` (2, 3),
    ``interp`` nearest, ``fuse`` sum (the defaults here); ``top_down_levels=None`` means all.

    Args:
        in_channels: channels of ``xs``, highest resolution first (e.g. ``[96, 192, 384, 768]``;
            SAM2's ``backbone_channel_list`` is this reversed).

    Raises:
        ValueError: unknown ``interp`` / ``fuse``, a level outside ``0..len(in_channels)-1``;
            in ``forward``, a number of maps or channels other than ``in_channels``.
    """

    def __init__(self, in_channels: Sequence[int], d_model: int = 256,
                 top_down_levels: Optional[Sequence[int]] = (2, 3), interp: str = "nearest", fuse: str = "sum"):
        super().__init__()
        if interp not in ("nearest", "bilinear"):
            raise UsageError(f"FpnNeck interp {interp!r}: valid are nearest, bilinear")
        if fuse not in ("sum", "avg"):
            raise UsageError(f"FpnNeck fuse {fuse!r}: valid are sum, avg")
        n = len(in_channels)
        levels = list(range(n)) if top_down_levels is None else list(top_down_levels)
        if any(not 0 <= i < n for i in levels):
            raise UsageError(f"FpnNeck top_down_levels {levels}: levels are 0..{n - 1} (0 = highest resolution)")
        self.in_channels, self.top_down_levels = list(in_channels), levels
        self.interp, self.fuse = interp, fuse
        self.convs = nn.ModuleList()
        for c in reversed(self.in_channels):
            level = nn.Sequential()
            level.add_module("conv", nn.Conv2d(c, d_model, kernel_size=1))
            self.convs.append(level)
        self.position_encoding = SinePositionEncoding(d_model)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, **kwargs) -> "FpnNeck":
        """A neck for ``encoder``'s stage maps (channels from its ``feature_info``)."""
        return cls([f["num_chs"] for f in encoder.feature_info], **kwargs)

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if [x.shape[1] for x in xs] != self.in_channels:
            raise UsageError(f"FpnNeck expects {len(self.in_channels)} maps with channels {self.in_channels}, got "
                             f"{[tuple(x.shape) for x in xs]}")
        n = len(xs) - 1
        out: list = [None] * len(xs)
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                up = F.interpolate(prev.float(), scale_factor=2.0, mode=self.interp,
                                   align_corners=None if self.interp == "nearest" else False, antialias=False)
                prev = lateral + up
                if self.fuse == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        return out, [self.position_encoding(o).to(o.dtype) for o in out]
