"""Hiera-specific modules (params in :mod:`hfactory.spec.hiera`).

The rest of Hiera is generic: mask-unit attention (:mod:`hfactory.layers.mixers`), the
q-pooling stage transition (:class:`hfactory.layers.block.Block` with ``q_stride``) and the
units layout (:mod:`hfactory.layers.layout`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AbsWinPosEmbed"]


class AbsWinPosEmbed(nn.Module):
    """Absolute-win position embedding (Bolya et al., arXiv 2311.05613; timm
    ``hiera.Hiera._pos_embed`` with ``abs_win_pos_embed=True``).

    Adds to tokens ``(B, H, W, C)`` (stage 0's grid, before mask units are cut):
    ``interpolate(pos_embed, (H, W))`` (bicubic, ``align_corners=False``, antialiased as timm)
    plus ``pos_embed_win`` tiled ``(H/uh, W/uw)`` times, in that order (timm's). Parameters are
    channels-last: ``pos_embed`` ``(1, gh, gw, C)``, ``pos_embed_win`` ``(1, uh, uw, C)`` (timm
    stores them channels-first; the converter permutes). Both are listed by the encoder's
    ``no_weight_decay``. ``grid`` (the plan's) is informational: the embedding follows the
    input's grid, which the plan has checked the window tiles.
    """

    _no_weight_decay = ("pos_embed", "pos_embed_win")

    def __init__(self, dim: int, grid: list[int], global_pos_size: list[int], window_size: list[int],
                 antialias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.antialias = antialias
        self.pos_embed = nn.Parameter(torch.zeros(1, *global_pos_size, dim))
        self.pos_embed_win = nn.Parameter(torch.zeros(1, *window_size, dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std)
        nn.init.trunc_normal_(self.pos_embed_win, std=init_std)

    def embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The ``(1, H, W, C)`` embedding for token grid ``grid = (H, W)``."""
        h, w = grid
        uh, uw = self.pos_embed_win.shape[1:3]
        win = self.pos_embed_win.permute(0, 3, 1, 2).tile(1, 1, h // uh, w // uw)
        glob = F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                             align_corners=False, antialias=self.antialias)
        return (glob + win).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(tuple(x.shape[1:3]))

    def extra_repr(self) -> str:
        g, u = tuple(self.pos_embed.shape[1:3]), tuple(self.pos_embed_win.shape[1:3])
        return f"global={g}, window={u}, dim={self.pos_embed.shape[-1]}, antialias={self.antialias}"
