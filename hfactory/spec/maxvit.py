"""MaxViT components: the convolutional stem, MBConv with squeeze-excitation (as a stage's
downsampler and as a block's token mixer), block (window) attention and grid attention with a
TF-style relative position bias, and the empty feedforward of a conv-only block (params + plan
arithmetic).

Source: Tu et al., "MaxViT: Multi-Axis Vision Transformer", arXiv 2204.01697; the reference
behaviour is timm ``models/maxxvit.py`` (``Stem``, ``MbConvBlock``, ``PartitionAttentionCl``,
``AttentionCl``, ``RelPosBiasTf``). A MaxViT block (``MaxxVitBlock``: MBConv, block attention,
grid attention) is three hfactory blocks, chosen with per-block overrides (``every: 3``); a
stage's first MBConv (stride 2, its shortcut an average pool plus a 1x1 conv) is the stage's
``mbconv`` downsampler, stage 0's preceded by its nested ``conv_stem``. Pure Python (no torch);
modules in :mod:`hfactory.layers.maxvit`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from .. import registry
from .base import MAX_SIZE, PlanError, StrictModel
from .components import (Activation, ComponentField, ComponentParams, DownsampleParams, FeedforwardParams,
                         StageContext, TokenMixerParams)

__all__ = ["ConvStemParams", "MBConvDownsampleParams", "MBConvParams", "BlockAttentionParams",
           "GridAttentionParams", "NoFeedforwardParams", "make_divisible", "same_padding"]

#: ``same``: TensorFlow's SAME padding (the output has ``ceil(n / stride)`` positions; with stride 2
#: the extra row/column of zeros goes at the bottom/right), as timm's ``padding='same'`` (the ``_tf``
#: MaxViTs); ``symmetric``: PyTorch's ``kernel_size // 2`` on both sides (timm's default ``''``).
Padding = Literal["same", "symmetric"]

_Nested = Annotated[ComponentParams, ComponentField("downsample")]


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``, and not below
    ``round_limit * v``): the channel rounding of timm ``layers.helpers.make_divisible`` that
    MaxViT's MBConv applies to its expanded width."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < round_limit * v else new


def same_padding(kernel: int, stride: int, n: int) -> tuple[int, int]:
    """TensorFlow SAME padding ``(before, after)`` of a ``kernel``/``stride`` conv or pool over ``n``
    positions: ``max((ceil(n / s) - 1) * s + k - n, 0)`` split with the extra one after (timm
    ``layers.padding.pad_same``)."""
    total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def _halve(in_grid: tuple[int, int], loc: str, what: str) -> tuple[int, int]:
    for axis, n in zip(("height", "width"), in_grid):
        if n % 2:
            raise PlanError(loc, f"{what} halves the grid, but the token {axis} is {n} (odd); use an img_size "
                            f"that gives an even {axis} here (a multiple of 32 for MaxViT's five halvings)")
    return (in_grid[0] // 2, in_grid[1] // 2)


def _odd_kernel(kernel: int, loc: str) -> None:
    if kernel % 2 == 0:
        raise PlanError(f"{loc}.kernel_size", f"kernel_size {kernel} is even, which would shift the grid; use an "
                        "odd size (3 in MaxViT)")


class ConvStemParams(DownsampleParams):
    """MaxViT's convolutional stem (arXiv 2204.01697; timm ``maxxvit.Stem``, names ``conv1``,
    ``norm1``, ``conv2``): ``conv1`` (``kernel_size``, stride 2) -> BatchNorm (``norm_eps``) ->
    ``activation`` -> ``conv2`` (``kernel_size``, stride 1); ``(B, H, W, C_in) -> (B, H/2, W/2,
    width[1])``. ``width``: the two convs' output channels, an int for both (default: the
    stage's embedding). Stage 0's downsampler on its own, or nested as an ``mbconv``
    downsampler's ``stem``.

    Raises (plan): ``PlanError`` at the downsampler for an odd grid, at ``.kernel_size`` for an
    even kernel, at ``.width`` when its last width is not the stage's embedding (standalone use).
    """

    kind: Literal["conv_stem"] = "conv_stem"
    width: Optional[Union[int, tuple[int, int]]] = Field(
        None, description="output channels of conv1 and conv2 (int: both); default the stage's embedding")
    kernel_size: int = Field(3, ge=1)
    bias: bool = Field(False, description="conv biases (true in the _tf MaxViTs)")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the BatchNorm after conv1")
    activation: Activation = "gelu"
    padding: Padding = "symmetric"
    nested: ClassVar[dict] = {}

    @field_validator("width")
    @classmethod
    def _width_positive(cls, v):
        if v is not None and any(s < 1 or s > MAX_SIZE for s in ((v, v) if isinstance(v, int) else v)):
            raise PydanticCustomError("width", f"width must be 1 to {MAX_SIZE}: an int or [conv1, conv2]")
        return v

    def widths(self, out_chs: int) -> tuple[int, int]:
        """The two convs' output channels; ``out_chs`` when ``width`` is unset."""
        w = self.width if self.width is not None else out_chs
        return (w, w) if isinstance(w, int) else tuple(w)

    def out_grid(self, in_grid, loc):
        return _halve(in_grid, loc, "conv_stem (stride 2)")

    def resolve(self, in_chs, out_chs, in_grid, loc):
        _odd_kernel(self.kernel_size, loc)
        widths = self.widths(out_chs)
        if widths[1] != out_chs:
            raise PlanError(f"{loc}.width", f"the stem ends with {widths[1]} channels but the stage's embedding is "
                            f"{out_chs}; give width [.., {out_chs}] or nest the stem in an mbconv downsampler")
        return {"kind": self.kind, "in_chs": in_chs, "widths": list(widths), "kernel_size": self.kernel_size,
                "bias": self.bias, "norm_eps": self.norm_eps, "activation": self.activation, "padding": self.padding}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["kernel_size"]
        return f"its {k}x{k} convs read neighbouring tokens across mask-unit borders"

    @classmethod
    def describe(cls, entry, blocks=()):
        k = entry["kernel_size"]
        return f"conv_stem {k}x{k}/s2+{k}x{k}"


class _MBConvOptions(StrictModel):
    """The options MBConv shares as a downsampler and as a token mixer."""

    expand_ratio: float = Field(4.0, gt=0, description="expanded width = make_divisible(out_chs * expand_ratio)")
    kernel_size: int = Field(3, ge=1, description="the depthwise conv's kernel")
    se_ratio: float = Field(0.25, ge=0, description="squeeze-excitation width = int(out_chs * se_ratio); 0: no SE")
    activation: Activation = "gelu"
    se_activation: Activation = "silu"
    norm_eps: float = Field(1e-5, gt=0, description="eps of the three BatchNorms")
    padding: Padding = "symmetric"
    bias: bool = Field(True, description="bias of the output 1x1 conv and of the shortcut's 1x1 conv")

    def _widths(self, out_chs: int, loc: str) -> dict:
        _odd_kernel(self.kernel_size, loc)
        mid = make_divisible(out_chs * self.expand_ratio)
        if mid > MAX_SIZE:
            raise PlanError(f"{loc}.expand_ratio", f"{self.expand_ratio} x width {out_chs} = {mid} channels, more "
                            f"than the plan's limit {MAX_SIZE}; use a smaller expand_ratio")
        se = int(out_chs * self.se_ratio)
        if self.se_ratio and se < 1:
            raise PlanError(f"{loc}.se_ratio", f"{self.se_ratio} x width {out_chs} rounds to 0 channels; use a "
                            "larger se_ratio, or 0 for no squeeze-excitation")
        return {"mid_chs": mid, "se_chs": se, "kernel_size": self.kernel_size, "activation": self.activation,
                "se_activation": self.se_activation, "norm_eps": self.norm_eps, "padding": self.padding,
                "bias": self.bias}


def _describe_mbconv(entry: dict) -> str:
    se = "+se" if entry["se_chs"] else ""
    return f"mbconv{entry['kernel_size']}{se}"


class MBConvDownsampleParams(_MBConvOptions, DownsampleParams):
    """A stage's first MBConv, stride 2 (arXiv 2204.01697; timm ``maxxvit.MbConvBlock`` with
    ``stride=2``, ``stride_mode='dw'``): ``shortcut(x) + conv3(SE(act(BN(dwconv_s2(act(BN(conv1(
    BN(x)))))))))``, where the shortcut is a 2x2 average pool plus a 1x1 conv (the conv only when
    the width changes); ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``. The expanded width is
    ``make_divisible(C_out * expand_ratio)``, the SE width ``int(C_out * se_ratio)``. ``stem``: a
    downsampler run first (stage 0: ``conv_stem``); its output width is its own ``width``, or
    ``C_out``.

    Raises (plan): ``PlanError`` at the downsampler for an odd grid, at ``.stem`` for a fused
    stem, at ``.kernel_size`` / ``.expand_ratio`` / ``.se_ratio`` for sizes that do not fit.
    """

    kind: Literal["mbconv"] = "mbconv"
    stem: Optional[_Nested] = Field(None, description="a downsampler applied before (stage 0: conv_stem)")
    nested: ClassVar[dict] = {"stem": "downsample"}

    def _stem_out(self, out_chs: int) -> int:
        if self.stem is None:
            return out_chs
        return self.stem.widths(out_chs)[1] if isinstance(self.stem, ConvStemParams) else out_chs

    def out_grid(self, in_grid, loc):
        if self.stem is not None:
            if self.stem.fused:
                raise PlanError(f"{loc}.stem", f"{self.stem.kind!r} is fused into a block and cannot be a stem; "
                                "use conv_stem or conv")
            in_grid = tuple(self.stem.out_grid(in_grid, f"{loc}.stem"))
        return _halve(in_grid, loc, "mbconv (stride 2)")

    def resolve(self, in_chs, out_chs, in_grid, loc):
        stem = None
        if self.stem is not None:
            mid = self._stem_out(out_chs)
            stem = self.stem.resolve(in_chs, mid, in_grid, f"{loc}.stem")
            in_chs = mid
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs, **self._widths(out_chs, loc), "stem": stem}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["kernel_size"]
        return f"its {k}x{k} depthwise conv and squeeze-excitation read tokens across mask-unit borders"

    @classmethod
    def describe(cls, entry, blocks=()):
        stem = entry.get("stem")
        head = f"{registry.get('downsample', stem['kind']).params.describe(stem)}+" if stem else ""
        return f"{head}{_describe_mbconv(entry)}/s2"


class MBConvParams(_MBConvOptions, TokenMixerParams):
    """MBConv as a block's token mixer, stride 1 (arXiv 2204.01697; timm ``maxxvit.MbConvBlock``,
    names ``pre_norm``, ``conv1_1x1``, ``norm1``, ``conv2_kxk``, ``norm2``, ``se.fc1``, ``se.fc2``,
    ``conv3_1x1``): ``conv3(SE(act(BN(dwconv(act(BN(conv1(BN(x)))))))))`` on the ``grid`` layout
    ``(B, H, W, C)``. Its pre-norm BatchNorm is its own, so its block takes ``norm: identity`` and
    ``feedforward: none`` (the block's residual is MBConv's identity shortcut).

    Raises (plan): ``PlanError`` at ``token_mixer`` in a q-pooling block, at ``.kernel_size`` /
    ``.expand_ratio`` / ``.se_ratio`` for sizes that do not fit.
    """

    kind: Literal["mbconv"] = "mbconv"

    def resolve(self, ctx: StageContext) -> dict:
        if ctx.q_stride:
            raise PlanError(ctx.loc, "mbconv cannot pool queries; use an mbconv downsampler for the stage")
        return {"kind": self.kind, "dim": ctx.dim, **self._widths(ctx.dim, ctx.loc)}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        k = entry["kernel_size"]
        return f"its {k}x{k} depthwise conv and squeeze-excitation read tokens across mask-unit borders"

    @classmethod
    def describe(cls, entry, blocks=()):
        return _describe_mbconv(entry)


class _PartitionAttentionParams(TokenMixerParams):
    """Multi-head self-attention inside partitions of the grid, with a learned relative position
    bias per head over the partition's ``(2h-1) x (2w-1)`` offsets."""

    qkv_bias: bool = True
    proj_bias: bool = True
    attn_drop: float = Field(0.0, ge=0, lt=1)
    proj_drop: float = Field(0.0, ge=0, lt=1)
    uses_heads: ClassVar[bool] = True
    partition: ClassVar[str] = ""
    size_field: ClassVar[str] = ""

    @field_validator("window_size", "grid_size", check_fields=False)
    @classmethod
    def _size_positive(cls, v):
        if any(s < 1 or s > MAX_SIZE for s in ((v, v) if isinstance(v, int) else v)):
            raise PydanticCustomError("partition_size", f"the size must be 1 to {MAX_SIZE}: an int or [h, w]")
        return v

    @property
    def size_hw(self) -> tuple[int, int]:
        v = getattr(self, self.size_field)
        return (v, v) if isinstance(v, int) else tuple(v)

    def resolve(self, ctx: StageContext) -> dict:
        if ctx.q_stride:
            raise PlanError(ctx.loc, f"{self.kind} cannot pool queries; use an mbconv downsampler for the stage")
        size = self.size_hw
        for axis, n, s in zip(("height", "width"), ctx.grid, size):
            if n % s:
                divisors = [d for d in range(1, n + 1) if n % d == 0]
                raise PlanError(f"{ctx.loc}.{self.size_field}", f"{self.size_field} {size[0]}x{size[1]} does not tile "
                                f"the stage's {ctx.grid[0]}x{ctx.grid[1]} token grid ({axis} {n}); valid {axis}s: "
                                f"{', '.join(map(str, divisors))} (MaxViT uses img_size / 32)")
        return {"kind": self.kind, "dim": ctx.dim, "num_heads": ctx.num_heads, "dim_head": ctx.dim_head,
                "partition": self.partition, "partition_size": list(size), "qkv_bias": self.qkv_bias,
                "proj_bias": self.proj_bias, "attn_drop": self.attn_drop, "proj_drop": self.proj_drop}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        if entry["partition"] == "grid":
            return "grid attention mixes tokens spread over the whole grid, across mask units"
        return "block attention works on the full grid layout and has no per-mask-unit form"

    @classmethod
    def describe(cls, entry, blocks=()):
        s = entry["partition_size"]
        return f"{entry['kind']} {s[0]}x{s[1]}"


class BlockAttentionParams(_PartitionAttentionParams):
    """MaxViT's block attention (arXiv 2204.01697; timm ``maxxvit.PartitionAttentionCl`` with
    ``partition_type='block'``, ``AttentionCl``, ``RelPosBiasTf``; names ``qkv``, ``proj``,
    ``relative_position_bias_table``): self-attention inside non-overlapping ``window_size``
    windows of the ``grid`` layout ``(B, H, W, C)``, with a relative position bias.

    Raises (plan): ``PlanError`` at ``token_mixer.window_size`` when the window does not tile the
    stage's grid (no padding), naming the valid sizes.
    """

    kind: Literal["block_attention"] = "block_attention"
    window_size: Union[int, tuple[int, int]] = Field(7, description="window in tokens: int or [h, w]")
    partition: ClassVar[str] = "block"
    size_field: ClassVar[str] = "window_size"


class GridAttentionParams(_PartitionAttentionParams):
    """MaxViT's grid attention (arXiv 2204.01697; timm ``maxxvit.PartitionAttentionCl`` with
    ``partition_type='grid'``): the ``(H, W)`` grid is cut into a ``grid_size`` ``(gh, gw)`` lattice
    of cells; token ``(i, j)`` of every cell forms one group of ``gh * gw`` tokens, spaced
    ``(H / gh, W / gw)`` apart (dilated, global mixing), which attend to each other with a
    relative position bias over the lattice offsets.

    Raises (plan): ``PlanError`` at ``token_mixer.grid_size`` when the lattice does not tile the
    stage's grid, naming the valid sizes.
    """

    kind: Literal["grid_attention"] = "grid_attention"
    grid_size: Union[int, tuple[int, int]] = Field(7, description="lattice in tokens: int or [h, w]")
    partition: ClassVar[str] = "grid"
    size_field: ClassVar[str] = "grid_size"


class NoFeedforwardParams(FeedforwardParams):
    """No feedforward: the block has no second sublayer (no norm2, layer/res scale), as a conv-only
    block such as MaxViT's MBConv, whose block then is ``x + mixer(norm1(x))`` (give it
    ``norm: identity`` when the mixer norms its own input, as MBConv's BatchNorm does)."""

    kind: Literal["none"] = "none"

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return None


registry.register("downsample", "conv_stem", ConvStemParams, "hfactory.layers.maxvit:ConvStem", overwrite=True)
registry.register("downsample", "mbconv", MBConvDownsampleParams, "hfactory.layers.maxvit:MBConvDownsample",
                  overwrite=True)
registry.register("token_mixer", "mbconv", MBConvParams, "hfactory.layers.maxvit:MBConv", overwrite=True)
registry.register("token_mixer", "block_attention", BlockAttentionParams, "hfactory.layers.maxvit:PartitionAttention",
                  overwrite=True)
registry.register("token_mixer", "grid_attention", GridAttentionParams, "hfactory.layers.maxvit:PartitionAttention",
                  overwrite=True)
registry.register("feedforward", "none", NoFeedforwardParams, "hfactory.layers.maxvit:NoFeedforward", overwrite=True)
