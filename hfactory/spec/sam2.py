"""Params of SAM2's HieraDet trunk components (no torch; modules in :mod:`hfactory.layers.sam2`).

- ``token_mixer: sam2_window_attention``: HieraDet's windowed multi-head attention
  (``MultiScaleAttention`` inside ``MultiScaleBlock``): the normed grid is zero-padded at the
  bottom/right to a multiple of the window, cut into windows, attended per window *without* a
  padding mask (padded tokens are zeros after the norm, so their keys and values are the qkv
  biases and take part in attention), put back and cropped. It can pool its queries inside each
  window (``q_stride``, the first block of a ``q_pool`` stage with ``lag_mixer``), so HieraDet's
  stage transitions are hfactory's generic fused q-pooling block.

The rest of HieraDet is generic: global attention blocks are per-block overrides
(``blocks: [{at: [...], token_mixer: attention}]``), the position embedding is ``abs_win`` with
``antialias: false`` (:mod:`hfactory.spec.hiera`), the stage transition is ``q_pool``.

Sources: Ravi et al., "SAM 2: Segment Anything in Images and Videos" (arXiv 2408.00714);
facebookresearch/sam2 ``sam2/modeling/backbones/hieradet.py`` and ``backbones/utils.py``
(``window_partition`` / ``window_unpartition``); timm ``models/hieradet_sam2.py``. Unlike Swin's
``window_attention`` (:mod:`hfactory.spec.swin`), padded keys are *not* masked.

Importing this module registers the components (``hfactory.spec`` does so).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import Field, PositiveInt

from .. import registry
from .base import PlanError
from .protocol import StageContext, TokenMixerParams

__all__ = ["Sam2WindowAttentionParams", "sam2_padded_grid"]


def sam2_padded_grid(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """``grid`` zero-padded at the end to a multiple of ``window`` per axis (SAM2's
    ``pad = (ws - H % ws) % ws``); a window larger than the grid pads to one window."""
    return tuple(-(-g // w) * w for g, w in zip(grid, window))


class Sam2WindowAttentionParams(TokenMixerParams):
    """SAM2 HieraDet's windowed attention (arXiv 2408.00714; sam2 ``hieradet.MultiScaleBlock`` with
    ``window_size > 0``; timm ``hieradet_sam2.MultiScaleAttention``, parameter names ``qkv``,
    ``proj``) on the grid ``(B, H, W, C_in) -> (B, H', W', C)``.

    The grid is zero-padded at the end to a multiple of ``window_size`` (no mask: padded tokens
    attend and are attended), cut into row-major windows, each window attended with SDPA's default
    scale, put back and cropped to ``(H, W)``. In the first block of a ``q_pool`` stage
    (``q_stride`` ``(s, s)``, ``C_in`` the previous width) the queries are max-pooled inside each
    window to ``window / s`` and the output, unpartitioned with that window, is cropped to
    ``(H/s, W/s)``, SAM2's "window lag": the block keeps the previous stage's window.

    The plan entry carries the resolved ``window_size`` ``[wh, ww]``, the stage ``grid`` and the
    ``padded_grid`` (informational: the module pads whatever grid it receives).

    Raises (plan): :class:`PlanError` at ``<stage>.token_mixer.window_size`` when ``q_stride`` does
    not divide the window (e.g. window 7 with q_stride 2).
    """

    kind: Literal["sam2_window_attention"] = "sam2_window_attention"
    window_size: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = Field(
        ..., description="window in tokens: int or [h, w]; SAM2 tiny uses 8, 4, 14, 7 in stages 0-3")
    qkv_bias: bool = True
    proj_bias: bool = True
    attn_drop: float = Field(0.0, ge=0, lt=1)
    proj_drop: float = Field(0.0, ge=0, lt=1)
    uses_heads: ClassVar[bool] = True
    supports_q_stride: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    @property
    def window_hw(self) -> tuple[int, int]:
        v = self.window_size
        return (v, v) if isinstance(v, int) else tuple(v)

    def resolve(self, ctx: StageContext) -> dict:
        window = self.window_hw
        if ctx.q_stride:
            for axis, w, s in zip(("height", "width"), window, ctx.q_stride):
                if w % s:
                    raise PlanError(f"{ctx.loc}.window_size", f"q_stride {s} pools the queries inside each window, "
                                    f"but does not divide the window {axis} {w}; use a window_size that is a "
                                    f"multiple of {s}")
        out = super().resolve(ctx)
        out.update(window_size=list(window), grid=list(ctx.grid),
                   padded_grid=list(sam2_padded_grid(tuple(ctx.grid), window)))
        return out

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return (f"{entry['kind']!r} pads the full grid to its window without masking, so windows depend on the "
                "grid's size and have no per-mask-unit form")

    @classmethod
    def describe(cls, entry, blocks=()):
        """``sam2_window_attention 14x14`` plus `` pad HxW`` when the grid is padded, `` q/2`` when
        the block pools its queries."""
        w, pad = entry["window_size"], entry.get("padded_grid")
        text = f"{entry['kind']} {w[0]}x{w[1]}"
        if pad is not None and list(pad) != list(entry["grid"]):
            text += f" pad {pad[0]}x{pad[1]}"
        if entry.get("q_stride"):
            text += f" q/{entry['q_stride'][0]}"
        return text


registry.register("token_mixer", "sam2_window_attention", Sam2WindowAttentionParams,
                  "hfactory.layers.sam2:Sam2WindowAttention", overwrite=True)
