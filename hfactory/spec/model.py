"""What users write: per-stage specs (xformers ``BasicLayerConfig``-like) and the encoder spec.

Field names follow xformers' ``BasicLayerConfig`` (``embedding``, ``attention_mechanism``,
``patch_size``, ``stride``, ``padding``, ``seq_len``, ``feedforward``, ``repeat_layer``,
``normalization``) where it has one, timm's for model-level options (``img_size``,
``in_chans``, ``num_classes``, ``global_pool``, ``drop_rate``, ``drop_path_rate``), and the
papers' for components (``layer_scale``, ``res_scale``).

A stage field left unset (``None``) is filled from ``EncoderSpec.defaults``, then from the
library default (:data:`LIBRARY_DEFAULTS`); :func:`hfactory.resolve` does that and
every derived number. This module validates fields one by one and never imports torch.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .base import MAX_SIZE, PlanError, StrictModel
from .components import Activation, ComponentField, ComponentParams
from .mae import MAESpec
from .overrides import apply_changes, record_step

__all__ = ["StageSpec", "StageDefaults", "BlockOverride", "EncoderSpec", "HeadSpec", "Lineage", "LIBRARY_DEFAULTS",
           "default_downsample", "NO_NORM"]

TokenMixer = Annotated[ComponentParams, ComponentField("token_mixer")]
Downsample = Annotated[ComponentParams, ComponentField("downsample")]
Feedforward = Annotated[ComponentParams, ComponentField("feedforward")]
Norm = Annotated[ComponentParams, ComponentField("norm")]
PosEmbed = Annotated[ComponentParams, ComponentField("pos_embed")]

_PATCH_KEYS = ("patch_size", "stride", "padding")


class _StageOptions(StrictModel):
    """Fields a stage shares with the model-wide ``defaults``; ``None`` means "not set here"."""

    depth: Optional[int] = Field(None, ge=1, validation_alias=AliasChoices("depth", "repeat_layer"),
                                 description="blocks in the stage (xformers: repeat_layer)")
    token_mixer: Optional[TokenMixer] = Field(
        None, validation_alias=AliasChoices("token_mixer", "attention_mechanism"),
        description="token mixer / attention mechanism (xformers: attention_mechanism)")
    downsample: Optional[Downsample] = Field(
        None, description="downsampler or patch embedding at the start of the stage; the stage-level "
        "shorthand patch_size/stride/padding means a conv downsampler")
    feedforward: Optional[Feedforward] = None
    num_heads: Optional[int] = Field(None, ge=1)
    dim_head: Optional[int] = Field(None, ge=1)
    norm: Optional[Norm] = Field(None, validation_alias=AliasChoices("norm", "normalization"))
    residual_norm_style: Optional[Literal["pre", "post", "res_post"]] = Field(
        None, description="pre: x + f(norm(x)); post: norm(x + f(x)) (original Transformer); res_post: "
        "x + norm(f(x)) (Swin V2, arXiv 2111.09883)")
    layer_scale: Optional[Union[Literal[False], float]] = Field(
        None, description="LayerScale init value (CaiT, arXiv 2103.17239); false disables")
    res_scale: Optional[bool] = Field(None, description="learned per-channel scale on the residual "
                                      "branch (ResScale, MetaFormer baselines arXiv 2210.13452)")
    pos_embed: Optional[PosEmbed] = Field(None, description="position embedding added after the downsampler")
    out_norm: Optional[Norm] = Field(None, description="norm of the stage's output, after its blocks (PVTv2's "
                                     "per-stage norm, arXiv 2106.13797); intermediates are taken after it")

    @model_validator(mode="before")
    @classmethod
    def _patch_shorthand(cls, data: Any) -> Any:
        # BasicLayerConfig puts patch_size/stride/padding on the stage; they mean a conv downsampler.
        if not isinstance(data, dict) or not any(k in data for k in _PATCH_KEYS):
            return data
        data = dict(data)
        conv = {"kind": "conv", **{k: data.pop(k) for k in _PATCH_KEYS if k in data}}
        if data.get("downsample") is not None:
            raise PydanticCustomError(
                "patch_shorthand_conflict",
                "give either downsample or the shorthand patch_size/stride/padding, not both")
        data["downsample"] = conv
        return data

    @field_validator("layer_scale", mode="before")
    @classmethod
    def _layer_scale_positive(cls, v):
        if v is True:
            raise PydanticCustomError("layer_scale", "layer_scale is an init value (e.g. 1e-5) or false")
        if isinstance(v, (int, float)) and v is not False and v < 0:
            raise PydanticCustomError("layer_scale", "layer_scale init value must be >= 0, or false to disable")
        return v


class BlockOverride(StrictModel):
    """Values for some blocks of a stage, replacing the stage's own for those blocks.

    Select the blocks with exactly one of ``at`` (an index or a list of indices; negative ones
    count from the end), ``range`` (``[start, stop)``, Python's slice rule) or ``every`` with
    ``offset`` (blocks ``offset, offset + every, ...``). A component given here replaces the
    stage's for those blocks (write it whole: ``{kind: window_attention, window_size: 14}``);
    ``drop_path`` replaces the block's rate from the linear schedule. Overrides apply in order, so
    a later one wins where two select the same block.

    Examples: SAM2's global-attention blocks ``{at: [5, 7, 9], token_mixer: attention}``;
    MaxViT's block/grid pair ``{every: 2, offset: 1, token_mixer: {kind: grid_attention}}``.
    """

    at: Optional[Union[int, list[int]]] = Field(None, description="block index or indices (negative: from the end)")
    range: Optional[tuple[int, int]] = Field(None, description="blocks start..stop-1, as Python's range")
    every: Optional[int] = Field(None, ge=1, description="every n-th block, from offset")
    offset: int = Field(0, ge=0, description="first block of an every-n pattern")
    token_mixer: Optional[TokenMixer] = None
    feedforward: Optional[Feedforward] = None
    norm: Optional[Norm] = None
    drop_path: Optional[float] = Field(None, ge=0, lt=1, description="stochastic depth rate of these blocks")

    @model_validator(mode="after")
    def _one_selector(self):
        given = [name for name in ("at", "range", "every") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "block_selector", "select the blocks with exactly one of at (indices), range ([start, stop)) "
                "or every (with offset); got {given}", {"given": ", ".join(given) or "none"})
        if self.offset and self.every is None:
            raise PydanticCustomError("block_selector", "offset goes with every (blocks offset, offset + every, ...)")
        if all(getattr(self, f) is None for f in ("token_mixer", "feedforward", "norm", "drop_path")):
            raise PydanticCustomError("block_override_empty", "an override sets at least one of token_mixer, "
                                      "feedforward, norm or drop_path")
        return self

    def selects(self, depth: int, loc: str) -> list[int]:
        """The block indices (ascending) this override selects in a stage of ``depth`` blocks.

        Raises:
            PlanError: an index outside the stage, or a selection of no block (``loc`` locates it).
        """
        if self.at is not None:
            picked = []
            for i in ([self.at] if isinstance(self.at, int) else self.at):
                if not -depth <= i < depth:
                    raise PlanError(f"{loc}.at", f"block {i} is outside the stage's {depth} blocks (valid: "
                                    f"{-depth}..{depth - 1})")
                picked.append(i % depth)
        elif self.range is not None:
            picked = list(range(depth))[slice(*self.range)]
        else:
            picked = list(range(self.offset, depth, self.every))
        if not picked:
            raise PlanError(loc, f"selects none of the stage's {depth} blocks; change the selection")
        return sorted(set(picked))


class StageDefaults(_StageOptions):
    """Model-wide values for every stage field left unset (e.g. one norm for all stages)."""


class StageSpec(_StageOptions):
    """One stage: a downsampler, then ``depth`` blocks of norm / token mixer / norm / feedforward.

    ``embedding`` is the stage's width (channels). ``seq_len``, when given, must equal the
    number of tokens the plan derives for the stage (H * W after its downsampler).
    """

    embedding: int = Field(..., ge=1, description="stage width in channels")
    seq_len: Optional[int] = Field(None, ge=1, description="tokens in the stage; checked against the plan")
    blocks: Optional[list[BlockOverride]] = Field(
        None, description="per-block overrides (token_mixer, feedforward, norm, drop_path) for blocks selected "
        "by index (at), range or pattern (every/offset); later ones win")


class HeadSpec(StrictModel):
    """The classifier after pooling (and the final norm): ``linear`` (one Linear, timm's default)
    or ``mlp`` (MetaFormer baselines' ``MlpHead``, arXiv 2210.13452: ``fc1 -> act -> norm ->
    dropout -> fc2`` with ``int(hidden_layer_multiplier * num_features)`` hidden units)."""

    kind: Literal["linear", "mlp"] = "linear"
    hidden_layer_multiplier: float = Field(4.0, gt=0)
    activation: Activation = "squared_relu"
    norm: Norm = Field(default_factory=lambda: {"kind": "layernorm", "eps": 1e-6})
    bias: bool = True

    def resolve(self, dim: int) -> dict:
        """The head's plan entry for ``dim`` pooled features (the classifier's builder arguments).

        Raises:
            PlanError: the MLP's hidden width rounds to 0 or exceeds the plan's size limit.
        """
        if self.kind == "linear":
            return {"kind": self.kind, "bias": self.bias}
        hidden = int(self.hidden_layer_multiplier * dim)
        if hidden < 1:
            raise PlanError("head.hidden_layer_multiplier", f"{self.hidden_layer_multiplier} x width {dim} rounds "
                            "to 0 hidden units; use a larger multiplier")
        if hidden > MAX_SIZE:
            raise PlanError("head.hidden_layer_multiplier", f"{self.hidden_layer_multiplier} x width {dim} = "
                            f"{hidden} hidden units, more than the plan's limit {MAX_SIZE}; use a smaller multiplier")
        return {"kind": self.kind, "hidden_features": hidden, "activation": self.activation, "bias": self.bias,
                "norm": self.norm.resolve(hidden, "head.norm")}


class LineageStep(StrictModel):
    """One derivation step: ``changes`` (path -> value, applied in order by ``with_changes``) or
    ``rule`` (a :class:`~hfactory.spec.variants.ScalingRule` applied by ``scale``)."""

    changes: Optional[dict[str, Any]] = None
    rule: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.changes is None) == (self.rule is None):
            raise PydanticCustomError("lineage_step", "a lineage step has exactly one of 'changes' or 'rule'")
        return self


class Lineage(StrictModel):
    """Where a variant came from (written by :mod:`hfactory.spec.variants`): the base spec's name
    and the steps that derived it from the base, in order; replaying them
    (:func:`hfactory.spec.variants.replay_lineage`) rebuilds the variant."""

    base: Optional[str] = None
    steps: list[LineageStep] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_the_first_format(cls, data):
        """Specs saved before steps were recorded have ``changes`` and ``rule``; read them as
        steps (that format kept no order: its one rule is taken as applied last)."""
        if isinstance(data, dict) and ("changes" in data or "rule" in data) and "steps" not in data:
            data = dict(data)
            changes, rule = data.pop("changes", None), data.pop("rule", None)
            data["steps"] = ([{"changes": changes}] if changes else []) + ([{"rule": rule}] if rule else [])
        return data


class EncoderSpec(StrictModel):
    """A hierarchical encoder: image geometry, stages, model-wide defaults and the head.

    ``img_size`` is an int (square) or ``[H, W]`` in pixels. ``attn_backend`` picks the attention
    kernel: ``auto`` (xformers on CUDA when importable, else SDPA), ``xformers``, ``sdpa`` or
    ``math``; it can be overridden at run time (:func:`hfactory.attention_backend`).
    """

    name: Optional[str] = None
    img_size: Union[int, tuple[int, int]] = 224
    in_chans: int = Field(3, ge=1)
    stages: list[StageSpec] = Field(..., min_length=1)
    defaults: StageDefaults = Field(default_factory=StageDefaults)
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth, linear over all blocks")
    num_classes: int = Field(1000, ge=0, description="0 gives pooled features from forward()")
    global_pool: Literal["avg", "max", ""] = Field(
        "avg", description="'' = no pooling: forward_head keeps the normed (B, C, H, W) map and a classifier "
        "acts per position, giving (B, num_classes, H, W) (timm's convention)")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    head_norm: Norm = Field(default_factory=lambda: {"kind": "layernorm"},
                            description="final norm; identity for none")
    head_norm_first: bool = Field(False, description="true: norm the final map before pooling "
                                  "(Swin, ViT); false: norm the pooled vector (MetaFormer, Hiera)")
    head: HeadSpec = Field(default_factory=HeadSpec, description="classifier: linear or mlp")
    attn_backend: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    mask_unit_size: Optional[Union[int, tuple[int, int]]] = Field(
        None, description="Hiera's mask unit in tokens of stage 0's output grid (e.g. 8 = 32x32 pixels at "
        "patch stride 4); tokens then flow in the units layout (B, U, uh, uw, C)")

    lineage: Optional[Lineage] = Field(None, description="base spec and changes this variant was derived by")
    mae: Optional[MAESpec] = Field(None, description="masked-autoencoder pretraining (decoder, mask ratio, loss) "
                                   "for hfactory pretrain / hfactory.mae.MaskedAutoencoder; the encoder ignores it")

    def with_changes(self, changes: dict, *, record: bool = True) -> "EncoderSpec":
        """A copy of this spec with the values at the given dotted paths replaced.

        Args:
            changes: ``{path: value}``, applied in order; ``stages.*.x`` changes every stage.
                Setting a component's ``kind`` replaces the component (its old options are dropped);
                changing an option of a component a stage inherits gives the stage its own copy.
            record: add the changes to ``lineage`` (base name and path -> value).

        Raises:
            OverrideError: a path that matches nothing (names the path and the valid keys).
            pydantic.ValidationError: a value of the wrong type (located, as for a hand-written spec).
        """
        data = apply_changes(self.model_dump(mode="json", exclude_none=True), changes, _SECTIONS, _inherited)
        if record:
            record_step(data, self, {"changes": {str(k): v for k, v in changes.items()}})
        return type(self).model_validate(data)

    @field_validator("mask_unit_size")
    @classmethod
    def _mask_unit_positive(cls, v):
        if v is not None and any(s < 1 for s in ((v, v) if isinstance(v, int) else v)):
            raise PydanticCustomError("mask_unit_size", "mask_unit_size must be positive: an int or [uh, uw]")
        return v

    @field_validator("img_size")
    @classmethod
    def _img_size_positive(cls, v):
        sizes = (v, v) if isinstance(v, int) else v
        if any(s < 1 for s in sizes):
            raise PydanticCustomError("img_size", "img_size must be positive: an int or [height, width]")
        return v

    @property
    def mask_unit_hw(self) -> Optional[tuple[int, int]]:
        """``mask_unit_size`` as ``(uh, uw)`` tokens, or None."""
        v = self.mask_unit_size
        return None if v is None else ((v, v) if isinstance(v, int) else tuple(v))

    @property
    def img_hw(self) -> tuple[int, int]:
        """``img_size`` as ``(H, W)`` in pixels."""
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)


#: Values used for a stage field that neither the stage nor ``spec.defaults`` sets.
LIBRARY_DEFAULTS = StageDefaults.model_validate({
    "depth": 1,
    "token_mixer": "attention",
    "feedforward": "mlp",
    "norm": "layernorm",
    "residual_norm_style": "pre",
    "layer_scale": False,
    "res_scale": False,
    "pos_embed": "none",
    "dim_head": 32,
})

# MetaFormer's downsamplers (arXiv 2111.11418, timm ``metaformer.py``): a 7x7 stride-4 conv stem
# (padding 2) for stage 0 and a 3x3 stride-2 conv (padding 1) for later stages.
_STEM = {"kind": "conv", "patch_size": 7, "stride": 4, "padding": 2}
_DOWNSAMPLE = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1}


def default_downsample(stage_index: int, as_dict: bool = False):
    """The library's downsampler for a stage that neither the stage nor ``defaults`` sets: the
    MetaFormer stem for stage 0, else its 3x3 stride-2 conv; a params model, or with ``as_dict``
    the mapping a spec would hold."""
    data = dict(_STEM if stage_index == 0 else _DOWNSAMPLE)
    if as_dict:
        return data
    return StageSpec.model_validate({"embedding": 1, "downsample": data}).downsample


_SECTIONS = {"spec": EncoderSpec, "stage": StageSpec, "block": BlockOverride, "defaults": StageDefaults, "head": HeadSpec, "mae": MAESpec}


def _inherited(root: dict, key: str, stage_index: int) -> Any:
    """A stage's component ``key`` when the stage (in the spec data ``root``) does not set it: the
    spec's default, else the library's (a copy)."""
    value = root.get("defaults", {}).get(key)
    if value is None:
        lib = LIBRARY_DEFAULTS.model_dump(mode="json", exclude_none=True)
        value = lib.get(key) or (default_downsample(stage_index, as_dict=True) if key == "downsample" else None)
    return copy.deepcopy(value)


#: The norm entry of "no normalisation" (what pruning the final norm writes into a spec).
NO_NORM = {"kind": "identity"}
