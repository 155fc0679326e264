"""PVTv2 components: spatial-reduction attention (and its linear variant) and the MLP with a
depth-wise conv (params + plan arithmetic).

Source: Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", arXiv
2106.13797; the reference behaviour is timm ``models/pvt_v2.py`` (``Attention``,
``MlpWithDepthwiseConv``). PVTv2's overlapping patch embeddings are the built-in ``conv``
downsampler with a post-norm (conv 7x7/s4/p3 then LayerNorm, later 3x3/s2/p1), its per-stage
final norm is the stage's ``out_norm``. Pure Python (no torch); modules in
:mod:`hfactory.layers.pvt`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import registry
from .base import MAX_SIZE, PlanError
from .components import Activation, FeedforwardParams, StageContext, TokenMixerParams

__all__ = ["SpatialReductionAttentionParams", "DWConvMlpParams"]


class SpatialReductionAttentionParams(TokenMixerParams):
    """PVTv2's spatial-reduction attention (arXiv 2106.13797; timm ``pvt_v2.Attention``, parameter
    names ``q``, ``kv``, ``sr``, ``norm``, ``proj``) on the ``grid`` layout ``(B, H, W, C)``.

    Queries come from every token; keys and values from a reduced grid: with ``sr_ratio > 1`` a
    ``sr_ratio x sr_ratio`` conv of stride ``sr_ratio`` (``(H, W) -> (H // sr, W // sr)``) then
    LayerNorm; with ``sr_ratio: 1`` the tokens themselves (no conv, no norm). ``linear: true``
    (PVTv2-li): adaptive average pooling to ``pool_size x pool_size``, a 1x1 conv, LayerNorm and
    GELU, whatever the grid. ``norm_eps`` is that LayerNorm's (timm: ``nn.LayerNorm``, 1e-5).

    Raises (plan): ``PlanError`` at ``token_mixer.sr_ratio`` when the reduction would leave no
    key (grid smaller than ``sr_ratio``), and at ``token_mixer`` in a q-pooling stage.
    """

    kind: Literal["sr_attention"] = "sr_attention"
    sr_ratio: int = Field(1, ge=1, description="kernel and stride of the key/value reduction conv (1: none)")
    linear: bool = Field(False, description="PVTv2-li: keys/values from an adaptive average pool to "
                         "pool_size x pool_size + 1x1 conv + LayerNorm + GELU (sr_ratio is then unused)")
    pool_size: int = Field(7, ge=1, description="output side of the linear variant's adaptive pooling")
    qkv_bias: bool = True
    norm_eps: float = Field(1e-5, gt=0, description="eps of the reduction's LayerNorm")
    attn_drop: float = Field(0.0, ge=0, lt=1)
    proj_drop: float = Field(0.0, ge=0, lt=1)
    uses_heads: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def resolve(self, ctx: StageContext) -> dict:
        if ctx.q_stride:
            raise PlanError(ctx.loc, "sr_attention cannot pool queries; use a conv downsample for the stage")
        if not self.linear and any(g < self.sr_ratio for g in ctx.grid):
            raise PlanError(f"{ctx.loc}.sr_ratio", f"sr_ratio {self.sr_ratio} is larger than the token grid "
                            f"{tuple(ctx.grid)}, leaving no keys; use an sr_ratio <= {min(ctx.grid)}")
        out = super().resolve(ctx)
        if not self.linear:
            out["kv_grid"] = [g // self.sr_ratio for g in ctx.grid]
        return out

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        # Why: keys/values are built from the whole grid (a strided conv or an adaptive pool), so
        # which positions a key summarises changes when mask units are dropped.
        if entry.get("linear"):
            return ("its keys/values come from an adaptive average pool of the full grid, which dropping "
                    "mask units changes")
        if entry.get("sr_ratio", 1) > 1:
            return (f"its {entry['sr_ratio']}x{entry['sr_ratio']} strided reduction conv builds keys/values "
                    "from positions of the full grid, not per mask unit")
        return "it works on the full grid layout and has no per-mask-unit form"

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"sra_linear{entry['pool_size']}" if entry.get("linear") else f"sra{entry['sr_ratio']}"


class DWConvMlpParams(FeedforwardParams):
    """PVTv2's MLP with a depth-wise conv (arXiv 2106.13797; timm ``pvt_v2.MlpWithDepthwiseConv``,
    names ``fc1``, ``dwconv``, ``fc2``): ``fc1 -> [relu] -> depthwise kernel_size conv (bias) ->
    act -> drop -> fc2 -> drop`` on the ``grid`` layout ``(B, H, W, C)`` (the conv needs the grid).
    Hidden width ``int(dim * hidden_layer_multiplier)``; ``extra_relu`` is PVTv2-li's ReLU after fc1.

    Raises (plan): ``PlanError`` at ``feedforward.kernel_size`` for an even kernel, at
    ``feedforward.hidden_layer_multiplier`` for 0 or too many hidden units.
    """

    kind: Literal["dwconv_mlp"] = "dwconv_mlp"
    hidden_layer_multiplier: float = Field(4.0, gt=0)
    kernel_size: int = Field(3, ge=1)
    activation: Activation = "gelu"
    extra_relu: bool = Field(False, description="ReLU after fc1 (PVTv2-li)")
    bias: bool = True
    drop: float = Field(0.0, ge=0, lt=1)
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def resolve(self, dim, loc):
        if self.kernel_size % 2 == 0:
            raise PlanError(f"{loc}.kernel_size", f"kernel_size {self.kernel_size} is even, which would shift "
                            "the grid; use an odd size (3 in PVTv2)")
        hidden = int(dim * self.hidden_layer_multiplier)
        if hidden < 1 or hidden > MAX_SIZE:
            raise PlanError(f"{loc}.hidden_layer_multiplier", f"{self.hidden_layer_multiplier} x width {dim} = "
                            f"{hidden} hidden units; valid are 1 to {MAX_SIZE}")
        return {"kind": self.kind, "dim": dim, "hidden_features": hidden, "kernel_size": self.kernel_size,
                "activation": self.activation, "extra_relu": self.extra_relu, "bias": self.bias, "drop": self.drop}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["kernel_size"]
        return (f"its {k}x{k} depthwise conv reads neighbouring tokens across mask-unit borders" if k > 1
                else "it works on the full grid layout and has no per-mask-unit form")

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"dwconv_mlp{entry['kernel_size']}"


registry.register("token_mixer", "sr_attention", SpatialReductionAttentionParams,
                  "hfactory.layers.pvt:SpatialReductionAttention", overwrite=True)
registry.register("feedforward", "dwconv_mlp", DWConvMlpParams, "hfactory.layers.pvt:DWConvMlp", overwrite=True)
