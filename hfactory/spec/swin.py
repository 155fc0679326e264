"""Swin Transformer components: (shifted-)window attention and patch merging (params + plan arithmetic).

Source: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
arXiv 2103.14030; the reference behaviour is timm ``models/swin_transformer.py``
(``WindowAttention``, ``SwinTransformerBlock._calc_window_shift``, ``PatchMerging``). Grids that a
window does not divide are padded to a multiple of the window, as Swin's detection code does
(Swin-Transformer-Object-Detection ``SwinTransformerBlock``), with the padded keys masked out.

Pure Python (no torch): the plan shows each block's effective window, shift and padded grid.
Modules in :mod:`hfactory.layers.swin`.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from .. import registry
from .base import PlanError
from .components import DownsampleParams, NormField, StageContext, TokenMixerParams

__all__ = ["WindowAttentionParams", "PatchMergingParams", "window_and_shift", "padded_grid"]


def window_and_shift(grid: tuple[int, int], window: tuple[int, int], shifted: bool
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Effective ``(window, shift)`` of a block on ``grid``, per axis, as timm's
    ``SwinTransformerBlock._calc_window_shift``: an axis the window covers entirely
    (``grid <= window``) gets the grid as its window and no shift; otherwise the window stays and
    a shifted block shifts by ``window // 2``."""
    eff = tuple(g if g <= w else w for g, w in zip(grid, window))
    shift = tuple(0 if (not shifted or g <= w) else w // 2 for g, w in zip(grid, eff))
    return eff, shift


def padded_grid(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """``grid`` rounded up to a multiple of ``window`` per axis."""
    return tuple(-(-g // w) * w for g, w in zip(grid, window))


class WindowAttentionParams(TokenMixerParams):
    """Swin's (shifted-)window multi-head self-attention with a learned relative-position bias
    (arXiv 2103.14030; timm ``swin_transformer.WindowAttention``, parameter names
    ``relative_position_bias_table``, ``qkv``, ``proj``).

    Works on the ``grid`` layout ``(B, H, W, C)``. With ``shift`` (default) the blocks of a stage
    alternate: even ``block_index`` regular windows, odd ones windows shifted by ``window // 2``
    (cyclic shift with timm's -100 mask between regions that are not neighbours). The plan gives
    each block its effective window (clipped to the grid, then unshifted, as timm) and, when the
    window does not divide the grid, the ``padded_grid`` the module pads to (padded keys are masked
    out, so outputs do not depend on the padding). Shifted windows cross mask-unit borders, so
    this mixer does not accept the ``units`` layout (not MAE-compatible).
    """

    kind: Literal["window_attention"] = "window_attention"
    window_size: Union[int, tuple[int, int]] = Field(7, description="window in tokens: int or [h, w]")
    shift: bool = Field(True, description="odd blocks of a stage use windows shifted by window // 2 (SW-MSA)")
    qkv_bias: bool = True
    proj_bias: bool = True
    attn_drop: float = Field(0.0, ge=0, lt=1)
    proj_drop: float = Field(0.0, ge=0, lt=1)
    uses_heads: ClassVar[bool] = True

    @field_validator("window_size")
    @classmethod
    def _window_positive(cls, v):
        if any(s < 1 for s in ((v, v) if isinstance(v, int) else v)):
            raise PydanticCustomError("window_size", "window_size must be positive: an int or [h, w]")
        return v

    @property
    def window_hw(self) -> tuple[int, int]:
        v = self.window_size
        return (v, v) if isinstance(v, int) else tuple(v)

    def resolve(self, ctx: StageContext) -> dict:
        if ctx.q_stride:
            raise PlanError(ctx.loc, "window_attention cannot pool queries; use q_pool with attention or "
                            "mask_unit_attention, or patch_merging with window_attention")
        shifted = self.shift and ctx.block_index % 2 == 1
        window, shift = window_and_shift(tuple(ctx.grid), self.window_hw, shifted)
        return {"kind": self.kind, "dim": ctx.dim, "num_heads": ctx.num_heads, "dim_head": ctx.dim_head,
                "grid": list(ctx.grid), "window_size": list(window), "shift_size": list(shift),
                "padded_grid": list(padded_grid(tuple(ctx.grid), window)), "shifted": shifted,
                "qkv_bias": self.qkv_bias, "proj_bias": self.proj_bias, "attn_drop": self.attn_drop,
                "proj_drop": self.proj_drop}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        if any(entry["shift_size"]):
            s = entry["shift_size"]
            return f"shifted windows (shift {s[0]}x{s[1]}) cross mask-unit borders; use shift: false"
        w = entry["window_size"]
        if unit is not None and any(u % x for u, x in zip(unit, w)):
            return (f"windows of {w[0]}x{w[1]} tokens do not tile the {unit[0]}x{unit[1]} mask unit; use a "
                    "window dividing the unit")
        if grid is not None and tuple(entry["padded_grid"]) != tuple(grid):
            return "windows that pad the grid straddle mask units"
        return None

    @classmethod
    def describe(cls, entry, blocks=()):
        """``window_attention 7x7 shift 0/3`` (the shifts of the stage's blocks), then `` pad HxW``
        when the grid is padded to the window, or `` in units`` when it runs inside mask units."""
        shifts = "/".join(dict.fromkeys(str(b["shift_size"][0]) for b in (blocks or [entry])))
        pad = entry.get("padded_grid")
        pad = "" if pad is None or list(pad) == list(entry["grid"]) else f" pad {pad[0]}x{pad[1]}"
        if entry.get("per_unit"):  # the plan runs it inside each mask unit: the unit is its grid
            pad = " in units"
        w = entry["window_size"]
        return f"{entry['kind']} {w[0]}x{w[1]} shift {shifts}{pad}"


class PatchMergingParams(DownsampleParams):
    """Swin's patch merging (arXiv 2103.14030; timm ``swin_transformer.PatchMerging``): each 2x2
    neighbourhood of ``(B, H, W, C)`` is concatenated to ``4C`` channels (timm's order), normed
    (``norm`` over ``4C``) and projected by ``reduction`` (linear, no bias) to the stage width:
    ``(B, H, W, C) -> (B, H/2, W/2, C_out)``. The grid must be even."""

    kind: Literal["patch_merging"] = "patch_merging"
    norm: NormField = Field(default_factory=lambda: {"kind": "layernorm"},
                            description="norm over the 4C merged channels")

    def out_grid(self, in_grid, loc):
        for axis, n in zip(("height", "width"), in_grid):
            if n % 2:
                raise PlanError(loc, f"patch_merging halves the grid, but the token {axis} is {n} (odd); "
                                f"use an img_size that gives an even {axis} here (e.g. {n + 1} or {n - 1} "
                                "tokens), or a conv downsampler with padding")
        return (in_grid[0] // 2, in_grid[1] // 2)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs,
                "norm": self.norm.resolve(4 * in_chs, f"{loc}.norm")}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return None  # 2x2 neighbourhoods; the plan checks that the stride 2 divides the unit


registry.register("token_mixer", "window_attention", WindowAttentionParams,
                  "hfactory.layers.swin:WindowAttention", overwrite=True)
registry.register("downsample", "patch_merging", PatchMergingParams,
                  "hfactory.layers.swin:PatchMerging", overwrite=True)
