"""xformers' removed hierarchical factory, rebuilt on hfactory: port code by changing its imports.

Reproduces the public API of xformers 0.0.28's ``xformers/helpers/hierarchical_configs.py``
(:class:`BasicLayerConfig`, :func:`get_hierarchical_configuration`) and
``xformers/factory/model_factory.py`` (:class:`xFormerConfig`, :class:`xFormer`); the factory was
removed in v0.0.29, v0.0.28.post3 is the last release with it. Field names, argument names,
defaults and the stack-config dict format are kept, so this runs with only its import lines
changed::

    from hfactory.compat.xformers import (
        BasicLayerConfig, get_hierarchical_configuration, xFormer, xFormerConfig)

    configs = [
        BasicLayerConfig(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7,
                         stride=4, padding=2, seq_len=image_size * image_size // 16, feedforward="MLP"),
        BasicLayerConfig(embedding=128, attention_mechanism="scaled_dot_product", patch_size=3,
                         stride=2, padding=1, seq_len=image_size * image_size // 64, feedforward="MLP"),
    ]
    stack = get_hierarchical_configuration(configs, residual_norm_style="pre",
                                           use_rotary_embeddings=False, mlp_multiplier=4, dim_head=32)
    model = xFormer.from_config(xFormerConfig(stack))
    tokens = model(images)  # (B, 3, H, W) -> (B, H*W/64, 128)

The stack configs are validated by pydantic models (unknown keys and bad values raise a
``pydantic.ValidationError``, a ``ValueError``, naming the location such as
``stack_configs.1.multi_head_config.attention.casual`` and what is valid), translated into an
hfactory :class:`~hfactory.EncoderSpec` (one hfactory stage per patch embedding) and built as a
:class:`~hfactory.HierarchicalEncoder` (``model.encoder``; the spec and plan are ``model.spec`` /
``model.plan``). Every block computes what xformers' did: pre- or post-norm residuals (xformers'
``components/residual.py``), multi-head scaled-dot-product attention (fused kernels here) with
optional 1-D rotary embeddings over the flattened tokens, PoolFormer pooling, xformers' MLP, and
the final LayerNorm of pre-norm stacks.

What xformers 0.0.28 builds, and so does this (checked against the factory itself, run on CPU;
the facts are recorded in ``tests/xformers028_facts.py``):

- **One position embedding**, on the first stage: ``factory/block_factory.py`` builds the
  ``learnable`` embedding (``components/positional_embedding/param.py``) only in the first layer
  (``layer_position.is_first()``); later stages' ``position_encoding_config`` were not used.
  ``position_embedding_on_every_stage=True`` (:class:`xFormerConfig`, :class:`xFormer`) adds one
  to every stage that has a ``position_encoding_config`` instead (an hfactory option).
- **The same parameters and state-dict keys**: ``model.state_dict()`` uses xformers' names and
  shapes (``encoders.{layer}.patch_emb.1.weight``, ``...pose_encoding.pos_emb`` as ``(1, N, C)``,
  separate ``in_proj_container.{q,k,v}_proj`` tensors, ``wrap_att`` / ``wrap_ff`` wrappers, the
  rotary ``inv_freq`` buffers, the final norm as the last layer's ``wrap_ff.norm``), and
  ``model.load_state_dict`` reads that format (and hfactory's own ``encoder.*`` keys), so
  checkpoints move both ways. ``model.encoder.state_dict()`` has hfactory's native keys. For the
  seed-004 example (xformers' hierarchical tutorial) the parameter count and the state-dict keys
  are exactly xformers 0.0.28's.

Faults of the original that are fixed here:

1. The default ``residual_norm_style`` crashed (``str(ResidualNormStyle.Pre)`` was not a valid
   value); ``"pre"``, ``"post"`` and :class:`ResidualNormStyle` members are all accepted.
2. Unknown keys were dropped (``{"casual": True}`` in an attention dict) and unsupported names
   failed deep inside with ``KeyError``/``TypeError``: here every dict is checked by a pydantic
   model with ``extra="forbid"``.
3. Only square images worked; pass ``img_size=(H, W)`` to :func:`get_hierarchical_configuration`
   (or an ``"img_size"`` key in the first stack config) for non-square ones.
4. Later stages' ``seq_len`` was never checked; here every stage's ``seq_len`` is checked by
   hfactory's plan (a :class:`~hfactory.PlanError`, a ValueError naming ``stages.N.seq_len``, N
   counted from 0 over patch-embedding stages).
5. Bare ``assert``\\ s are errors with messages (e.g. ``dim_head`` not dividing ``embedding``).

Other differences: no leftover ``print``; configs are plain data that building never mutates, and
repeated layers are separate dicts (the original appended one shared dict several times); encoders
only (no decoders, reversible layers, deepnorm, simplicial embeddings or tied embeddings: these
are refused); attention names other than ``scaled_dot_product`` and ``pooling`` are refused (an
hfactory ``token_mixer`` kind such as ``sepconv`` is accepted as well). ``pooling`` stages have no
output projection: xformers 0.0.28 built one in ``MultiHeadDispatch`` but never applied it
(``requires_skip_multi_head``), so their parameter count is ``C * C + C`` per layer lower, and
those keys (and their rotary ``inv_freq``) are skipped when loading an xformers state dict.

Input size: xformers never took an image size; it is derived from stage 0 as
``H = W = sqrt(seq_len) * stride`` unless given. ``seq_len`` values are checked against that build
size. At run time the model also accepts any other size hfactory's plan admits (position
embeddings are bicubically interpolated), e.g. a model built for 224x224 runs on 224x160 images.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Callable, ClassVar, Literal, NamedTuple, Optional, Union

import torch
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from .. import registry
from ..encoder import HierarchicalEncoder
from ..errors import UsageError
from ..layers.feedforward import Mlp
from ..layers.mixers import Attention
from ..plan import Plan, PlanError, resolve
from ..spec.base import StrictModel, did_you_mean, located_error
from ..spec.model import EncoderSpec

__all__ = [
    "BasicLayerConfig", "ResidualNormStyle", "xFormerWeightInit", "get_hierarchical_configuration",
    "xFormerConfig", "xFormer", "init_weights", "ATTENTION_NAMES", "FEEDFORWARD_NAMES", "NORMALIZATION_NAMES",
    "ACTIVATION_NAMES",
]


class ResidualNormStyle(str, Enum):
    """xformers' ``components/residual.py`` ``ResidualNormStyle``: where the norm sits.

    ``Pre``: ``x + f(norm(x))`` and a final norm after the last block; ``Post``:
    ``norm(x + f(x))``. ``DeepNorm`` is listed for completeness and is refused (hfactory has no
    DeepNorm residual scaling).
    """

    Pre = "pre"
    Post = "post"
    DeepNorm = "deepnorm"


class xFormerWeightInit(str, Enum):
    """xformers' ``factory/weight_init.py`` ``xFormerWeightInit``; see :class:`xFormer`."""

    Timm = "timm"
    ViT = "vit"
    Moco = "moco"
    Small = "small"


#: xformers attention names this layer builds -> hfactory ``token_mixer`` kinds.
ATTENTION_NAMES = {"scaled_dot_product": "attention", "pooling": "pooling"}
#: xformers feedforward names -> hfactory ``feedforward`` kinds.
FEEDFORWARD_NAMES = {"MLP": "mlp"}
#: xformers ``normalization`` values -> hfactory ``norm`` kinds.
NORMALIZATION_NAMES = {"layernorm": "layernorm", "skip": "identity"}
#: xformers MLP activations that hfactory has (same names and formulas).
ACTIVATION_NAMES = {name: name for name in ("gelu", "relu", "squared_relu", "star_relu")}

# Registered in xformers 0.0.28 but without an hfactory equivalent: named in errors.
_XFORMERS_ONLY = {
    "attention": {"local", "random", "global", "linformer", "nystrom", "favor", "orthoformer", "lambda",
                  "fourier_mix", "compositional", "visual", "blocksparse"},
    "feedforward": {"Conv2DFeedforward", "MixtureOfExperts", "FusedMLP"},
    "position encoding": {"sine", "vocab"},
    "activation": {"leaky_relu", "smelu"},
}


# ------------------------------------------------------------------------------ value checks
# Each raises a PydanticCustomError; pydantic adds the location (the field it validates).


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}"))


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _component_name(what: str, table: Mapping[str, str], slot: Optional[str]) -> Callable[[Any], str]:
    """A validator of an xformers component name (from ``table``; native hfactory kinds of
    ``slot`` pass too); the error names xformers-only components and lists the supported names."""

    def check(value: Any) -> str:
        name = _enum_value(value)
        native = registry.names(slot) if slot else []
        if isinstance(name, str) and (name in table or name in native):
            return name
        if isinstance(name, str) and name in _XFORMERS_ONLY.get(what, ()):
            why = f"xformers' {name!r} {what} is not supported by hfactory"
        else:
            why = f"unknown {what} {name!r}{did_you_mean(str(name), [*table, *native])}"
        also = f" (hfactory {slot} kinds are accepted too: {', '.join(native)})" if native else ""
        raise _error(f"unknown_{what.replace(' ', '_')}",
                     f"{why}; supported xformers names: {', '.join(sorted(table))}{also}")

    return check


def _residual_norm_style(value: Any) -> str:
    style = _enum_value(value)
    valid = "valid: 'pre', 'post' (or ResidualNormStyle.Pre / ResidualNormStyle.Post)"
    if style in ("pre", "post"):
        return style
    if style == "deepnorm":
        raise _error("residual_norm_style", f"'deepnorm' is not supported by hfactory; {valid}")
    raise _error("residual_norm_style", f"{value!r} is not a valid residual_norm_style; {valid}")


def _weight_init_choice(value: Any) -> str:
    name = _enum_value(value)
    valid = [w.value for w in xFormerWeightInit]
    if name not in valid:
        raise _error("weight_init", f"unknown weight_init {value!r}{did_you_mean(str(name), valid)}; "
                     f"valid: {', '.join(valid)}")
    return name


def _img_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise _error("img_size", f"expected a positive int or (height, width) in pixels, got {value!r}")


def _must_be_false(what: str, advice: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value:
            raise _error("unsupported", f"{what} not supported by hfactory; {advice}")
        return value

    return check


_AttentionName = Annotated[str, BeforeValidator(_component_name("attention", ATTENTION_NAMES, "token_mixer"))]
_FeedforwardName = Annotated[str, BeforeValidator(_component_name("feedforward", FEEDFORWARD_NAMES, "feedforward"))]
_NormalizationName = Annotated[str, BeforeValidator(_component_name("normalization", NORMALIZATION_NAMES, "norm"))]
_ActivationName = Annotated[str, BeforeValidator(_component_name("activation", ACTIVATION_NAMES, None))]
_StyleName = Annotated[str, BeforeValidator(_residual_norm_style)]
_WeightInitName = Annotated[str, BeforeValidator(_weight_init_choice)]
_ImgSize = Annotated[tuple[int, int], BeforeValidator(_img_size)]
_Positive = Annotated[int, Field(ge=1)]
_Rate = Annotated[float, Field(ge=0, lt=1)]


class _XformersModel(StrictModel):
    """A StrictModel whose missing required keys are reported with a hint (``_hints``)."""

    _hints: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _missing_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, hint in cls._hints.items():
                if data.get(key) is None:
                    raise located_error(cls.__name__, (key,), f"missing key {key!r} ({hint})", dict(data),
                                        "missing")
        return data


# ------------------------------------------------------------------------------ the helper


@dataclass
class BasicLayerConfig:
    """One stage of a hierarchical model: xformers' ``BasicLayerConfig`` (same fields and defaults).

    Reproduces xformers 0.0.28's ``xformers/helpers/hierarchical_configs.py``.

    Attributes:
        embedding: stage width in channels.
        attention_mechanism: ``"scaled_dot_product"`` or ``"pooling"`` (see :data:`ATTENTION_NAMES`;
            an hfactory ``token_mixer`` kind is accepted too).
        patch_size, stride, padding: the stage's conv patch embedding (kernel, stride, padding); the
            plan requires it to map ``H`` to exactly ``H / stride``.
        seq_len: tokens after the patch embedding (``H * W / total_stride**2``); checked for every
            stage (the original checked only stage 0, at forward time).
        feedforward: ``"MLP"`` (see :data:`FEEDFORWARD_NAMES`).
        normalization: ``"layernorm"`` or ``"skip"`` (no norm).
        repeat_layer: blocks in the stage.

    An unknown keyword raises ``TypeError`` (dataclass); wrong values are reported by
    :func:`get_hierarchical_configuration`.
    """

    embedding: int
    attention_mechanism: str
    patch_size: int
    stride: int
    padding: int
    seq_len: int
    feedforward: str
    normalization: str = "layernorm"
    repeat_layer: int = 1


class BasicLayerConfigModel(StrictModel):
    """Validates one :class:`BasicLayerConfig` (or a dict of its fields): sizes positive,
    ``padding >= 0``, names among the supported ones (errors at ``layer_base_configs.i.field``)."""

    embedding: _Positive
    attention_mechanism: _AttentionName
    patch_size: _Positive
    stride: _Positive
    padding: int = Field(ge=0)
    seq_len: _Positive
    feedforward: _FeedforwardName
    normalization: _NormalizationName = "layernorm"
    repeat_layer: _Positive = 1

    @model_validator(mode="before")
    @classmethod
    def _fields_of(cls, data: Any) -> Any:
        if isinstance(data, BasicLayerConfig):
            return {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
        if not isinstance(data, Mapping):
            raise _error("basic_layer_config", f"expected a BasicLayerConfig (or a dict of its fields), got "
                         f"{type(data).__name__}")
        return data


class _HierarchicalArgs(StrictModel):
    """The arguments of :func:`get_hierarchical_configuration`."""

    model_config = ConfigDict(title="get_hierarchical_configuration")

    layer_base_configs: list[BasicLayerConfigModel] = Field(min_length=1)
    residual_norm_style: _StyleName
    use_rotary_embeddings: StrictBool
    mlp_multiplier: float = Field(gt=0)
    in_channels: _Positive
    dim_head: Optional[_Positive] = None
    img_size: Optional[_ImgSize] = None

    @model_validator(mode="after")
    def _dim_head_divides(self):
        for i, layer in enumerate(self.layer_base_configs):
            if self.dim_head is not None and layer.embedding % self.dim_head:
                divisors = ", ".join(str(d) for d in range(1, layer.embedding + 1) if layer.embedding % d == 0)
                raise located_error(
                    "get_hierarchical_configuration", ("layer_base_configs", i, "embedding"),
                    f"dim_head {self.dim_head} does not divide embedding {layer.embedding}; use a dim_head "
                    f"dividing every stage's embedding (for {layer.embedding}: {divisors})", layer.embedding)
        return self


def get_hierarchical_configuration(
    layer_base_configs: Sequence[BasicLayerConfig],
    residual_norm_style: Union[str, ResidualNormStyle] = ResidualNormStyle.Pre,
    use_rotary_embeddings: bool = True,
    mlp_multiplier: float = 4,
    in_channels: int = 3,
    dim_head: Optional[int] = None,
    *,
    img_size: Optional[Union[int, tuple[int, int]]] = None,
) -> list[dict[str, Any]]:
    """Expand per-stage :class:`BasicLayerConfig` s into xformers encoder block configs.

    Reproduces ``get_hierarchical_configuration`` of xformers 0.0.28
    (``xformers/helpers/hierarchical_configs.py``): same arguments, defaults and output format:
    per stage one dict with ``block_type``, ``use_triton``, ``residual_norm_style``,
    ``normalization``, ``dim_model``, ``multi_head_config`` (``num_heads``: ``embedding // dim_head``,
    or 1 when ``dim_head`` is None; ``use_rotary_embeddings``; ``attention: {name}``),
    ``feedforward_config`` (gelu, ``hidden_layer_multiplier=mlp_multiplier``, dropout 0),
    ``position_encoding_config`` (``learnable``, ``seq_len``) and ``patch_embedding_config``
    (``in_channels`` = previous stage's embedding), followed by ``repeat_layer - 1`` copies without
    ``patch_embedding_config`` (more blocks of the same stage). As in xformers, every stage gets a
    ``position_encoding_config``; :class:`xFormer` builds only the first stage's (see there).

    Differences: the default ``residual_norm_style`` works (``"pre"``/``"post"`` or the enum);
    ``img_size`` (an int or ``(H, W)``, pixels; hfactory addition) allows non-square images and is
    stored as ``"img_size"`` in the first dict; the whole configuration is validated now (names,
    heads, every stage's ``seq_len``) instead of failing later or never; repeated dicts are
    separate copies; nothing is printed.

    Args:
        layer_base_configs: the stages, in order (:class:`BasicLayerConfig` s or dicts of their fields).
        residual_norm_style: ``"pre"`` (default) or ``"post"``.
        use_rotary_embeddings: rotary embeddings on q and k of every attention stage (1-D, over
            the flattened tokens, as xformers); ignored by ``pooling`` stages, as in xformers.
        mlp_multiplier: MLP hidden width over embedding.
        in_channels: image channels.
        dim_head: channels per attention head; must divide every stage's embedding.
        img_size: image size the model is built for; default ``sqrt(seq_len) * stride`` of stage 0.

    Returns:
        A list of xformers block-config dicts (plain data), for :class:`xFormerConfig`.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) a bad argument or stage field; the location
            is e.g. ``layer_base_configs.1.attention_mechanism`` and the message lists the
            supported values.
        PlanError: (a ``ValueError``) a shape check of the plan, e.g. ``stages.1.seq_len`` when
            stage 1's seq_len does not match its grid; the message names the
            ``layer_base_configs`` entry.
    """
    args = _HierarchicalArgs.model_validate(dict(
        layer_base_configs=layer_base_configs, residual_norm_style=residual_norm_style,
        use_rotary_embeddings=use_rotary_embeddings, mlp_multiplier=mlp_multiplier, in_channels=in_channels,
        dim_head=dim_head, img_size=img_size))

    configs: list[dict[str, Any]] = []
    channels = args.in_channels
    for i, layer in enumerate(args.layer_base_configs):
        block = {
            "block_type": "encoder",
            "use_triton": False,
            "residual_norm_style": args.residual_norm_style,
            "normalization": layer.normalization,
            "dim_model": layer.embedding,
            "multi_head_config": {
                "num_heads": 1 if args.dim_head is None else layer.embedding // args.dim_head,
                "use_rotary_embeddings": args.use_rotary_embeddings,
                "attention": {"name": layer.attention_mechanism},
            },
            "feedforward_config": {
                "name": layer.feedforward,
                "activation": "gelu",
                "hidden_layer_multiplier": mlp_multiplier,
                "dropout": 0.0,
            },
            "position_encoding_config": {"name": "learnable", "seq_len": layer.seq_len, "add_class_token": False},
            "patch_embedding_config": {"in_channels": channels, "kernel_size": layer.patch_size,
                                       "stride": layer.stride, "padding": layer.padding},
        }
        if i == 0 and args.img_size is not None:
            block["img_size"] = list(args.img_size)
        configs.append(block)
        repeat = {k: v for k, v in block.items() if k not in ("patch_embedding_config", "img_size")}
        configs.extend(copy.deepcopy(repeat) for _ in range(layer.repeat_layer - 1))
        channels = layer.embedding

    # Validate now: stage i of the plan is layer_base_configs[i].
    model = _validate_stack(configs)
    spec, _ = _to_spec(model, seq_len_loc=("get_hierarchical_configuration", ("layer_base_configs", 0, "seq_len")))
    _check_plan(spec, lambda i: f"stage {i} is layer_base_configs.{i}")
    return configs


# ------------------------------------------------------------------------------ the block dicts
# Pydantic models of the xformers block dicts, named after the xformers 0.0.28 config classes they
# stand for (so errors read "valid keys of MultiHeadDispatchConfig: ..."); not part of __all__.
# Sources: factory/block_configs.py (xFormerEncoderConfig), components/multi_head_dispatch.py
# (MultiHeadDispatchConfig), components/attention/scaled_dot_product.py (ScaledDotProductConfig),
# components/attention/pooling.py (PoolingAttentionConfig), components/feedforward/mlp.py (MlpConfig),
# components/positional_embedding/param.py (LearnablePositionalEmbeddingConfig),
# components/patch_embedding.py (PatchEmbeddingConfig). Only the fields that apply to an image
# encoder are accepted.


class ScaledDotProductConfig(_XformersModel):
    """``multi_head_config.attention`` named ``scaled_dot_product``: softmax attention over all tokens
    (``dropout`` on the attention weights; ``causal`` must be False)."""

    name: Literal["scaled_dot_product"]
    dropout: Optional[_Rate] = None
    causal: Annotated[Optional[bool], BeforeValidator(_must_be_false(
        "causal attention is", "an image encoder attends both ways; use False"))] = None

    def mixer(self) -> dict:
        return {"kind": "attention", **({"attn_drop": self.dropout} if self.dropout is not None else {})}


class PoolingAttentionConfig(_XformersModel):
    """``multi_head_config.attention`` named ``pooling``: PoolFormer's ``avgpool(x) - x`` over the
    ``(H, W)`` token grid, window ``pool_size`` (default 3), stride 1."""

    name: Literal["pooling"]
    pool_size: Optional[_Positive] = None

    def mixer(self) -> dict:
        return {"kind": "pooling", **({"pool_size": self.pool_size} if self.pool_size is not None else {})}


class _NativeComponent(NamedTuple):
    """An hfactory component kind given by name in an xformers dict, options checked by its params model."""

    kind: str
    options: dict

    def mixer(self) -> dict:
        return {"kind": self.kind, **self.options}


def _dispatch(slot: str, what: str, models: dict[str, type], table: Mapping[str, str]) -> Callable[[Any], Any]:
    """A validator of an xformers component dict: by its ``name``, one of ``models`` or (an
    hfactory kind of ``slot``) that kind's own params model. Errors are located in the dict."""
    check_name = _component_name(what, table, slot)

    def parse(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _error("dict_type", f"expected a dict with a 'name' ({', '.join(sorted(table))}), got "
                         f"{type(value).__name__}")
        if value.get("name") is None:
            raise located_error(what, ("name",), f"missing key 'name'; supported: {', '.join(sorted(table))}",
                                dict(value), "missing")
        try:
            name = check_name(value["name"])
        except PydanticCustomError as err:
            raise located_error(what, ("name",), err.message(), value["name"], err.type) from None
        data = {**value, "name": name}
        if name in models:
            return models[name].model_validate(data)
        options = {k: v for k, v in data.items() if k != "name"}
        registry.get(slot, name).params.model_validate({"kind": name, **options})
        return _NativeComponent(name, options)

    return parse


class MultiHeadDispatchConfig(_XformersModel):
    """``multi_head_config``: the multi-head wrapper around ``attention``.

    ``num_heads`` (required by attentions with heads; it must divide ``dim_model``, checked by the
    plan), ``use_rotary_embeddings`` (1-D rotary on q and k), ``residual_dropout`` (after the
    output projection), ``bias`` (one bool, or ``(q, k, v, out)`` with q, k and v equal: hfactory
    fuses them), ``dim_model`` (if given, the block's). Heads-free attentions (``pooling``) skip
    the wrapper, as in xformers, and ignore these.
    """

    attention: Annotated[Any, BeforeValidator(_dispatch(
        "token_mixer", "attention", {"scaled_dot_product": ScaledDotProductConfig, "pooling": PoolingAttentionConfig},
        ATTENTION_NAMES))]
    num_heads: Optional[_Positive] = None
    use_rotary_embeddings: Optional[StrictBool] = None
    dim_model: Optional[_Positive] = None
    residual_dropout: Optional[_Rate] = None
    bias: Optional[Union[StrictBool, tuple[StrictBool, StrictBool, StrictBool, StrictBool]]] = None

    _hints: ClassVar[dict[str, str]] = {"attention": "a dict with a 'name': " + ", ".join(sorted(ATTENTION_NAMES))}

    @model_validator(mode="after")
    def _applies(self):
        self.settings()  # num_heads present, options supported by the mixer
        return self

    @field_validator("bias")
    @classmethod
    def _one_qkv_bias(cls, bias):
        if isinstance(bias, tuple) and not bias[0] == bias[1] == bias[2]:
            raise _error("bias", f"q, k and v biases must be equal (hfactory has one fused qkv projection), got "
                         f"{bias}")
        return bias

    def settings(self) -> dict:
        """The stage's ``token_mixer`` (and ``num_heads``) in hfactory terms."""
        mixer = self.attention.mixer()
        params = registry.get("token_mixer", mixer["kind"]).params
        if not params.uses_heads:
            # Mixers without heads (pooling) skip the multi-head wrapper, as in xformers: num_heads,
            # use_rotary_embeddings, residual_dropout and bias do not apply to them.
            return {"token_mixer": mixer}
        name = getattr(self.attention, "name", None) or self.attention.kind
        if self.num_heads is None:
            raise located_error("multi_head_config", ("num_heads",),
                                f"missing key 'num_heads' (needed by the {name!r} attention)", None, "missing")
        options = {"use_rotary_embeddings": ("rotary",), "residual_dropout": ("proj_drop",),
                   "bias": ("qkv_bias", "proj_bias")}
        for key, fields in options.items():
            value = getattr(self, key)
            if value is None:
                continue
            if not set(fields) <= set(params.model_fields):
                raise located_error("multi_head_config", (key,), f"not supported by the {name!r} token mixer; "
                                    "leave it out", value, "unsupported")
            if key == "bias":
                mixer["qkv_bias"], mixer["proj_bias"] = (value, value) if isinstance(value, bool) else \
                    (value[0], value[3])
            else:
                mixer[fields[0]] = value
        return {"num_heads": self.num_heads, "token_mixer": mixer}


class MlpConfig(_XformersModel):
    """``feedforward_config`` named ``MLP``: ``Linear(C, m*C)``, activation (default gelu), dropout,
    ``Linear(m*C, C)``, dropout, with ``m = hidden_layer_multiplier``."""

    name: Literal["MLP"]
    activation: Optional[_ActivationName] = None
    hidden_layer_multiplier: Optional[float] = Field(None, gt=0)
    dropout: Optional[_Rate] = None
    bias: Optional[StrictBool] = None
    dim_model: Optional[_Positive] = None

    def feedforward(self) -> dict:
        out: dict[str, Any] = {"kind": "mlp"}
        for key, field in (("activation", "activation"), ("hidden_layer_multiplier", "hidden_layer_multiplier"),
                           ("dropout", "drop"), ("bias", "bias")):
            if getattr(self, key) is not None:
                out[field] = getattr(self, key)
        return out


def _position_name(value: Any) -> str:
    name = _enum_value(value)
    if name == "learnable":
        return name
    why = (f"xformers' {name!r} position encoding has no hfactory equivalent"
           if name in _XFORMERS_ONLY["position encoding"] else f"unknown position encoding {name!r}")
    raise _error("position_encoding", f"{why}; supported: 'learnable' (or no position_encoding_config)")


class LearnablePositionalEmbeddingConfig(_XformersModel):
    """``position_encoding_config``: a learned ``(1, seq_len, C)`` embedding added to the stage's tokens
    (``learnable`` is the only name; no class token). Built for the first stage only unless
    ``position_embedding_on_every_stage``; ``seq_len`` is checked for every stage."""

    name: Annotated[str, BeforeValidator(_position_name)]
    seq_len: _Positive
    add_class_token: Annotated[Optional[bool], BeforeValidator(_must_be_false(
        "class tokens are", "a hierarchical encoder has none; use False"))] = None
    dim_model: Optional[_Positive] = None

    _hints: ClassVar[dict[str, str]] = {"name": "supported: 'learnable'", "seq_len": "tokens in the stage"}


class PatchEmbeddingConfig(_XformersModel):
    """``patch_embedding_config``: ``Conv2d(in_channels, dim_model, kernel_size, stride, padding)``
    from ``(B, in_channels, H, W)`` to ``(B, H/stride * W/stride, dim_model)`` tokens; starts a stage."""

    in_channels: _Positive
    out_channels: Optional[_Positive] = None
    kernel_size: _Positive
    stride: _Positive
    padding: int = Field(0, ge=0)
    pool_type: Annotated[Literal["CONV_2D"], BeforeValidator(_enum_value)] = "CONV_2D"

    _hints: ClassVar[dict[str, str]] = {k: "a positive int" for k in ("in_channels", "kernel_size", "stride")}


def _block_type(value: Any) -> str:
    kind = _enum_value(value)
    if kind == "encoder":
        return kind
    if kind == "decoder":
        raise _error("block_type", "'decoder' is not supported: hfactory builds encoders only; use 'encoder'")
    raise _error("block_type", f"unknown block_type {value!r}; valid: 'encoder'")


class xFormerEncoderConfig(_XformersModel):
    """One encoder block dict of ``stack_configs`` (``num_layers`` blocks of width ``dim_model``).

    ``residual_norm_style`` defaults to ``"post"`` and ``normalization`` to ``"layernorm"``, as in
    xformers. ``use_triton`` and ``layer_position`` are accepted and ignored (no-ops here);
    ``reversible`` and ``simplicial_embeddings`` must be off; ``img_size`` (first dict only) is an
    hfactory addition. Sub-dicts must not give another ``dim_model``.
    """

    block_type: Annotated[str, BeforeValidator(_block_type)]
    dim_model: _Positive
    multi_head_config: MultiHeadDispatchConfig
    feedforward_config: Annotated[Any, BeforeValidator(_dispatch(
        "feedforward", "feedforward", {"MLP": MlpConfig}, FEEDFORWARD_NAMES))]
    position_encoding_config: Optional[LearnablePositionalEmbeddingConfig] = None
    patch_embedding_config: Optional[PatchEmbeddingConfig] = None
    residual_norm_style: _StyleName = "post"  # xformers' xFormerBlockConfig default
    normalization: _NormalizationName = "layernorm"
    num_layers: _Positive = 1
    reversible: Annotated[Optional[bool], BeforeValidator(_must_be_false(
        "reversible layers are", "use False"))] = None
    simplicial_embeddings: Annotated[Any, BeforeValidator(_must_be_false(
        "simplicial embeddings are", "use None"))] = None
    use_triton: Optional[bool] = None
    layer_position: Any = None
    img_size: Optional[_ImgSize] = None

    _hints: ClassVar[dict[str, str]] = {
        "block_type": "use 'encoder'", "dim_model": "the block width",
        "multi_head_config": "a dict with 'num_heads' and 'attention'",
        "feedforward_config": "a dict with a 'name': " + ", ".join(sorted(FEEDFORWARD_NAMES))}

    @model_validator(mode="after")
    def _consistent(self):
        dim = self.dim_model
        for path, value in ((("multi_head_config", "dim_model"), self.multi_head_config.dim_model),
                            (("feedforward_config", "dim_model"), getattr(self.feedforward_config, "dim_model", None)),
                            (("position_encoding_config", "dim_model"),
                             self.position_encoding_config and self.position_encoding_config.dim_model),
                            (("patch_embedding_config", "out_channels"),
                             self.patch_embedding_config and self.patch_embedding_config.out_channels)):
            if value is not None and value != dim:
                raise located_error("block", path, f"{value} differs from the block's dim_model {dim}; use {dim} or "
                                    "leave it out (xformers' embedding projector is not supported)", value)
        if self.patch_embedding_config is not None and self.num_layers != 1:
            raise located_error("block", ("num_layers",), f"{self.num_layers} with a patch_embedding_config: xformers "
                                "re-applied the patch embedding in every layer; use num_layers 1 and follow with "
                                "configs without patch_embedding_config (BasicLayerConfig.repeat_layer does this)",
                                self.num_layers)
        return self

    def settings(self) -> dict:
        """The hfactory stage fields of this block (all but the patch embedding and the depth)."""
        ff = self.feedforward_config
        pos = self.position_encoding_config
        return {
            "embedding": self.dim_model,
            "residual_norm_style": self.residual_norm_style,
            "norm": NORMALIZATION_NAMES.get(self.normalization, self.normalization),
            **self.multi_head_config.settings(),
            "feedforward": ff.feedforward() if isinstance(ff, MlpConfig) else {"kind": ff.kind, **ff.options},
            "pos_embed": "none" if pos is None else "learned",
            **({} if pos is None else {"seq_len": pos.seq_len}),
        }


class _StackConfigs(StrictModel):
    """:class:`xFormerConfig`'s fields; ``stack_configs`` a list (or, in :class:`_StackConfigsDict`, a dict)."""

    model_config = ConfigDict(title="xFormerConfig")

    stack_configs: list[xFormerEncoderConfig] = Field(min_length=1)
    tie_embedding_weights: Annotated[bool, BeforeValidator(_must_be_false(
        "tie_embedding_weights=True is", "it tied encoder and decoder position embeddings, and hfactory "
        "builds encoders only; use False"))] = False
    weight_init: _WeightInitName = "vit"
    position_embedding_on_every_stage: StrictBool = False

    def blocks(self) -> list[tuple[Union[int, str], xFormerEncoderConfig]]:
        return list(enumerate(self.stack_configs))

    @model_validator(mode="after")
    def _stages_chain(self):
        title = type(self).model_config["title"]
        previous: Optional[tuple[Any, xFormerEncoderConfig]] = None  # the block that started the current stage
        for j, (key, block) in enumerate(self.blocks()):
            loc = ("stack_configs", key)
            if block.img_size is not None and j > 0:
                raise located_error(title, (*loc, "img_size"), "only the first block config may give img_size "
                                    "(the image size)", list(block.img_size))
            patch = block.patch_embedding_config
            if patch is None:
                if previous is None:
                    raise located_error(title, (*loc, "patch_embedding_config"), "the first block config needs a "
                                        "patch_embedding_config (image -> tokens)", None, "missing")
                mine, theirs = block.settings(), previous[1].settings()
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                if diff:
                    raise located_error(title, loc, f"has no patch_embedding_config, so it adds blocks to the stage "
                                        f"of stack_configs.{previous[0]}, but differs from it in: {', '.join(diff)}; "
                                        "give it a patch_embedding_config to start a new stage, or match the "
                                        "settings", None, "stage_mismatch")
                continue
            if previous is not None and patch.in_channels != previous[1].dim_model:
                want = previous[1].dim_model
                raise located_error(title, (*loc, "patch_embedding_config", "in_channels"),
                                    f"{patch.in_channels} does not match the previous stage's dim_model {want}; "
                                    f"use {want}", patch.in_channels)
            previous = (key, block)
        return self


class _StackConfigsDict(_StackConfigs):
    """:class:`xFormerConfig` with ``stack_configs`` a dict of block dicts (used in order)."""

    stack_configs: dict[str, xFormerEncoderConfig] = Field(min_length=1)

    def blocks(self) -> list[tuple[Union[int, str], xFormerEncoderConfig]]:
        return list(self.stack_configs.items())


def _validate_stack(stack_configs: Any, **options: Any) -> _StackConfigs:
    """Validate xformers stack configs (a list or dict of block dicts) and the model options.

    Raises:
        pydantic.ValidationError: located (``stack_configs.1.dim_model``), saying what is valid.
    """
    if isinstance(stack_configs, Mapping):
        model: type[_StackConfigs] = _StackConfigsDict
    elif isinstance(stack_configs, Sequence) and not isinstance(stack_configs, (str, bytes)):
        model, stack_configs = _StackConfigs, list(stack_configs)
    else:
        raise located_error("xFormerConfig", ("stack_configs",), "expected a list (or dict) of block config dicts, got "
                            f"{type(stack_configs).__name__}", None, "list_type")
    return model.model_validate({"stack_configs": stack_configs, **options})


def _to_spec(model: _StackConfigs, seq_len_loc: Optional[tuple[str, tuple]] = None) -> tuple[dict, list[str]]:
    """Validated stack configs -> (hfactory spec dict, source of each stage as ``stack_configs.j`` text).

    Stage 0 gets a learned position embedding when its block has a ``position_encoding_config``;
    later stages only with ``position_embedding_on_every_stage`` (xformers 0.0.28 built the first
    layer's only: ``factory/block_factory.py``). Every stage keeps its ``seq_len`` for the plan's check.
    """
    stages: list[dict] = []
    sources: list[list[str]] = []
    img_size = None
    in_chans = None
    last = None
    for key, block in model.blocks():
        settings = block.settings()
        last = settings
        if block.patch_embedding_config is None:  # more blocks of the current stage (checked to match)
            stages[-1]["depth"] += block.num_layers
            sources[-1].append(str(key))
            continue
        patch = block.patch_embedding_config
        if not stages:
            in_chans, img_size = patch.in_channels, block.img_size
        elif not model.position_embedding_on_every_stage:
            settings["pos_embed"] = "none"
        conv = {"kind": "conv", "patch_size": patch.kernel_size, "stride": patch.stride, "padding": patch.padding}
        stages.append({**settings, "downsample": conv, "depth": 1})
        sources.append([str(key)])

    if img_size is None:
        title, loc = seq_len_loc or ("xFormerConfig", ("stack_configs", sources[0][0], "position_encoding_config",
                                                       "seq_len"))
        img_size = _derive_img_size(stages[0], title, loc)
    spec = {
        "name": "xformers_hierarchical",
        "img_size": list(img_size),
        "in_chans": in_chans,
        "num_classes": 0,
        "head_norm_first": True,
        # xformers' pre-norm stacks end with a norm (PostNorm on the last layer); post-norm ones do not.
        "head_norm": last["norm"] if last["residual_norm_style"] == "pre" else "identity",
        "stages": stages,
    }
    return spec, [f"stack_configs.{s[0]}" if len(s) == 1 else f"stack_configs.{s[0]}..{s[-1]}" for s in sources]


def _derive_img_size(stage0: dict, title: str, loc: tuple) -> tuple[int, int]:
    seq_len = stage0.get("seq_len")
    if seq_len is None:
        raise located_error(title, loc, "cannot derive the image size without position_encoding_config.seq_len; "
                            "pass img_size=(H, W) to get_hierarchical_configuration or add an 'img_size' key to the "
                            "first block config", None, "missing")
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise located_error(title, loc, f"{seq_len} is not a square number of tokens, so the (square) image size "
                            "cannot be derived; for a non-square image pass img_size=(H, W) to "
                            "get_hierarchical_configuration (or an 'img_size' key in the first block config)", seq_len)
    size = side * stage0["downsample"]["stride"]
    return size, size


def _check_plan(spec: dict, describe: Callable[[int], str]) -> EncoderSpec:
    """Validate and plan ``spec``; a PlanError keeps its loc and says where the stage came from."""
    try:
        validated = EncoderSpec.model_validate(spec)
        resolve(validated)
        return validated
    except PlanError as err:
        match = re.match(r"stages\.(\d+)", err.loc)
        if match is None:
            raise
        raise PlanError(err.loc, f"{err.message} ({describe(int(match.group(1)))})") from None


# ------------------------------------------------------------------------------ config + model


@dataclass
class xFormerConfig:
    """A full model configuration: xformers' ``xFormerConfig`` (same fields and defaults, plus one option).

    Reproduces xformers 0.0.28's ``xformers/factory/model_factory.py``. ``stack_configs`` is a
    list of encoder block dicts (as :func:`get_hierarchical_configuration` returns) or a dict of
    them (its values, in order); it is deep-copied, so editing the caller's dicts later changes
    nothing. Fields may be reassigned before :meth:`xFormer.from_config` (xformers' MetaFormer
    example sets ``config.weight_init = "moco"``).

    Translation into an hfactory spec (:meth:`to_spec`): a dict with ``patch_embedding_config``
    starts a stage; dicts without one add ``num_layers`` blocks to the previous stage and must
    match its settings. Differences from xformers: every key is checked by a pydantic model
    (``extra="forbid"``: an unknown key or unsupported value is a ``ValidationError`` located at
    e.g. ``stack_configs.1.multi_head_config.attention.casual``, listing the valid choices);
    encoders only, so ``tie_embedding_weights=True``, decoders, ``reversible``, ``deepnorm`` and
    ``simplicial_embeddings`` are refused; ``num_layers > 1`` together with a
    ``patch_embedding_config`` is refused (xformers re-applied the patch embedding in every
    layer); ``use_triton`` and ``layer_position`` are accepted and ignored (no-ops here).

    Attributes:
        stack_configs: the block dicts.
        tie_embedding_weights: must be False (encoders only).
        weight_init: ``"vit"`` (default), ``"timm"``, ``"moco"`` or ``"small"``; see :class:`xFormer`.
        position_embedding_on_every_stage: keyword-only, hfactory option. False (default, as
            xformers): only the first stage gets a learned position embedding, from its
            ``position_encoding_config``; later stages' configs are validated but build none.
            True: every stage with a ``position_encoding_config`` gets its own learned embedding
            ``(1, H_i * W_i, C_i)`` (in xformers' state-dict format) on its grid.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) at construction, for anything :meth:`to_spec` refuses.
        PlanError: (a ``ValueError``) at construction, for a shape check of the plan.
    """

    stack_configs: Union[list[dict[str, Any]], dict[str, dict[str, Any]]]
    tie_embedding_weights: bool = False
    weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT
    position_embedding_on_every_stage: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self):
        self.stack_configs = copy.deepcopy(self.stack_configs)
        self.to_spec()

    def to_spec(self) -> EncoderSpec:
        """The hfactory :class:`~hfactory.EncoderSpec` these configs build (validated and planned).

        Raises:
            pydantic.ValidationError: see the class docstring; :class:`~hfactory.PlanError` for shape checks.
        """
        model = _validate_stack(self.stack_configs, tie_embedding_weights=self.tie_embedding_weights,
                                weight_init=self.weight_init,
                                position_embedding_on_every_stage=self.position_embedding_on_every_stage)
        spec, sources = _to_spec(model)
        return _check_plan(spec, lambda i: f"stage {i} is built from {sources[i]}")


class xFormer(nn.Module):
    """A hierarchical encoder built from xformers block configs: xformers' ``xFormer``.

    Reproduces xformers 0.0.28's ``xformers/factory/model_factory.py``:
    ``xFormer(stack_configs, tie_embedding_weights=False, weight_init="vit")`` and
    ``xFormer.from_config(config)``; ``forward(src)`` maps images ``(B, in_channels, H, W)`` to
    the last stage's tokens ``(B, H/r * W/r, C)`` (``r`` the total stride, ``C`` the last
    embedding), after the final norm of pre-norm stacks.

    The model is an hfactory :class:`~hfactory.HierarchicalEncoder` in ``self.encoder``
    (``self.spec``, ``self.plan``; multi-scale features via ``self.encoder.forward_intermediates``).
    ``self.spec`` is the config's :meth:`xFormerConfig.to_spec`; its ``seq_len`` values refer to
    the build size (``self.plan.img_size``), and other input sizes the plan admits run too.

    Position embeddings: as xformers, only the first stage gets one (``(1, N_0, C_0)``, from its
    ``position_encoding_config``), unless ``position_embedding_on_every_stage=True`` (keyword-only,
    hfactory option; see :class:`xFormerConfig`).

    State dicts: ``state_dict()`` has xformers 0.0.28's keys and shapes (its ``xFormer`` module
    tree: ``encoders.{layer}.{patch_emb.1, pose_encoding.pos_emb, wrap_att..., wrap_ff...}``, q, k
    and v as separate ``in_proj_container`` tensors, the rotary ``inv_freq`` buffers; see the
    module docstring), and ``load_state_dict`` accepts it (and hfactory's native ``encoder.*``
    keys): a checkpoint of xformers' model loads here and the reverse. Parts xformers had no
    equivalent for (hfactory-only token mixers) keep their ``encoder.*`` names. Missing keys
    are reported under hfactory's names (a missing part of a q/k/v triple under xformers' too).

    ``weight_init`` re-initialises it as xformers' ``factory/weight_init.py`` did for these modules:
    ``vit`` (default; xavier-uniform Linears with q, k and v initialised as separate matrices,
    FFN biases N(0, 1e-6), LeCun-normal convs), ``timm`` (Linears truncated-normal std 0.02
    clipped at +-sqrt(3)*0.02, convs PyTorch default), ``moco`` (xavier-uniform Linears, convs
    PyTorch default), ``small`` (Transformer-without-Tears init for attention Linears). Norms are
    ones/zeros and position embeddings N(0, 0.02) in all of them.

    Raises:
        pydantic.ValidationError, PlanError: as :class:`xFormerConfig`.
        ValueError: in ``forward``, when ``tgt`` or a mask is given (not supported), or the input is
            not ``(B, in_channels, H, W)`` of a size the plan admits.
    """

    def __init__(self, stack_configs: Union[dict, list[dict]], tie_embedding_weights: bool = False,
                 weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT, *,
                 position_embedding_on_every_stage: bool = False):
        super().__init__()
        if isinstance(stack_configs, Mapping) and "block_type" in stack_configs:
            stack_configs = [stack_configs]  # xformers: "users can pass a list of configs or a single one"
        spec = xFormerConfig(stack_configs, tie_embedding_weights, weight_init,
                             position_embedding_on_every_stage=position_embedding_on_every_stage).to_spec()
        self.weight_init = xFormerWeightInit(_weight_init_name(weight_init))
        self.encoder = HierarchicalEncoder(spec)
        init_weights(self.encoder, self.weight_init)
        self._xformers_keys = _xformers_key_map(self.encoder)
        hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        hook(_export_xformers_state)

    @classmethod
    def from_config(cls, config: xFormerConfig) -> "xFormer":
        """Build from an :class:`xFormerConfig` (reads its fields now, so later edits are honoured)."""
        return cls(config.stack_configs, config.tie_embedding_weights, config.weight_init,
                   position_embedding_on_every_stage=config.position_embedding_on_every_stage)

    @property
    def spec(self) -> EncoderSpec:
        """The hfactory spec of the model."""
        return self.encoder.spec

    @property
    def plan(self) -> Plan:
        """The resolved plan (grids, ``seq_len``, heads per stage) for the build size."""
        return self.encoder.plan

    def forward(self, src: torch.Tensor, tgt: Optional[torch.Tensor] = None,
                encoder_input_mask: Optional[torch.Tensor] = None,
                decoder_input_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, in_channels, H, W)`` images -> ``(B, H'*W', C)`` tokens of the last stage (row-major
        over the ``H' x W'`` grid)."""
        for name, value in (("tgt", tgt), ("encoder_input_mask", encoder_input_mask),
                            ("decoder_input_mask", decoder_input_mask)):
            if value is not None:
                raise UsageError(f"{name} is not supported: hfactory's xFormer is an image encoder without "
                                 "decoders or input masks; call model(src)")
        return self.encoder.forward_features(src).flatten(2).transpose(1, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Before the children load: xformers' keys become the encoder's (see _import_xformers_state).
        missing_keys.extend(_import_xformers_state(self._xformers_keys, state_dict, prefix))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# ------------------------------------------------------------------------------ xformers' state-dict format


class _KeyEntry(NamedTuple):
    xformers: str  # key in xformers' xFormer (relative to the model)
    native: Optional[str]  # key in this xFormer ("encoder.…"); None for a derived buffer
    op: str  # "same", "q"/"k"/"v" (a third of the fused qkv), "pos" ((1,H,W,C) <-> (1,H*W,C)), "inv_freq"
    arg: Any = None  # "pos": the native shape; "inv_freq": the rotary dimension (channels per head)


def _xformers_key_map(encoder: HierarchicalEncoder) -> tuple[tuple[_KeyEntry, ...], frozenset]:
    """Where each state-dict entry of ``encoder`` sits in xformers 0.0.28's ``xFormer``.

    One xformers layer (``encoders.i``) per hfactory block, numbered over all stages. Module paths
    (``factory/block_factory.py``, ``components/residual.py``, ``components/multi_head_dispatch.py``):
    pre-norm ``wrap_att = Residual(PreNorm(mha))`` -> ``wrap_att.layer.{norm, sublayer}``, and the
    last layer's ``wrap_ff`` wrapped once more in the final ``PostNorm`` (``wrap_ff.norm``,
    ``wrap_ff.sublayer.layer...``); post-norm ``PostNorm(Residual(mha))`` -> ``wrap_att.{norm,
    sublayer.layer}``. The patch embedding is ``Sequential(reshape, Conv2d, to-sequence)``
    (``patch_emb.1``), the MLP ``Sequential(Linear, act, dropout, Linear, dropout)`` (``mlp.0``,
    ``mlp.3``). Entries are in xformers' ``state_dict()`` order.

    Returns:
        The entries, and the xformers keys that are ignored when loading (pooling layers'
        unused output projection and rotary buffer).
    """
    native = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    entries: list[_KeyEntry] = []
    ignored: set[str] = set()
    layers = sum(stage.depth for stage in encoder.plan.stages)

    def add(xf: str, nat: str, op: str = "same", arg: Any = None) -> None:
        if nat in native:
            entries.append(_KeyEntry(xf, nat, op, arg))

    i = 0
    for s, stage in enumerate(encoder.plan.stages):
        pre = stage.residual_norm_style == "pre"
        kind = stage.token_mixer["kind"]
        for b in range(stage.depth):
            last = i == layers - 1
            x, st, blk = f"encoders.{i}.", f"encoder.stages.{s}.", f"encoder.stages.{s}.blocks.{b}."
            if pre:
                att_norm, att = x + "wrap_att.layer.norm.", x + "wrap_att.layer.sublayer."
                ff_wrap = x + ("wrap_ff.sublayer." if last else "wrap_ff.")
                ff_norm, ff = ff_wrap + "layer.norm.", ff_wrap + "layer.sublayer."
            else:
                att_norm, att = x + "wrap_att.norm.", x + "wrap_att.sublayer.layer."
                ff_norm, ff = x + "wrap_ff.norm.", x + "wrap_ff.sublayer.layer."
            if b == 0:
                pos = st + "pos_embed.pos_embed"
                add(x + "pose_encoding.pos_emb", pos, "pos", native.get(pos))
            for t in ("weight", "bias"):
                add(att_norm + t, blk + "norm1." + t)
            if kind == "attention":
                for n in "qkv":
                    for t in ("weight", "bias"):
                        add(f"{att}in_proj_container.{n}_proj.{t}", f"{blk}token_mixer.qkv.{t}", n)
                if stage.token_mixer.get("rotary"):
                    entries.append(_KeyEntry(att + "rotary_embeddings.inv_freq", None, "inv_freq",
                                             stage.out_chs // stage.num_heads))
                for t in ("weight", "bias"):
                    add(f"{att}proj.{t}", f"{blk}token_mixer.proj.{t}")
            elif kind == "pooling":
                ignored.update({att + "proj.weight", att + "proj.bias", att + "rotary_embeddings.inv_freq"})
            if pre and last:
                for t in ("weight", "bias"):
                    add(x + "wrap_ff.norm." + t, "encoder.norm." + t)
            for t in ("weight", "bias"):
                add(ff_norm + t, blk + "norm2." + t)
            for fc, seq in (("fc1", "0"), ("fc2", "3")):
                for t in ("weight", "bias"):
                    add(f"{ff}mlp.{seq}.{t}", f"{blk}mlp.{fc}.{t}")
            if b == 0:
                for t in ("weight", "bias"):
                    add(f"{x}patch_emb.1.{t}", f"{st}downsample.conv.{t}")
            i += 1
    return tuple(entries), frozenset(ignored)


def _rotary_inv_freq(dim: int, like: torch.Tensor) -> torch.Tensor:
    """xformers' ``RotaryEmbedding(dim).inv_freq`` (``components/positional_embedding/rotary.py``)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=like.device).float() / dim))
    return inv_freq.to(like.dtype)


def _export_xformers_state(module: xFormer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: rename (and split / reshape) the encoder's entries into xformers' format."""
    entries, _ = module._xformers_keys
    out = []
    for n, e in enumerate(entries):
        if e.op == "inv_freq":  # a buffer of xformers' RotaryEmbedding, on the attention's device and dtype
            like = state_dict.get(prefix + entries[n + 1].native)  # the next entry: the output projection
            if like is not None:
                out.append((e.xformers, _rotary_inv_freq(e.arg, like)))
            continue
        if prefix + e.native not in state_dict:  # e.g. stages pruned from the encoder after the build
            continue
        value = state_dict[prefix + e.native]
        if e.op in ("q", "k", "v"):
            value = value.chunk(3, dim=0)["qkv".index(e.op)]
        elif e.op == "pos":  # (1, H, W, C) -> (1, H*W, C), row-major as xformers' PatchToSequence
            value = value.reshape(1, -1, value.shape[-1])
        out.append((e.xformers, value))
    for e in entries:
        if e.native is not None:
            state_dict.pop(prefix + e.native, None)
    for key, value in out:
        state_dict[prefix + key] = value


def _import_xformers_state(key_map: tuple, state_dict: dict, prefix: str) -> list[str]:
    """Load-side inverse of :func:`_export_xformers_state`, in place. Keys not in xformers' format
    (hfactory's ``encoder.*``) are left as they are; of an incomplete q/k/v triple the present
    keys are left (``load_state_dict`` reports them as unexpected), and the absent ones returned
    (to be reported as missing)."""
    entries, ignored = key_map
    for key in ignored:
        state_dict.pop(prefix + key, None)
    qkv: dict[str, dict[str, str]] = {}
    for e in entries:
        key = prefix + e.xformers
        if key not in state_dict:
            continue
        if e.op == "inv_freq":  # derived from the head width; hfactory computes it on the fly
            state_dict.pop(key)
        elif e.op in ("q", "k", "v"):
            qkv.setdefault(e.native, {})[e.op] = key
        elif e.op == "pos":
            value = state_dict.pop(key)
            if value.numel() == math.prod(e.arg):
                value = value.reshape(e.arg)
            state_dict[prefix + e.native] = value
        else:
            state_dict[prefix + e.native] = state_dict.pop(key)
    absent = []
    for nat, parts in qkv.items():
        if len(parts) == 3:
            state_dict[prefix + nat] = torch.cat([state_dict.pop(parts[n]) for n in "qkv"], dim=0)
        else:
            absent += [prefix + e.xformers for e in entries if e.native == nat and e.op not in parts]
    return absent


# ------------------------------------------------------------------------------ weight init


def _weight_init_name(value: Any) -> str:
    try:
        return _weight_init_choice(value)
    except PydanticCustomError as err:
        raise UsageError(err.message()) from None


def init_weights(encoder: nn.Module, weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT) -> None:
    """Re-initialise ``encoder``'s Linear and Conv2d weights as xformers 0.0.28's
    ``factory/weight_init.py`` did for the matching xformers modules; see :class:`xFormer`.

    Raises:
        ValueError: unknown ``weight_init`` (the message lists the valid names).
    """
    choice = _weight_init_name(weight_init)
    ffn = {id(m) for mlp in encoder.modules() if isinstance(mlp, Mlp) for m in mlp.modules()}
    qkv = {id(m.qkv) for m in encoder.modules() if isinstance(m, Attention)}
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, choice, is_ffn=id(module) in ffn, chunks=3 if id(module) in qkv else 1)
            elif isinstance(module, nn.Conv2d):
                if choice in ("vit", "small"):
                    _lecun_normal_(module.weight)
                    if module.bias is not None:
                        module.bias.zero_()
                else:  # xformers' timm and moco inits do not touch convs: PyTorch's default
                    module.reset_parameters()


def _init_linear(module: nn.Linear, choice: str, is_ffn: bool, chunks: int) -> None:
    # xformers had separate q, k and v projections; hfactory fuses them, so init each third alone.
    weights = module.weight.chunk(chunks, dim=0)
    if choice == "timm":
        init: Callable = _timm_normal_
    elif is_ffn or choice in ("vit", "moco"):
        init = nn.init.xavier_uniform_  # moco's uniform(+-sqrt(6 / (fan_in + fan_out))) is the same
    else:
        init = _small_init_
    for w in weights:
        init(w)
    if module.bias is not None:
        if is_ffn and choice in ("vit", "small"):
            nn.init.normal_(module.bias, std=1e-6)
        else:
            module.bias.zero_()


def _timm_normal_(w: torch.Tensor) -> None:
    std = 0.02
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-math.sqrt(3.0) * std, b=math.sqrt(3.0) * std)


def _small_init_(w: torch.Tensor) -> None:
    fan_out, fan_in = w.shape
    a = math.sqrt(3.0) * math.sqrt(2.0 / (fan_in + 4 * fan_out))
    nn.init.uniform_(w, -a, a)


def _lecun_normal_(w: torch.Tensor) -> None:
    # As xformers' _lecun_normal: std sqrt(1 / fan_in) / 0.8796 with absolute bounds +-2.
    fan_in = w[0].numel()
    nn.init.trunc_normal_(w, mean=0.0, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978, a=-2.0, b=2.0)
