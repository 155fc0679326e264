"""Position embeddings added to a stage's tokens after its downsampler.

Builders of the ``pos_embed`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["LearnedPosEmbed", "Identity", "resize_pos_embed"]


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ``(1, H, W, C)`` embedding to ``(1, grid[0], grid[1], C)``
    (``align_corners=False``, ``antialias=True``: timm ``resample_abs_pos_embed``'s defaults)."""
    if all(statically_known_true(a == b) for a, b in zip(pos_embed.shape[1:3], grid)):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bicubic",
                            align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


class LearnedPosEmbed(nn.Module):
    """Learned absolute position embedding ``pos_embed`` of shape ``(1, H, W, C)`` for the plan's
    grid, added to ``(B, H', W', C)`` tokens; bicubically interpolated when ``(H', W') != (H, W)``.
    Listed by the encoder's ``no_weight_decay``."""

    _no_weight_decay = ("pos_embed",)

    def __init__(self, dim: int, grid: list[int], init_std: float = 0.02):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resize_pos_embed(self.pos_embed, x.shape[1:3])


class Identity(nn.Identity):
    """No position embedding."""

    def __init__(self, dim: int | None = None, grid: list[int] | None = None):
        super().__init__()
