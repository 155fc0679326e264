"""Params models of the built-in components, and the field type that parses any component.

Every component is written in a spec either as its name (``token_mixer: pooling``) or as a
mapping with ``kind`` and options (``token_mixer: {kind: pooling, pool_size: 3}``). The params
model validates the options and does the component's own shape arithmetic for the plan
(``resolve``); it returns the keyword arguments its ``nn.Module`` builder receives, so modules
never re-derive shapes.

Token layouts (the contract in :mod:`hfactory.layers.layout`): every component declares the layouts
it accepts (``accepts``), downsamplers also the layout they produce (``produces``). This first
set works on the ``grid`` layout, ``(B, H, W, C)`` channels-last.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from .. import registry
from .base import MAX_SIZE, PlanError, located_error
from .protocol import (SLOT_BASES, ComponentParams, DownsampleParams, FeedforwardParams, NormParams,  # noqa: F401
                       PosEmbedParams, StageContext, TokenMixerParams)

Layout = Literal["grid", "units", "seq"]

__all__ = [
    "ComponentField", "ComponentParams", "TokenMixerParams", "DownsampleParams",
    "FeedforwardParams", "NormParams", "PosEmbedParams", "StageContext", "SLOT_BASES",
]


def _parse_component(slot: str):
    def parse(value: Any) -> Any:
        if isinstance(value, ComponentParams):
            if value.slot != slot:
                raise PydanticCustomError("component_slot", f"a {value.slot} component cannot be used as {slot}")
            return value
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "component_type",
                f"expected a {slot} name or a mapping with 'kind'; registered {slot} kinds: "
                + ", ".join(registry.names(slot)),
            )
        if "kind" not in value:
            raise PydanticCustomError(
                "component_kind_missing",
                f"missing 'kind'; registered {slot} kinds: {', '.join(registry.names(slot))}",
            )
        kind = value["kind"]
        try:
            entry = registry.get(slot, kind)
        except (registry.UnknownComponentError, TypeError) as err:
            raise located_error("component", ("kind",), str(err), kind, "unknown_component") from None
        return entry.params.model_validate(value)

    return parse


class ComponentField:
    """Annotation for a spec field holding a component of ``slot`` (looked up in the registry).

    Serialises to ``{kind: name, <options set by the user>}``; the JSON Schema lists every
    registered component of the slot (see :mod:`hfactory.spec.schema`).
    """

    def __init__(self, slot: str):
        self.slot = slot

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_before_validator_function(
            _parse_component(self.slot),
            core_schema.is_instance_schema(ComponentParams),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _dump_component, when_used="always"),
        )

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler):
        # Placeholder replaced by the union of registered params models in spec/schema.py.
        return {"x-hfactory-slot": self.slot}


def _dump_component(value: ComponentParams) -> dict:
    data = value.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    data.pop("kind", None)
    return {"kind": value.kind, **data}


#: A nested norm inside another component (e.g. a downsampler's norm).
NormField = Annotated[ComponentParams, ComponentField("norm")]


Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "squared_relu", "star_relu", "tanh"]

# ------------------------------------------------------------------------------------ norms


class LayerNormParams(NormParams):
    """LayerNorm over channels (``torch.nn.LayerNorm`` semantics). ``bias: false`` gives the
    bias-free LayerNorm of CAFormer/ConvFormer (MetaFormer baselines, arXiv 2210.13452)."""

    kind: Literal["layernorm"] = "layernorm"
    eps: float = Field(1e-5, gt=0)
    bias: bool = True


class GroupNormParams(NormParams):
    """GroupNorm over (H, W, C) per sample; ``num_groups: 1`` is PoolFormer's norm
    (arXiv 2111.11418, ``GroupNorm1`` in timm ``metaformer.py``)."""

    kind: Literal["groupnorm"] = "groupnorm"
    num_groups: int = Field(1, ge=1)
    eps: float = Field(1e-5, gt=0)
    bias: bool = True
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def resolve(self, dim: int, loc: str) -> dict:
        if dim % self.num_groups:
            raise PlanError(f"{loc}.num_groups", f"num_groups {self.num_groups} does not divide the "
                            f"width {dim}; use a divisor of {dim} (1 = PoolFormer's GroupNorm1)")
        return super().resolve(dim, loc)

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return "groupnorm normalises over the whole map of a sample, which the sparse encoder does not have"


class IdentityNormParams(NormParams):
    """No normalisation."""

    kind: Literal["identity"] = "identity"


# ----------------------------------------------------------------------------- token mixers


class AttentionParams(TokenMixerParams):
    """Global multi-head self-attention over all tokens of the stage (ViT, arXiv 2010.11929).

    Runs through the one attention entry point (:func:`hfactory.layers.attention.attention`),
    i.e. xformers' memory-efficient kernel on CUDA when installed, PyTorch SDPA otherwise.
    """

    kind: Literal["attention"] = "attention"
    qkv_bias: bool = True
    proj_bias: bool = True
    attn_drop: float = Field(0.0, ge=0, lt=1)
    proj_drop: float = Field(0.0, ge=0, lt=1)
    rotary: bool = Field(False, description="rotary position embedding on q and k over the flattened "
                         "token index (RoFormer, arXiv 2104.09864; xformers' use_rotary_embeddings)")
    uses_heads: ClassVar[bool] = True
    supports_q_stride: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})

    def resolve(self, ctx: StageContext) -> dict:
        if self.rotary and ctx.q_stride:
            raise PlanError(f"{ctx.loc}.rotary", "rotary embeddings index tokens in order, which q-pooling "
                            "does not keep; use rotary: false in q-pooling stages")
        if self.rotary and ctx.dim_head % 2:
            raise PlanError(f"{ctx.loc}.rotary", f"rotary embeddings need an even dim_head, got {ctx.dim_head}; "
                            "change num_heads or dim_head")
        out = super().resolve(ctx)
        if ctx.token_sizes:  # keys of merged tokens get a log(size) bias (proportional attention)
            out["token_sizes"] = True
        return out

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        if entry.get("rotary"):
            return ("rotary embeddings number tokens by their index in the flattened sequence, which changes "
                    "when mask units are dropped")
        # a set operation over the kept tokens (global), or attention inside each unit
        return super().crosses_units(entry, unit, grid)


class MaskUnitAttentionParams(AttentionParams):
    """Hiera's mask-unit attention (arXiv 2306.00989; timm ``hiera.MaskUnitAttention``):
    multi-head self-attention inside each mask unit of the ``units`` layout
    ``(B, U, uh, uw, C)``; with ``q_stride`` (a q-pooling stage's first block) the queries are
    max-pooled inside the unit while keys and values keep every token."""

    kind: Literal["mask_unit_attention"] = "mask_unit_attention"
    accepts: ClassVar[frozenset] = frozenset({"units"})


class PoolingParams(TokenMixerParams):
    """PoolFormer's mixer: ``avgpool(x) - x`` with stride 1 and ``count_include_pad=False``
    (arXiv 2111.11418; timm ``metaformer.Pooling``)."""

    kind: Literal["pooling"] = "pooling"
    pool_size: int = Field(3, ge=1)

    def resolve(self, ctx: StageContext) -> dict:
        if self.pool_size % 2 == 0:
            raise PlanError(f"{ctx.loc}.pool_size", f"pool_size {self.pool_size} is even, which would "
                            "shift the grid; use an odd size (3 in PoolFormer)")
        return super().resolve(ctx)

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["pool_size"]
        return None if k == 1 else f"its {k}x{k} average pooling reads neighbouring tokens across mask-unit borders"

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"{entry['kind']}{entry['pool_size']}"


class SepConvParams(TokenMixerParams):
    """ConvFormer's separable conv (MobileNetV2-style inverted block; arXiv 2210.13452, timm
    ``metaformer.SepConv``): ``pwconv1 (dim -> expansion_ratio*dim) -> act -> depthwise
    kernel_size conv -> pwconv2``. ``bias`` applies to both pointwise layers."""

    kind: Literal["sepconv"] = "sepconv"
    expansion_ratio: float = Field(2.0, gt=0)
    kernel_size: int = Field(7, ge=1)
    activation: Activation = "star_relu"
    bias: bool = False

    def resolve(self, ctx: StageContext) -> dict:
        if self.kernel_size % 2 == 0:
            raise PlanError(f"{ctx.loc}.kernel_size", f"kernel_size {self.kernel_size} is even, which would "
                            "shift the grid; use an odd size (7 in ConvFormer)")
        hidden = int(self.expansion_ratio * ctx.dim)
        if hidden < 1:
            raise PlanError(f"{ctx.loc}.expansion_ratio", f"{self.expansion_ratio} x width {ctx.dim} rounds to 0 "
                            "channels; use a larger expansion_ratio")
        if hidden > MAX_SIZE:
            raise PlanError(f"{ctx.loc}.expansion_ratio", f"{self.expansion_ratio} x width {ctx.dim} = {hidden} "
                            f"channels, more than the plan's limit {MAX_SIZE}; use a smaller expansion_ratio")
        return {"kind": self.kind, "dim": ctx.dim, "hidden_chs": hidden, "kernel_size": self.kernel_size,
                "activation": self.activation, "bias": self.bias}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["kernel_size"]
        return None if k == 1 else f"its {k}x{k} depthwise conv reads neighbouring tokens across mask-unit borders"

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"{entry['kind']}{entry['kernel_size']}"


class IdentityMixerParams(TokenMixerParams):
    """No token mixing (MetaFormer's IdentityFormer baseline, arXiv 2210.13452)."""

    kind: Literal["identity"] = "identity"
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})


# ------------------------------------------------------------------------------ downsamplers


def conv_out_len(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling over ``n`` positions (``floor((n + 2p - k) / s) + 1``, 0 if
    the padded input is shorter than the kernel)."""
    return (n + 2 * padding - kernel) // stride + 1 if n + 2 * padding >= kernel else 0


def padding_advice(n: int, kernel: int, stride: int, kernel_field: str = "kernel_size") -> str:
    """What makes ``kernel``/``stride`` map ``n`` positions to exactly ``n // stride``: the
    smallest padding that does (paddings above ``kernel // 2`` are not offered), else a kernel
    change (an even kernel with stride 1 shifts the grid by one whatever the padding)."""
    for padding in range(kernel // 2 + 1):
        if conv_out_len(n, kernel, stride, padding) == n // stride:
            return f"padding {padding} gives {n // stride}"
    return (f"no padding gives {n // stride} with {kernel_field} {kernel} and stride {stride}; use an odd "
            f"{kernel_field} with stride 1, or {kernel_field} = stride (non-overlapping)")


class ConvDownsampleParams(DownsampleParams):
    """Strided-conv patch embedding / downsampling with optional pre- or post-norm.

    xformers' ``PatchEmbeddingConfig`` and timm ``metaformer.Downsampling`` (``norm`` before the
    conv when ``pre_norm``, after it otherwise). ``stride`` defaults to ``patch_size``.
    The plan requires the conv to reduce the grid by exactly ``stride`` (``H -> H / stride``), so
    every stage's reduction is exact and ``feature_info`` reductions are true.
    """

    kind: Literal["conv"] = "conv"
    patch_size: int = Field(..., ge=1, description="conv kernel size (xformers' name)")
    stride: Optional[int] = Field(None, ge=1, description="defaults to patch_size")
    padding: int = Field(0, ge=0)
    bias: bool = True
    norm: Optional[NormField] = None
    pre_norm: bool = False

    def out_grid(self, in_grid, loc):
        k, s, p = self.patch_size, self.stride or self.patch_size, self.padding
        for axis, n in zip(("height", "width"), in_grid):
            if n % s:
                raise PlanError(f"{loc}.stride", f"stride {s} does not divide the input {axis} {n}; "
                                f"use a stride that divides {n} or change img_size")
            got = conv_out_len(n, k, s, p)
            if got != n // s:
                raise PlanError(f"{loc}.padding", f"patch_size {k}, stride {s}, padding {p} map {axis} {n} "
                                f"to {got}, not {n // s}; {padding_advice(n, k, s, 'patch_size')}")
        return (in_grid[0] // s, in_grid[1] // s)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        norm_dim = in_chs if self.pre_norm else out_chs
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs, "patch_size": self.patch_size,
                "stride": self.stride or self.patch_size, "padding": self.padding, "bias": self.bias,
                "norm": self.norm.resolve(norm_dim, f"{loc}.norm") if self.norm is not None else None,
                "pre_norm": self.pre_norm}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k, s, p = entry["patch_size"], entry["stride"], entry["padding"]
        if k != s or p:
            return (f"conv {k}x{k}/s{s}/p{p} reads neighbouring tokens across mask-unit borders; a unit-local "
                    "conv has patch_size = stride and padding 0")
        return None  # non-overlapping; the plan checks that the stride divides the unit

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"{entry['kind']}{entry['patch_size']}/s{entry['stride']}/p{entry.get('padding', 0)}"


class QPoolParams(DownsampleParams):
    """Hiera's q-pooling stage transition (arXiv 2306.00989; timm ``hiera.HieraBlock``): fused into
    the stage's first block, which max-pools its queries and its residual by ``q_stride``
    (inside mask units in the ``units`` layout) and projects the normed input to the new width
    as the residual. With ``lag_mixer`` that block still uses the previous stage's token mixer
    ("mask unit attention lags by one block", so global attention starts after pooling)."""

    kind: Literal["q_pool"] = "q_pool"
    q_stride: Union[int, tuple[int, int]] = 2
    lag_mixer: bool = True
    expand: Literal["proj", "max_avg"] = Field(
        "proj", description="how the first block widens its residual: proj = Linear of the normed input "
        "(Hiera), max_avg = concat of the max- and avg-pooled input (timm use_expand_proj=False; needs "
        "embedding = 2 x the previous width)")
    fused: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid", "units"})

    @property
    def stride_hw(self) -> tuple[int, int]:
        return (self.q_stride, self.q_stride) if isinstance(self.q_stride, int) else tuple(self.q_stride)

    def out_grid(self, in_grid, loc):
        for axis, n, s in zip(("height", "width"), in_grid, self.stride_hw):
            if s < 1 or n % s:
                raise PlanError(f"{loc}.q_stride", f"q_stride {s} does not divide the token {axis} {n}; use a "
                                f"divisor of {n}")
        return (in_grid[0] // self.stride_hw[0], in_grid[1] // self.stride_hw[1])

    def resolve(self, in_chs, out_chs, in_grid, loc):
        if self.expand == "max_avg" and out_chs != 2 * in_chs:
            raise PlanError(f"{loc}.expand", f"max_avg concatenates two poolings of the {in_chs} input channels, "
                            f"so the embedding must be {2 * in_chs}, not {out_chs}; use expand: proj")
        return {"kind": self.kind, "q_stride": list(self.stride_hw), "lag_mixer": self.lag_mixer,
                "expand": self.expand}

    def first_block_expand(self) -> str:
        return self.expand

    def first_block_q_stride(self) -> tuple[int, int]:
        return self.stride_hw

    def first_block_lags_mixer(self) -> bool:
        return self.lag_mixer


class NoDownsampleParams(DownsampleParams):
    """No downsampling: the stage keeps the previous grid and width."""

    kind: Literal["none"] = "none"
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})
    identity: ClassVar[bool] = True

    def out_grid(self, in_grid, loc):
        return tuple(in_grid)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        if in_chs != out_chs:
            raise PlanError(loc, f"downsample 'none' keeps the width {in_chs}, but the stage's embedding is "
                            f"{out_chs}; use a downsampler such as conv, or set embedding: {in_chs}")
        return super().resolve(in_chs, out_chs, in_grid, loc)


# ----------------------------------------------------------------------------- feedforwards



class MlpParams(FeedforwardParams):
    """Two-layer MLP ``fc1 -> act -> drop -> fc2 -> drop`` (xformers ``MLP``; timm ``Mlp``).
    Hidden width is ``int(dim * hidden_layer_multiplier)``."""

    kind: Literal["mlp"] = "mlp"
    hidden_layer_multiplier: float = Field(4.0, gt=0)
    activation: Activation = "gelu"
    bias: bool = True
    drop: float = Field(0.0, ge=0, lt=1)

    def resolve(self, dim, loc):
        hidden = int(dim * self.hidden_layer_multiplier)
        if hidden < 1:
            raise PlanError(f"{loc}.hidden_layer_multiplier", f"{self.hidden_layer_multiplier} x width {dim} "
                            "rounds to 0 hidden units; use a larger multiplier")
        if hidden > MAX_SIZE:
            raise PlanError(f"{loc}.hidden_layer_multiplier", f"{self.hidden_layer_multiplier} x width {dim} = "
                            f"{hidden} hidden units, more than the plan's limit {MAX_SIZE}; use a smaller multiplier")
        return {"kind": self.kind, "dim": dim, "hidden_features": hidden, "activation": self.activation,
                "bias": self.bias, "drop": self.drop}


# ----------------------------------------------------------------------- position embeddings


class LearnedPosEmbedParams(PosEmbedParams):
    """Learned absolute position embedding of shape ``(1, H, W, C)`` for the plan's grid,
    bicubically interpolated when the input grid differs (timm ``resample_abs_pos_embed``)."""

    kind: Literal["learned"] = "learned"
    init_std: float = Field(0.02, gt=0)


class NoPosEmbedParams(PosEmbedParams):
    """No position embedding (explicit, to override a model-wide default)."""

    kind: Literal["none"] = "none"
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return None


_BUILTINS = [
    ("norm", LayerNormParams, "hfactory.layers.norm:LayerNorm"),
    ("norm", GroupNormParams, "hfactory.layers.norm:GroupNorm"),
    ("norm", IdentityNormParams, "hfactory.layers.norm:Identity"),
    ("token_mixer", AttentionParams, "hfactory.layers.mixers:Attention"),
    ("token_mixer", MaskUnitAttentionParams, "hfactory.layers.mixers:MaskUnitAttention"),
    ("token_mixer", PoolingParams, "hfactory.layers.mixers:Pooling"),
    ("token_mixer", SepConvParams, "hfactory.layers.mixers:SepConv"),
    ("token_mixer", IdentityMixerParams, "hfactory.layers.mixers:Identity"),
    ("downsample", ConvDownsampleParams, "hfactory.layers.downsample:ConvDownsample"),
    ("downsample", QPoolParams, "hfactory.layers.downsample:Fused"),
    ("downsample", NoDownsampleParams, "hfactory.layers.downsample:Identity"),
    ("feedforward", MlpParams, "hfactory.layers.feedforward:Mlp"),
    ("pos_embed", LearnedPosEmbedParams, "hfactory.layers.posembed:LearnedPosEmbed"),
    ("pos_embed", NoPosEmbedParams, "hfactory.layers.posembed:Identity"),
]
for _slot, _params, _builder in _BUILTINS:
    registry.register(_slot, _params.model_fields["kind"].default, _params, _builder, overwrite=True)
