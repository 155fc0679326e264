"""Params of the Hiera-specific components (no torch; builders in :mod:`hfactory.layers.hiera`).

- ``pos_embed: abs_win``: the "absolute win" position embedding of Bolya et al., "Window
  Attention is Bugged: How not to Interpolate Position Embeddings" (arXiv 2311.05613), as timm
  ``hiera.Hiera(abs_win_pos_embed=True)`` (``hiera_small_abswin_256``) and SAM2's HieraDet
  (``pos_embed`` + ``pos_embed_window``): a global embedding of a fixed size, bicubically
  interpolated to the token grid, plus a window embedding of the mask-unit (window) size tiled
  over the grid.

Importing this module registers the components (``hfactory.spec`` does so).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional, Union

from pydantic import Field, PositiveInt

from .. import registry
from .base import PlanError
from .components import PosEmbedParams, StageContext

__all__ = ["AbsWinPosEmbedParams"]

Size = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class AbsWinPosEmbedParams(PosEmbedParams):
    """Absolute-win position embedding (arXiv 2311.05613; timm ``Hiera._pos_embed`` with
    ``abs_win_pos_embed=True``) for the grid ``(B, H, W, C)`` right after stage 0's patch
    embedding, before the tokens are cut into mask units:

    ``x + interpolate(pos_embed, (H, W), bicubic, antialias) + tile(pos_embed_win, (H/uh, W/uw))``

    Parameters ``pos_embed`` ``(1, gh, gw, C)`` (``global_pos_size``) and ``pos_embed_win``
    ``(1, uh, uw, C)`` (``window_size``, default: the spec's ``mask_unit_size``), both fixed in
    size, so the model runs at any resolution whose token grid the window tiles.

    Raises (plan): :class:`PlanError` when no window size is known (no ``window_size`` and no
    ``mask_unit_size``) or the window does not tile the token grid.
    """

    kind: Literal["abs_win"] = "abs_win"
    global_pos_size: Size = Field(14, description="size (gh, gw) of the global embedding; timm's default "
                                  "14, hiera_small_abswin_256 uses 16")
    window_size: Optional[Size] = Field(None, description="size (uh, uw) of the tiled window embedding; "
                                        "default: the spec's mask_unit_size")
    antialias: bool = Field(True, description="antialiased bicubic interpolation of the global embedding "
                            "(timm Hiera: true; SAM2 HieraDet: false)")
    init_std: float = Field(0.02, gt=0, description="truncated-normal std of both embeddings")
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def resolve(self, ctx: StageContext) -> dict:
        if self.window_size is not None:
            window, where = _hw(self.window_size), f"{ctx.loc}.window_size"
        elif ctx.unit_size is not None:
            window, where = tuple(ctx.unit_size), "mask_unit_size"
        else:
            raise PlanError(f"{ctx.loc}.window_size", "abs_win tiles a window embedding over the grid, but no "
                            "window size is known here; set window_size or the spec's mask_unit_size")
        for axis, n, u in zip(("height", "width"), ctx.grid, window):
            if n % u:
                raise PlanError(where, f"window {window[0]}x{window[1]} does not tile the token grid "
                                f"{ctx.grid[0]}x{ctx.grid[1]} ({axis} {n}); use a divisor of {n}")
        return {"kind": self.kind, "dim": ctx.dim, "grid": list(ctx.grid),
                "global_pos_size": list(_hw(self.global_pos_size)), "window_size": list(window),
                "antialias": self.antialias, "init_std": self.init_std}


registry.register("pos_embed", "abs_win", AbsWinPosEmbedParams, "hfactory.layers.hiera:AbsWinPosEmbed",
                  overwrite=True)
