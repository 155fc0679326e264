"""HVT's token pooling and per-pooling position embedding (params in :mod:`hfactory.spec.hvt`).

Source: Pan et al., arXiv 2103.10619; MonashAI/HVT ``models.py`` (``Block.downsample`` =
``nn.MaxPool1d(3, stride=2)`` over ``(B, C, N)``, then ``x + pos_embed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["MaxPool1d", "LearnedPosEmbed1d", "as_seq"]


def as_seq(x: torch.Tensor) -> torch.Tensor:
    """Grid ``(B, H, W, C)`` -> ``(B, H*W, C)`` (row-major, as ``flatten(2).transpose(1, 2)`` of
    NCHW); a sequence ``(B, N, C)`` is returned unchanged."""
    return x.flatten(1, 2) if x.ndim == 4 else x


class MaxPool1d(nn.Module):
    """Max-pool the flattened token sequence: ``(B, H, W, C)`` or ``(B, N, C)`` ->
    ``(B, N', C)``, ``N' = floor((N + 2 * padding - kernel_size) / stride) + 1``; no weights."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_seq(x).transpose(1, 2)
        # max_pool2d over a (B, C, 1, N) view: F.max_pool1d pins N under torch.export
        x = F.max_pool2d(x.unsqueeze(2), (1, self.kernel_size), (1, self.stride), (0, self.padding))
        return x.squeeze(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class LearnedPosEmbed1d(nn.Module):
    """Learned ``pos_embed`` ``(1, N, C)`` added to ``(B, N, C)`` tokens (or to a grid
    ``(B, H, W, C)`` in row-major order, the shape kept); linearly interpolated along N when the
    input has another length. Listed by the encoder's ``no_weight_decay``."""

    _no_weight_decay = ("pos_embed",)

    def __init__(self, dim: int, length: int, init_std: float = 0.02):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = as_seq(x)
        pos = self.pos_embed
        if not statically_known_true(pos.shape[1] == seq.shape[1]):
            pos = F.interpolate(pos.transpose(1, 2).float(), size=seq.shape[1], mode="linear",
                                align_corners=False).transpose(1, 2).to(pos.dtype)
        return (seq + pos).reshape(x.shape)
