"""Swin Transformer V2 components: scaled-cosine (shifted-)window attention with a continuous
relative-position bias, and V2's patch merging (params + plan arithmetic).

Source: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", arXiv 2111.09883;
the reference behaviour is timm ``models/swin_transformer_v2.py`` (``WindowAttention``,
``SwinTransformerV2Block._calc_window_shift`` / ``_attn``, ``PatchMerging``). The block's
residual post-norm (``x + norm(f(x))``) is the core's ``residual_norm_style: res_post``.

Pure Python (no torch): the plan shows each block's effective window, shift and padded grid
(the same rule as Swin V1, :func:`hfactory.spec.swin.window_and_shift`). Modules in
:mod:`hfactory.layers.swinv2`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from .. import registry
from .base import PlanError
from .components import DownsampleParams, NormField, StageContext
from .swin import WindowAttentionParams

__all__ = ["WindowAttentionV2Params", "PatchMergingV2Params"]


class WindowAttentionV2Params(WindowAttentionParams):
    """Swin V2's (shifted-)window attention (arXiv 2111.09883; timm
    ``swin_transformer_v2.WindowAttention``, parameter names ``qkv``, ``q_bias``, ``v_bias``,
    ``logit_scale``, ``cpb_mlp``, ``proj``).

    Scaled cosine attention: ``cos(q, k) * exp(min(logit_scale, log 100))`` with a learned scale
    per head, plus a continuous relative-position bias ``16 * sigmoid(cpb_mlp(coords))``, where
    ``cpb_mlp`` is ``Linear(2, 512)-ReLU-Linear(512, heads, no bias)`` over log-spaced relative
    coordinates (normalised by ``pretrained_window_size - 1``, or by the block's effective window
    - 1 when it is 0), so the bias exists for any window. ``qkv_bias`` adds learned q and v biases
    (the k bias is fixed at zero). Works on the ``grid`` layout ``(B, H, W, C)``; windows, shifts
    and padding per block as :class:`~hfactory.spec.swin.WindowAttentionParams` (even
    ``block_index`` regular, odd shifted by ``window // 2``, windows clipped to the grid). Where
    the window does not divide the grid, the module does what timm does: roll, then zero-pad at
    the end, shift regions taken on the padded grid, padded keys not masked. Shifted windows cross
    mask-unit borders (not MAE-compatible).
    """

    kind: Literal["window_attention_v2"] = "window_attention_v2"
    pretrained_window_size: Union[int, tuple[int, int]] = Field(
        0, description="window the relative coordinates are normalised to (timm pretrained_window_size); "
        "0: the block's own window")
    cpb_hidden: int = Field(512, ge=1, description="hidden width of the continuous position bias MLP")

    @field_validator("pretrained_window_size")
    @classmethod
    def _pretrained_window(cls, v):
        if any(s < 0 for s in ((v, v) if isinstance(v, int) else v)):
            raise PydanticCustomError("pretrained_window_size",
                                      "pretrained_window_size must be 0 (off) or positive: an int or [h, w]")
        return v

    def resolve(self, ctx: StageContext) -> dict:
        if ctx.q_stride:
            raise PlanError(ctx.loc, "window_attention_v2 cannot pool queries; use patch_merging_v2 as the "
                            "stage's downsample")
        out = super().resolve(ctx)
        out["kind"] = self.kind
        out.pop("proj_bias")  # timm's V2 projection always has a bias
        pw = self.pretrained_window_size
        out.update(pretrained_window_size=[pw, pw] if isinstance(pw, int) else list(pw),
                   cpb_hidden=self.cpb_hidden)
        return out


class PatchMergingV2Params(DownsampleParams):
    """Swin V2's patch merging (arXiv 2111.09883; timm ``swin_transformer_v2.PatchMerging``):
    each 2x2 neighbourhood of ``(B, H, W, C)`` is concatenated to ``4C`` channels (timm's order),
    projected by ``reduction`` (linear, no bias) to the stage width, THEN normed (``norm`` over the
    output width): ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)``. An odd axis is zero-padded
    at the end first, as timm does."""

    kind: Literal["patch_merging_v2"] = "patch_merging_v2"
    norm: NormField = Field(default_factory=lambda: {"kind": "layernorm"},
                            description="norm over the C_out channels, after the reduction")

    def out_grid(self, in_grid, loc):
        return ((in_grid[0] + 1) // 2, (in_grid[1] + 1) // 2)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs,
                "norm": self.norm.resolve(out_chs, f"{loc}.norm")}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        if grid is not None and any(g % 2 for g in grid):
            return "patch_merging_v2 pads an odd grid, which straddles mask units; use an even grid"
        return None  # 2x2 neighbourhoods; the plan checks that the stride 2 divides the unit


registry.register("token_mixer", "window_attention_v2", WindowAttentionV2Params,
                  "hfactory.layers.swinv2:WindowAttentionV2", overwrite=True)
registry.register("downsample", "patch_merging_v2", PatchMergingV2Params,
                  "hfactory.layers.swinv2:PatchMergingV2", overwrite=True)
