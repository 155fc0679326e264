"""xformers' removed hierarchical factory, rebuilt on hfactory: port code by changing its imports.

Reproduces the public API of ``xformers/helpers/hierarchical_configs.py``
(:class:`BasicLayerConfig`, :func:`get_hierarchical_configuration`) and
``xformers/factory/model_factory.py`` (:class:`xFormerConfig`, :class:`xFormer`), as last present
in xformers commit 6e10bd21 (2024-11-20; the factory was removed in v0.0.29). Field names,
argument names, defaults and the stack-config dict format are kept, so this runs with only its
import lines changed::

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

The stack configs are translated into an hfactory :class:`~hfactory.EncoderSpec` (one hfactory
stage per patch embedding) and built as a :class:`~hfactory.HierarchicalEncoder` (``model.encoder``;
the spec and plan are ``model.spec`` / ``model.plan``). Every block computes what xformers' did:
pre- or post-norm residuals, multi-head scaled-dot-product attention (fused kernels here) with
optional 1-D rotary embeddings over the flattened tokens, PoolFormer pooling, xformers' MLP, and
the final LayerNorm of pre-norm stacks.

Faults of the original that are fixed here (xformers @ 6e10bd21, ``xformers/factory/``):

1. The default ``residual_norm_style`` crashed (``str(ResidualNormStyle.Pre)`` was not a valid
   value); ``"pre"``, ``"post"`` and :class:`ResidualNormStyle` members are all accepted.
2. Unknown keys and unsupported names were dropped or failed deep inside: here they raise
   ``ValueError`` naming the key or name, its location and the valid choices.
3. Only square images worked; pass ``img_size=(H, W)`` to :func:`get_hierarchical_configuration`
   (or an ``"img_size"`` key in the first stack config) for non-square ones.
4. Only the first stage had a position embedding and later stages' ``seq_len`` was never checked;
   here every stage with a ``position_encoding_config`` gets its own learned embedding, and every
   stage's ``seq_len`` is checked by hfactory's plan (a :class:`~hfactory.PlanError`, a ValueError
   naming ``stages.N.seq_len``, N counted from 0 over patch-embedding stages).
5. Bare ``assert``\\ s are ``ValueError``\\ s with messages (e.g. ``dim_head`` not dividing ``embedding``).

Other differences: no leftover ``print``; configs are plain data that building never mutates, and
repeated layers are separate dicts (the original appended one shared dict several times); encoders
only (no decoders, reversible layers, deepnorm, simplicial embeddings or tied embeddings: these
raise ``ValueError``); attention names other than ``scaled_dot_product`` and ``pooling`` raise (an
hfactory ``token_mixer`` kind such as ``sepconv`` is accepted as well).

Input size: xformers never took an image size; it is derived from stage 0 as
``H = W = sqrt(seq_len) * stride`` unless given. ``seq_len`` values are checked against that build
size. At run time the model also accepts any other size hfactory's plan admits (position
embeddings are bicubically interpolated), e.g. a model built for 224x224 runs on 224x160 images;
its ``seq_len`` values refer to the build size (hfactory checks a spec's ``seq_len`` only at its
``img_size``).

Checked against the original (xformers 6e10bd21 run on CPU, weights copied across, stage 2+
position embeddings zeroed): outputs agree to ~1e-5 for pre/post-norm, with and without rotary
embeddings, for ``scaled_dot_product`` and ``pooling`` stages, ``repeat_layer`` and ``skip``
normalization (``tests/test_compat_xformers.py``, opt-in via ``HFACTORY_XFORMERS_SRC``).
Parameter counts differ only by the extra per-stage position embeddings and, for ``pooling``
stages, by xformers' output projection that pooling built but never used.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .. import registry
from ..encoder import HierarchicalEncoder
from ..layers.feedforward import Mlp
from ..layers.mixers import Attention
from ..plan import Plan, PlanError, resolve
from ..spec.base import did_you_mean
from ..spec.model import EncoderSpec

__all__ = [
    "BasicLayerConfig", "ResidualNormStyle", "xFormerWeightInit", "get_hierarchical_configuration",
    "xFormerConfig", "xFormer", "ATTENTION_NAMES", "FEEDFORWARD_NAMES", "NORMALIZATION_NAMES",
    "ACTIVATION_NAMES",
]


class ResidualNormStyle(str, Enum):
    """xformers' ``xformers.components.residual.ResidualNormStyle``: where the norm sits.

    ``Pre``: ``x + f(norm(x))`` and a final norm after the last block; ``Post``:
    ``norm(x + f(x))``. ``DeepNorm`` is listed for completeness and raises ``ValueError``
    (hfactory has no DeepNorm residual scaling).
    """

    Pre = "pre"
    Post = "post"
    DeepNorm = "deepnorm"


class xFormerWeightInit(str, Enum):
    """xformers' ``xformers.factory.weight_init.xFormerWeightInit``; see :class:`xFormer`."""

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

# Registered in xformers (6e10bd21) but without an hfactory equivalent: named in errors.
_XFORMERS_ONLY = {
    "attention": {"local", "random", "global", "linformer", "nystrom", "favor", "orthoformer", "lambda",
                  "fourier_mix", "compositional", "visual", "blocksparse"},
    "feedforward": {"Conv2DFeedforward", "MixtureOfExperts", "FusedMLP"},
    "position encoding": {"sine", "vocab"},
    "activation": {"leaky_relu", "smelu"},
}

_BLOCK_KEYS = {"block_type", "dim_model", "feedforward_config", "position_encoding_config", "residual_norm_style",
               "normalization", "reversible", "num_layers", "layer_position", "use_triton",
               "simplicial_embeddings", "patch_embedding_config", "multi_head_config", "img_size"}
_MHA_KEYS = {"num_heads", "use_rotary_embeddings", "attention", "dim_model", "residual_dropout", "bias"}
_MLP_KEYS = {"name", "activation", "hidden_layer_multiplier", "dropout", "bias", "dim_model"}
_POS_KEYS = {"name", "seq_len", "add_class_token", "dim_model"}
_PATCH_KEYS = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "pool_type"}


# ------------------------------------------------------------------------------ the helper


@dataclass
class BasicLayerConfig:
    """One stage of a hierarchical model: xformers' ``BasicLayerConfig`` (same fields and defaults).

    Reproduces ``xformers/helpers/hierarchical_configs.py`` (commit 6e10bd21, removed in v0.0.29).

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

    Reproduces xformers' ``get_hierarchical_configuration`` (``xformers/helpers/hierarchical_configs.py``,
    commit 6e10bd21, removed in v0.0.29): same arguments, defaults and output format: per stage one
    dict with ``block_type``, ``use_triton``, ``residual_norm_style``, ``normalization``,
    ``dim_model``, ``multi_head_config`` (``num_heads``: ``embedding // dim_head``, or 1 when
    ``dim_head`` is None; ``use_rotary_embeddings``; ``attention: {name}``),
    ``feedforward_config`` (gelu, ``hidden_layer_multiplier=mlp_multiplier``, dropout 0),
    ``position_encoding_config`` (``learnable``, ``seq_len``) and ``patch_embedding_config``
    (``in_channels`` = previous stage's embedding), followed by ``repeat_layer - 1`` copies without
    ``patch_embedding_config`` (more blocks of the same stage).

    Differences: the default ``residual_norm_style`` works (``"pre"``/``"post"`` or the enum);
    ``img_size`` (an int or ``(H, W)``, pixels; hfactory addition) allows non-square images and is
    stored as ``"img_size"`` in the first dict; the whole configuration is validated now (names,
    heads, every stage's ``seq_len``) instead of failing later or never; repeated dicts are
    separate copies; nothing is printed.

    Args:
        layer_base_configs: the stages, in order.
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
        ValueError: a bad argument or stage field (the message names ``layer_base_configs[i].field``),
            an unsupported name (the message lists the supported ones), or a plan check
            (:class:`~hfactory.PlanError`, e.g. ``stages.1.seq_len`` when stage 1's seq_len does not
            match its grid).
    """
    if isinstance(layer_base_configs, (str, bytes, Mapping)) or not isinstance(layer_base_configs, Sequence) \
            or not layer_base_configs:
        raise ValueError("layer_base_configs must be a non-empty list of BasicLayerConfig, got "
                         f"{type(layer_base_configs).__name__}")
    style = _residual_norm_style(residual_norm_style, "residual_norm_style")
    if not isinstance(use_rotary_embeddings, bool):
        raise ValueError(f"use_rotary_embeddings must be True or False, got {use_rotary_embeddings!r}")
    if isinstance(mlp_multiplier, bool) or not isinstance(mlp_multiplier, (int, float)) or mlp_multiplier <= 0:
        raise ValueError(f"mlp_multiplier must be a positive number, got {mlp_multiplier!r}")
    _positive_int(in_channels, "in_channels")
    if dim_head is not None:
        _positive_int(dim_head, "dim_head")
    hw = None if img_size is None else _img_size(img_size, "img_size")

    configs: list[dict[str, Any]] = []
    channels = in_channels
    for i, layer in enumerate(layer_base_configs):
        loc = f"layer_base_configs[{i}]"
        if isinstance(layer, Mapping):
            layer = BasicLayerConfig(**layer)  # TypeError on an unknown key, as the dataclass
        if not isinstance(layer, BasicLayerConfig):
            raise ValueError(f"{loc} must be a BasicLayerConfig, got {type(layer).__name__}")
        for field in ("embedding", "patch_size", "stride", "seq_len", "repeat_layer"):
            _positive_int(getattr(layer, field), f"{loc}.{field}")
        if isinstance(layer.padding, bool) or not isinstance(layer.padding, int) or layer.padding < 0:
            raise ValueError(f"{loc}.padding must be an int >= 0, got {layer.padding!r}")
        # Names are checked here so that the error points at the BasicLayerConfig field.
        _component_kind("attention", layer.attention_mechanism, ATTENTION_NAMES, "token_mixer",
                        f"{loc}.attention_mechanism")
        _component_kind("feedforward", layer.feedforward, FEEDFORWARD_NAMES, "feedforward", f"{loc}.feedforward")
        _component_kind("normalization", layer.normalization, NORMALIZATION_NAMES, "norm", f"{loc}.normalization")
        num_heads = 1
        if dim_head is not None:
            if layer.embedding % dim_head:
                divisors = ", ".join(str(d) for d in range(1, layer.embedding + 1) if layer.embedding % d == 0)
                raise ValueError(f"{loc}.embedding: dim_head {dim_head} does not divide embedding {layer.embedding}; "
                                 f"use a dim_head dividing every stage's embedding (for {layer.embedding}: {divisors})")
            num_heads = layer.embedding // dim_head

        block = {
            "block_type": "encoder",
            "use_triton": False,
            "residual_norm_style": style,
            "normalization": _enum_value(layer.normalization),
            "dim_model": layer.embedding,
            "multi_head_config": {
                "num_heads": num_heads,
                "use_rotary_embeddings": use_rotary_embeddings,
                "attention": {"name": _enum_value(layer.attention_mechanism)},
            },
            "feedforward_config": {
                "name": _enum_value(layer.feedforward),
                "activation": "gelu",
                "hidden_layer_multiplier": mlp_multiplier,
                "dropout": 0.0,
            },
            "position_encoding_config": {"name": "learnable", "seq_len": layer.seq_len, "add_class_token": False},
            "patch_embedding_config": {"in_channels": channels, "kernel_size": layer.patch_size,
                                       "stride": layer.stride, "padding": layer.padding},
        }
        if i == 0 and hw is not None:
            block["img_size"] = list(hw)
        configs.append(block)
        repeat = {k: v for k, v in block.items() if k not in ("patch_embedding_config", "img_size")}
        configs.extend(copy.deepcopy(repeat) for _ in range(layer.repeat_layer - 1))
        channels = layer.embedding

    # Validate now: stage i of the plan is layer_base_configs[i].
    spec, _ = _stack_to_spec(configs)
    _check_plan(spec, lambda i: f"stage {i} is layer_base_configs[{i}]")
    return configs


# ------------------------------------------------------------------------------ config + model


@dataclass
class xFormerConfig:
    """A full model configuration: xformers' ``xFormerConfig`` (same fields and defaults).

    Reproduces ``xformers/factory/model_factory.py`` (commit 6e10bd21, removed in v0.0.29).
    ``stack_configs`` is a list of encoder block dicts (as :func:`get_hierarchical_configuration`
    returns) or a dict of them (its values, in order); it is deep-copied, so editing the caller's
    dicts later changes nothing. Fields may be reassigned before :meth:`xFormer.from_config`
    (xformers' MetaFormer example sets ``config.weight_init = "moco"``).

    Translation into an hfactory spec (:meth:`to_spec`): a dict with ``patch_embedding_config``
    starts a stage; dicts without one add ``num_layers`` blocks to the previous stage and must
    match its settings. Differences from xformers: every key is checked (an unknown key or
    unsupported value raises ``ValueError`` naming ``stack_configs[j].key`` and the valid
    choices); encoders only, so ``tie_embedding_weights=True``, decoders, ``reversible``,
    ``deepnorm`` and ``simplicial_embeddings`` raise ``ValueError``; ``num_layers > 1`` together
    with a ``patch_embedding_config`` raises (xformers re-applied the patch embedding in every
    layer); ``use_triton`` and ``layer_position`` are accepted and ignored (no-ops here).

    Raises:
        ValueError: at construction, for anything :meth:`to_spec` refuses.
    """

    stack_configs: Union[list[dict[str, Any]], dict[str, dict[str, Any]]]
    tie_embedding_weights: bool = False
    weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT

    def __post_init__(self):
        self.stack_configs = copy.deepcopy(self.stack_configs)
        self.to_spec()

    def to_spec(self) -> EncoderSpec:
        """The hfactory :class:`~hfactory.EncoderSpec` these configs build (validated and planned).

        Raises:
            ValueError: see the class docstring; :class:`~hfactory.PlanError` for shape checks.
        """
        _weight_init_name(self.weight_init)
        if self.tie_embedding_weights:
            raise ValueError("tie_embedding_weights=True is not supported: it tied encoder and decoder "
                             "position embeddings, and hfactory builds encoders only; use False")
        spec, sources = _stack_to_spec(self.stack_configs)
        return _check_plan(spec, lambda i: f"stage {i} is built from stack_configs[{sources[i]}]")


class xFormer(nn.Module):
    """A hierarchical encoder built from xformers block configs: xformers' ``xFormer``.

    Reproduces ``xformers/factory/model_factory.py`` (commit 6e10bd21, removed in v0.0.29):
    ``xFormer(stack_configs, tie_embedding_weights=False, weight_init="vit")`` and
    ``xFormer.from_config(config)``; ``forward(src)`` maps images ``(B, in_channels, H, W)`` to
    the last stage's tokens ``(B, H/r * W/r, C)`` (``r`` the total stride, ``C`` the last
    embedding), after the final norm of pre-norm stacks.

    The model is an hfactory :class:`~hfactory.HierarchicalEncoder` in ``self.encoder``
    (``self.spec``, ``self.plan``; multi-scale features via ``self.encoder.forward_intermediates``).
    ``self.spec`` is the config's :meth:`xFormerConfig.to_spec`; its ``seq_len`` values refer to
    the build size (``self.plan.img_size``), and other input sizes the plan admits run too.
    ``weight_init`` re-initialises it as xformers' ``weight_init.py`` did for these modules:
    ``vit`` (default; xavier-uniform Linears with q, k and v initialised as separate matrices,
    FFN biases N(0, 1e-6), LeCun-normal convs), ``timm`` (Linears truncated-normal std 0.02
    clipped at +-sqrt(3)*0.02, convs PyTorch default), ``moco`` (xavier-uniform Linears, convs
    PyTorch default), ``small`` (Transformer-without-Tears init for attention Linears). Norms are
    ones/zeros and position embeddings N(0, 0.02) in all of them.

    Differences: see the module docstring (encoders only, per-stage position embeddings and
    ``seq_len`` checks, non-square images, ValueErrors instead of asserts).

    Raises:
        ValueError: as :class:`xFormerConfig`; in ``forward``, when ``tgt`` or a mask is given
            (not supported), or the input is not ``(B, in_channels, H, W)`` of a size the plan
            admits.
    """

    def __init__(self, stack_configs: Union[dict, list[dict]], tie_embedding_weights: bool = False,
                 weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT):
        super().__init__()
        if isinstance(stack_configs, Mapping) and "block_type" in stack_configs:
            stack_configs = [stack_configs]  # xformers: "users can pass a list of configs or a single one"
        spec = xFormerConfig(stack_configs, tie_embedding_weights, weight_init).to_spec()
        self.weight_init = xFormerWeightInit(_weight_init_name(weight_init))
        self.encoder = HierarchicalEncoder(spec)
        init_weights(self.encoder, self.weight_init)

    @classmethod
    def from_config(cls, config: xFormerConfig) -> "xFormer":
        """Build from an :class:`xFormerConfig` (reads its fields now, so later edits are honoured)."""
        return cls(config.stack_configs, config.tie_embedding_weights, config.weight_init)

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
                raise ValueError(f"{name} is not supported: hfactory's xFormer is an image encoder without "
                                 "decoders or input masks; call model(src)")
        return self.encoder.forward_features(src).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------ weight init


def init_weights(encoder: nn.Module, weight_init: Union[str, xFormerWeightInit] = xFormerWeightInit.ViT) -> None:
    """Re-initialise ``encoder``'s Linear and Conv2d weights as xformers' ``weight_init.py``
    (commit 6e10bd21) did for the matching xformers modules; see :class:`xFormer`.

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


# ------------------------------------------------------------------------------ translation


def _stack_to_spec(stack_configs: Any) -> tuple[dict, list[str]]:
    """xformers block dicts -> (hfactory spec dict, source of each stage as text)."""
    if isinstance(stack_configs, Mapping):
        if "block_type" in stack_configs:
            items = [("0", stack_configs)]
        else:
            items = [(repr(k), v) for k, v in stack_configs.items()]
    elif isinstance(stack_configs, Sequence) and not isinstance(stack_configs, (str, bytes)):
        items = [(str(j), v) for j, v in enumerate(stack_configs)]
    else:
        raise ValueError(f"stack_configs must be a list (or dict) of block config dicts, got "
                         f"{type(stack_configs).__name__}")
    if not items:
        raise ValueError("stack_configs is empty; give at least one encoder block config")

    stages: list[dict] = []
    settings: list[dict] = []
    sources: list[list[str]] = []
    img_size = None
    in_chans = None
    for j, (key, cfg) in enumerate(items):
        loc = f"stack_configs[{key}]"
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{loc} must be a dict (an xformers block config), got {type(cfg).__name__}")
        _check_keys(cfg, _BLOCK_KEYS, loc)
        if "block_type" not in cfg:
            raise ValueError(f"{loc}: missing key 'block_type'; use 'encoder'")
        if _enum_value(cfg["block_type"]) != "encoder":
            raise ValueError(f"{loc}.block_type {cfg['block_type']!r} is not supported: hfactory builds encoders "
                             "only; use 'encoder'")
        if cfg.get("reversible"):
            raise ValueError(f"{loc}.reversible: reversible layers are not supported; use False")
        if cfg.get("simplicial_embeddings") is not None:
            raise ValueError(f"{loc}.simplicial_embeddings are not supported; use None")
        num_layers = cfg.get("num_layers", 1)
        _positive_int(num_layers, f"{loc}.num_layers")
        if "img_size" in cfg and j > 0:
            raise ValueError(f"{loc}.img_size: only the first block config may give img_size (the image size)")

        block = _block_settings(cfg, loc)
        patch = cfg.get("patch_embedding_config")
        if patch is None:
            if not stages:
                raise ValueError(f"{loc}: the first block config needs a patch_embedding_config (image -> tokens)")
            diff = sorted(k for k in set(block) | set(settings[-1]) if block.get(k) != settings[-1].get(k))
            if diff:
                raise ValueError(f"{loc} has no patch_embedding_config, so it adds blocks to the stage of "
                                 f"stack_configs[{sources[-1][0]}], but differs from it in: {', '.join(diff)}; "
                                 "give it a patch_embedding_config to start a new stage, or match the settings")
            stages[-1]["depth"] += num_layers
            sources[-1].append(key)
            continue
        if num_layers != 1:
            raise ValueError(f"{loc}.num_layers {num_layers} with a patch_embedding_config: xformers re-applied the "
                             "patch embedding in every layer; use num_layers 1 and follow with configs without "
                             "patch_embedding_config (BasicLayerConfig.repeat_layer does this)")
        downsample, chans = _patch_embedding(patch, f"{loc}.patch_embedding_config", block["embedding"],
                                             stages[-1]["embedding"] if stages else None)
        if not stages:
            in_chans = chans
            if "img_size" in cfg:
                img_size = _img_size(cfg["img_size"], f"{loc}.img_size")
        stage = {**block, "downsample": downsample, "depth": 1}
        stages.append(stage)
        settings.append(block)
        sources.append([key])

    if img_size is None:
        img_size = _derive_img_size(stages[0], sources[0][0])
    last = settings[-1]
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
    return spec, [", ".join(s) if len(s) == 1 else f"{s[0]}..{s[-1]}" for s in sources]


def _block_settings(cfg: Mapping, loc: str) -> dict:
    """The hfactory stage fields of one xformers block dict (everything but the patch embedding)."""
    if "dim_model" not in cfg:
        raise ValueError(f"{loc}: missing key 'dim_model' (the block width)")
    dim = cfg["dim_model"]
    _positive_int(dim, f"{loc}.dim_model")
    out: dict[str, Any] = {
        "embedding": dim,
        # xformers' xFormerBlockConfig default is "post".
        "residual_norm_style": _residual_norm_style(cfg.get("residual_norm_style", "post"),
                                                    f"{loc}.residual_norm_style"),
        "norm": _component_kind("normalization", cfg.get("normalization", "layernorm"), NORMALIZATION_NAMES,
                                "norm", f"{loc}.normalization"),
    }

    mha = _sub_config(cfg, "multi_head_config", loc)
    mloc = f"{loc}.multi_head_config"
    _check_keys(mha, _MHA_KEYS, mloc)
    _same_dim(mha, dim, mloc)
    att = _sub_config(mha, "attention", mloc)
    aloc = f"{mloc}.attention"
    if "name" not in att:
        raise ValueError(f"{aloc}: missing key 'name'; supported: {', '.join(sorted(ATTENTION_NAMES))}")
    name = _enum_value(att["name"])
    kind = _component_kind("attention", name, ATTENTION_NAMES, "token_mixer", f"{aloc}.name")
    if name == "scaled_dot_product":
        _check_keys(att, {"name", "dropout", "causal"}, aloc)
        if att.get("causal"):
            raise ValueError(f"{aloc}.causal: causal attention is not supported in an image encoder; use False")
        mixer: dict[str, Any] = {"kind": kind}
        if att.get("dropout") is not None:
            mixer["attn_drop"] = att["dropout"]
    elif name == "pooling":
        _check_keys(att, {"name", "pool_size"}, aloc)
        mixer = {"kind": kind, **({"pool_size": att["pool_size"]} if att.get("pool_size") is not None else {})}
    else:  # an hfactory token_mixer kind: its own options, validated by hfactory
        mixer = {"kind": kind, **{k: v for k, v in att.items() if k != "name"}}

    params = registry.get("token_mixer", kind).params
    if params.uses_heads:
        if mha.get("num_heads") is None:
            raise ValueError(f"{mloc}: missing key 'num_heads' (needed by the {name!r} attention)")
        out["num_heads"] = mha["num_heads"]
        options = {"use_rotary_embeddings": "rotary", "residual_dropout": "proj_drop"}
        for key, field in options.items():
            if mha.get(key) is not None:
                if field not in params.model_fields:
                    raise ValueError(f"{mloc}.{key} is not supported by the {name!r} token mixer")
                mixer[field] = mha[key]
        if mha.get("bias") is not None:
            if not {"qkv_bias", "proj_bias"} <= set(params.model_fields):
                raise ValueError(f"{mloc}.bias is not supported by the {name!r} token mixer")
            mixer["qkv_bias"], mixer["proj_bias"] = _attention_bias(mha["bias"], f"{mloc}.bias")
    # Mixers without heads (pooling) skip the multi-head wrapper, as in xformers: num_heads,
    # use_rotary_embeddings, residual_dropout and bias do not apply to them.
    out["token_mixer"] = mixer

    ff = _sub_config(cfg, "feedforward_config", loc)
    floc = f"{loc}.feedforward_config"
    if "name" not in ff:
        raise ValueError(f"{floc}: missing key 'name'; supported: {', '.join(sorted(FEEDFORWARD_NAMES))}")
    ff_name = _enum_value(ff["name"])
    ff_kind = _component_kind("feedforward", ff_name, FEEDFORWARD_NAMES, "feedforward", f"{floc}.name")
    if ff_name == "MLP":
        _check_keys(ff, _MLP_KEYS, floc)
        _same_dim(ff, dim, floc)
        feedforward: dict[str, Any] = {"kind": ff_kind}
        if ff.get("activation") is not None:
            feedforward["activation"] = _component_kind("activation", ff["activation"], ACTIVATION_NAMES, None,
                                                        f"{floc}.activation")
        for key, field in (("hidden_layer_multiplier", "hidden_layer_multiplier"), ("dropout", "drop"),
                           ("bias", "bias")):
            if ff.get(key) is not None:
                feedforward[field] = ff[key]
    else:
        feedforward = {"kind": ff_kind, **{k: v for k, v in ff.items() if k != "name"}}
    out["feedforward"] = feedforward

    pos = cfg.get("position_encoding_config")
    ploc = f"{loc}.position_encoding_config"
    if pos is None:
        out["pos_embed"] = "none"
    else:
        if not isinstance(pos, Mapping):
            raise ValueError(f"{ploc} must be a dict or None, got {type(pos).__name__}")
        _check_keys(pos, _POS_KEYS, ploc)
        _same_dim(pos, dim, ploc)
        pos_name = _enum_value(pos.get("name"))
        if pos_name != "learnable":
            why = (f"xformers' {pos_name!r} position encoding has no hfactory equivalent"
                   if pos_name in _XFORMERS_ONLY["position encoding"] else f"unknown position encoding {pos_name!r}")
            raise ValueError(f"{ploc}.name: {why}; supported: 'learnable' (or no position_encoding_config)")
        if pos.get("add_class_token"):
            raise ValueError(f"{ploc}.add_class_token: class tokens are not supported in a hierarchical "
                             "encoder; use False")
        if pos.get("seq_len") is None:
            raise ValueError(f"{ploc}: missing key 'seq_len' (tokens in the stage)")
        out["pos_embed"] = "learned"
        out["seq_len"] = pos["seq_len"]
    return out


def _patch_embedding(patch: Any, loc: str, dim: int, prev_dim: Optional[int]) -> tuple[dict, int]:
    """xformers ``patch_embedding_config`` -> (hfactory conv downsample, in_channels)."""
    if not isinstance(patch, Mapping):
        raise ValueError(f"{loc} must be a dict, got {type(patch).__name__}")
    _check_keys(patch, _PATCH_KEYS, loc)
    for key in ("in_channels", "kernel_size", "stride"):
        if key not in patch:
            raise ValueError(f"{loc}: missing key {key!r}")
        _positive_int(patch[key], f"{loc}.{key}")
    in_channels = patch["in_channels"]
    if prev_dim is not None and in_channels != prev_dim:
        raise ValueError(f"{loc}.in_channels {in_channels} does not match the previous stage's dim_model "
                         f"{prev_dim}; use {prev_dim}")
    if patch.get("out_channels") is not None and patch["out_channels"] != dim:
        raise ValueError(f"{loc}.out_channels {patch['out_channels']} differs from dim_model {dim}; use {dim} "
                         "or leave it out")
    pool_type = _enum_value(patch.get("pool_type", "CONV_2D"))
    if pool_type != "CONV_2D":
        raise ValueError(f"{loc}.pool_type {pool_type!r} is not supported; valid: 'CONV_2D'")
    padding = patch.get("padding", 0)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{loc}.padding must be an int >= 0, got {padding!r}")
    conv = {"kind": "conv", "patch_size": patch["kernel_size"], "stride": patch["stride"], "padding": padding}
    return conv, in_channels


def _derive_img_size(stage0: dict, source: str) -> tuple[int, int]:
    seq_len = stage0.get("seq_len")
    loc = f"stack_configs[{source}]"
    if seq_len is None:
        raise ValueError(f"{loc}: cannot derive the image size without position_encoding_config.seq_len; pass "
                         "img_size=(H, W) to get_hierarchical_configuration or add an 'img_size' key to the first "
                         "block config")
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"{loc}.position_encoding_config.seq_len {seq_len} is not a square number of tokens, so "
                         "the (square) image size cannot be derived; for a non-square image pass img_size=(H, W) "
                         "to get_hierarchical_configuration (or an 'img_size' key in the first block config)")
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


# ------------------------------------------------------------------------------ small checks


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _residual_norm_style(value: Any, loc: str) -> str:
    style = _enum_value(value)
    if style in ("pre", "post"):
        return style
    if style == "deepnorm":
        raise ValueError(f"{loc}: 'deepnorm' is not supported by hfactory; valid: 'pre', 'post' "
                         "(or ResidualNormStyle.Pre / ResidualNormStyle.Post)")
    raise ValueError(f"{loc}: {value!r} is not a valid residual_norm_style; valid: 'pre', 'post' "
                     "(or ResidualNormStyle.Pre / ResidualNormStyle.Post)")


def _weight_init_name(value: Any) -> str:
    name = _enum_value(value)
    valid = [w.value for w in xFormerWeightInit]
    if name not in valid:
        raise ValueError(f"unknown weight_init {value!r}{did_you_mean(str(name), valid)}; valid: {', '.join(valid)}")
    return name


def _component_kind(what: str, name: Any, table: Mapping[str, str], slot: Optional[str], loc: str) -> str:
    """The hfactory kind for an xformers component name; native hfactory kinds of ``slot`` pass."""
    name = _enum_value(name)
    native = registry.names(slot) if slot else []
    if isinstance(name, str):
        if name in table:
            return table[name]
        if name in native:
            return name
    if isinstance(name, str) and name in _XFORMERS_ONLY.get(what, ()):
        why = f"xformers' {name!r} {what} is not supported by hfactory"
    else:
        why = f"unknown {what} {name!r}{did_you_mean(str(name), [*table, *native])}"
    also = f" (hfactory {slot} kinds are accepted too: {', '.join(native)})" if native else ""
    raise ValueError(f"{loc}: {why}; supported xformers names: {', '.join(sorted(table))}{also}")


def _check_keys(config: Mapping, allowed: set[str], loc: str) -> None:
    for key in config:
        if key not in allowed:
            raise ValueError(f"{loc}: unknown key {key!r}{did_you_mean(str(key), allowed)}; valid keys: "
                             f"{', '.join(sorted(allowed))}")


def _sub_config(config: Mapping, key: str, loc: str) -> Mapping:
    if config.get(key) is None:
        raise ValueError(f"{loc}: missing key {key!r}")
    value = config[key]
    if not isinstance(value, Mapping):
        raise ValueError(f"{loc}.{key} must be a dict, got {type(value).__name__}")
    return value


def _same_dim(config: Mapping, dim: int, loc: str) -> None:
    if config.get("dim_model") is not None and config["dim_model"] != dim:
        raise ValueError(f"{loc}.dim_model {config['dim_model']} differs from the block's dim_model {dim}; "
                         f"use {dim} or leave it out (xformers' embedding projector is not supported)")


def _attention_bias(bias: Any, loc: str) -> tuple[bool, bool]:
    """xformers' (q, k, v, out) projection biases (or one bool) -> (qkv_bias, proj_bias)."""
    if isinstance(bias, bool):
        return bias, bias
    if isinstance(bias, Sequence) and len(bias) == 4 and all(isinstance(b, bool) for b in bias):
        if not bias[0] == bias[1] == bias[2]:
            raise ValueError(f"{loc} {tuple(bias)}: q, k and v biases must be equal (one fused qkv projection)")
        return bias[0], bias[3]
    raise ValueError(f"{loc} must be a bool or 4 bools (q, k, v, out), got {bias!r}")


def _positive_int(value: Any, loc: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{loc} must be a positive int, got {value!r}")


def _img_size(value: Any, loc: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{loc} must be a positive int or (height, width) in pixels, got {value!r}")
