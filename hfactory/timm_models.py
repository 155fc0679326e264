"""hfactory encoders as timm models: the implementation behind :mod:`hfactory.timm`.

Importing this module (users write ``import hfactory.timm``) registers every preset
(:func:`hfactory.presets.list_models`) in timm's model registry as ``hfactory_<preset>``, so that
``timm.create_model("hfactory_caformer_s18", num_classes=10)`` and the libraries that build timm
models by name (segmentation-models-pytorch ``tu-``, transformers ``TimmBackbone`` /
``TimmWrapper``) build hfactory encoders. :func:`register` does the same for a user's spec.

It lives in its own module because timm names a registered model's module by the last component
of the entrypoint's ``__module__``: ``timm.list_models(module="timm_models")`` lists exactly
hfactory's entries (a module named ``hfactory.timm`` would be listed as ``"timm"``).

What timm requires of an external package, and how this module meets it (timm 1.0.31
``timm/models/_registry.py`` ``register_model``, ``_builder.py`` ``build_model_with_cfg``,
``_features.py`` ``FeatureGetterNet``):

- an entrypoint ``fn(pretrained=False, **kwargs)`` per name, registered under ``fn.__name__``;
  the entrypoints are generated in a loop with ``__name__``, ``__qualname__`` and ``__module__``
  set as a decorated function would have them;
- a module-level ``default_cfgs`` (made with ``generate_default_cfgs``) that holds each name's
  pretrained config before the name is registered, so ``timm.list_models(name_matches_cfg=True)``
  lists it and ``build_model_with_cfg`` fills ``num_classes`` / ``in_chans`` from it;
- ``features_only=True`` through timm's ``FeatureGetterNet`` (``forward_intermediates`` /
  ``prune_intermediate_layers``), with every stage by default (``out_indices=range(stages)``);
- unknown keyword arguments raise ``TypeError`` (timm's ``test_models.py`` API contract).

No weights are registered (no ``url`` / ``file`` / ``hf_hub_id``): ``pretrained=True`` raises
timm's ``RuntimeError`` ("No pretrained weights exist ...") unless a source is given, e.g.
``pretrained_cfg_overlay=dict(file="model.safetensors")``. :data:`TIMM_TWINS` names the timm
model whose weights each preset reproduces, for the weight-conversion work.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torch import nn

try:
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import (build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, is_model,
                             model_entrypoint, register_model)
    from timm.layers import register_notrace_module
    from timm.models._features import FeatureGetterNet
    from timm.models._pretrained import PretrainedCfg
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("hfactory.timm registers hfactory encoders in timm's model registry and needs timm "
                      "(pip install 'timm>=1.0')") from err

from .builder import Stage, build_component
from .encoder import HierarchicalEncoder
from .errors import PlanError, UsageError
from .layers.head import make_classifier
from .plan import Plan, resolve
from .presets import list_models as list_presets
from .presets import load_preset
from .spec.io import SpecSource, load_spec
from .spec.model import EncoderSpec

__all__ = ["PREFIX", "TIMM_TWINS", "default_cfgs", "register", "pretrained_cfg_for", "timm_name",
           "registered_models"]

#: Prefix of the timm names of the presets: preset ``caformer_s18`` is ``hfactory_caformer_s18``.
PREFIX = "hfactory_"

#: Preset -> the timm model it reproduces exactly (same architecture and, after weight conversion,
#: the same outputs; tests/test_metaformer.py, test_hiera.py, test_swin.py ... check each). Presets
#: are named as in timm, so a preset whose name is a timm model is that model's twin. The twin's
#: pretrained config gives the preset's preprocessing (mean, std, crop_pct, crop_mode,
#: interpolation), and the pretrained-weights work converts the twin's weights
#: (:mod:`hfactory.convert`). Presets without an entry have no timm twin (HVT; mae_hiera_tiny_224 is
#: the official hiera package's MAE model, whose last stage differs from timm's hiera_tiny_224)
#: and use timm's ImageNet defaults.
TIMM_TWINS: dict[str, str] = {p: p for p in list_presets() if is_model(p)}

#: Preprocessing fields copied from a twin's pretrained config (they describe the data the twin's
#: weights were trained on, which the preset's converted weights expect).
_TWIN_FIELDS = ("mean", "std", "crop_pct", "crop_mode", "interpolation", "test_crop_pct")

#: The keyword arguments an hfactory entrypoint takes besides timm's own (``pretrained``,
#: ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``,
#: ``out_indices``, ``feature_cls``): top-level spec fields and timm's placement arguments.
MODEL_KWARGS = ("num_classes", "in_chans", "global_pool", "img_size", "drop_rate", "drop_path_rate",
                "output_stride", "device", "dtype")

# timm splits "arch.tag" on the first '.', and parse_model_name reads '/', '\' and ':' as a Hub
# repo id, a path or a source prefix (timm 1.0.31 _registry.split_model_name_tag, _factory.py).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")

# The module-level default_cfgs timm's register_model reads (it must hold a name's config before
# the name is registered). Filled below for the presets and by register() for user specs.
default_cfgs: dict = {}
#: name -> the spec its entrypoint builds, for every name this module registered.
_SPECS: dict[str, EncoderSpec] = {}


def timm_name(preset: str) -> str:
    """The timm model name of a preset: ``PREFIX + preset``."""
    return PREFIX + preset


def registered_models() -> list[str]:
    """timm names registered by hfactory (the presets and :func:`register`'s), sorted."""
    return sorted(_SPECS)


# -- pretrained config ----------------------------------------------------------------------------
def _module_paths(plan: Plan) -> tuple[Optional[str], str]:
    """timm's ``first_conv`` and ``classifier`` for ``plan``: module paths in the encoder, read off
    its stem and classifier built alone on the meta device (no memory, no init; building the whole
    encoder for every preset would make ``import hfactory.timm`` slow).

    ``first_conv`` is the layer that reads the image (the one ``in_chans`` adaptation rewrites):
    in stage 0's downsampler ``stages.0.downsample``, the first weight whose input axis has
    ``in_chans`` entries (``stages.0.downsample.conv``); None if there is none. ``classifier`` is
    the layer that makes the logits (the one a pretrained loader drops or resizes for another
    ``num_classes``): the last Linear of the classifier ``head.fc`` (``head.fc``, or
    ``head.fc.fc2`` for an MLP head), built with one class so that it exists.
    """
    with torch.device("meta"):
        stem = build_component("downsample", plan.stages[0].downsample)
        norm = plan.head.get("norm")
        fc = make_classifier(plan.num_features, 1, plan.head, plan.drop_rate,
                             build_component("norm", norm) if norm is not None else None)
    first_conv = next((f"stages.0.downsample.{name}".rsplit(".", 1)[0] for name, p in stem.named_parameters()
                       if name.endswith("weight") and p.ndim >= 2 and p.shape[1] == plan.in_chans), None)
    linears = [name for name, m in fc.named_modules() if isinstance(m, nn.Linear)]
    return first_conv, "head.fc" + (f".{linears[-1]}" if linears[-1] else "")


def _fixed_input_size(spec: EncoderSpec, plan: Plan) -> bool:
    """Whether the plan refuses the sizes next to ``spec.img_size``, so that timm's users and tests
    must feed the config's ``input_size`` (timm's ``fixed_input_size``). Probed at twice the size
    (where every stride, window and mask unit that divides the spec's grid still divides; a
    ``fixed_grid`` downsampler such as ``sp_lin`` or ``att0`` has weights sized for the spec's
    grid and refuses it) and one stride product larger (:func:`hfactory.export.stride_product`; a window that tiles only the spec's grid,
    as MaxViT's 7x7 windows and grids, refuses it; timm marks its ``maxvit_*_tf_224`` fixed too)."""
    from .export import stride_product

    h, w = plan.img_size
    rh, rw = stride_product(spec)
    for size in ((2 * h, 2 * w), (h + rh, w + rw)):
        try:
            resolve(spec, size)
        except PlanError:
            return True
    return False


def pretrained_cfg_for(spec: EncoderSpec, twin: Optional[str] = None, **overrides: Any) -> dict:
    """The timm pretrained config (a dict of ``timm.models.PretrainedCfg`` fields) of ``spec``.

    - ``input_size``: ``(in_chans, H, W)`` from the spec; ``fixed_input_size`` when the plan
      refuses other sizes (:func:`_fixed_input_size`);
    - ``pool_size``: the final grid ``(H/r, W/r)`` of ``forward_features`` (always NCHW). A stage in
      the ``seq`` layout (HVT after its 1-D pooling) has no 2-D grid; ``forward_features`` returns
      its ``N`` tokens as an ``(N, 1)`` map, so ``pool_size`` is ``(N, 1)`` (timm's own sequence
      models, e.g. Hiera, leave it None);
    - ``first_conv`` / ``classifier``: parameter-owning module paths (``stages.0.downsample.conv``,
      ``head.fc`` or ``head.fc.fc2`` for an MLP head; :func:`_module_paths`);
    - ``num_classes``: the spec's;
    - ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation`` (and ``test_crop_pct``): the
      ``twin``'s (a timm model name, see :data:`TIMM_TWINS`), else timm's ImageNet defaults;
    - ``overrides``: any other ``PretrainedCfg`` fields, applied last.

    No weight source is set. Raises ``PlanError`` for a spec that does not resolve, ``TypeError``
    for an override that is not a ``PretrainedCfg`` field, ``ValueError`` for an unknown twin.
    """
    plan = resolve(spec)
    h, w = plan.img_size
    first_conv, classifier = _module_paths(plan)
    cfg = dict(
        input_size=(spec.in_chans, h, w),
        fixed_input_size=_fixed_input_size(spec, plan),
        pool_size=tuple(plan.stages[-1].out_grid),
        first_conv=first_conv,
        classifier=classifier,
        num_classes=spec.num_classes,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        crop_pct=DEFAULT_CROP_PCT,
        crop_mode="center",
        interpolation="bicubic",
    )
    if twin is not None:
        twin_cfg = get_pretrained_cfg(twin)
        if twin_cfg is None:
            raise UsageError(f"twin {twin!r} is not a timm model with a pretrained config; "
                             "give a name that timm.list_models() lists")
        twin_cfg = twin_cfg.to_dict()
        cfg.update({k: twin_cfg[k] for k in _TWIN_FIELDS if twin_cfg.get(k) is not None})
    cfg.update(overrides)
    PretrainedCfg(**cfg)  # TypeError on a field timm does not have
    return cfg


# -- building -------------------------------------------------------------------------------------
def _check_feature_cls(name: str, feature_cls: Any) -> None:
    """hfactory encoders expose features through ``forward_intermediates`` only: timm's getter."""
    ok = (isinstance(feature_cls, str) and feature_cls.lower() == "getter") or (
        isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet))
    if not ok:
        raise UsageError(f"{name}: feature_cls={feature_cls!r} is not supported; hfactory encoders give features "
                         "through forward_intermediates, so the valid value is 'getter' (timm's FeatureGetterNet, "
                         "the default)")


def _encoder_factory(name: str, spec: EncoderSpec) -> Callable[..., HierarchicalEncoder]:
    """The ``model_cls`` handed to ``build_model_with_cfg``: builds ``spec`` with timm's model
    arguments applied as top-level spec fields."""

    def build(num_classes: Optional[int] = None, in_chans: Optional[int] = None, global_pool: Optional[str] = None,
              img_size: Any = None, drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None,
              output_stride: Optional[int] = None, device: Any = None, dtype: Optional[torch.dtype] = None,
              **unknown: Any) -> HierarchicalEncoder:
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"hfactory encoders take {', '.join(MODEL_KWARGS)} (and timm's pretrained, "
                            "pretrained_cfg, pretrained_cfg_overlay, cache_dir, features_only, out_indices, "
                            "feature_cls)")
        overrides = dict(num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
                         img_size=tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size,
                         drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        built = spec
        if overrides:
            built = EncoderSpec.model_validate({**spec.model_dump(mode="json", exclude_none=True), **overrides})
        plan = resolve(built)
        if output_stride is not None:
            natural = plan.stages[-1].reduction
            if output_stride != natural:
                raise UsageError(f"{name}: output_stride={output_stride} is not available; the encoder has no "
                                 f"dilated stages, so its only output stride is the total stride of its "
                                 f"{len(plan.stages)} stages, {natural}: pass output_stride={natural} or leave it "
                                 "unset")
        return HierarchicalEncoder(built, plan, device=device, dtype=dtype)

    return build


def _create(name: str, spec: EncoderSpec, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build timm model ``name`` from ``spec`` through ``build_model_with_cfg`` (pretrained config,
    ``features_only`` wrapping, weight loading when a source is configured)."""
    # Popped always, as timm's own entrypoints do (smp and transformers pass them with features_only).
    out_indices = kwargs.pop("out_indices", tuple(range(len(spec.stages))))
    feature_cls = kwargs.pop("feature_cls", "getter")
    if kwargs.get("features_only"):
        _check_feature_cls(name, feature_cls)
    return build_model_with_cfg(
        _encoder_factory(name, spec), name, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls=feature_cls),
        **kwargs,
    )


def _entrypoint(name: str, spec: EncoderSpec) -> Callable[..., nn.Module]:
    """A timm entrypoint ``name(pretrained=False, **kwargs)`` for ``spec``, named as a decorated
    module-level function would be (timm registers it under ``__name__`` and reads
    ``default_cfgs`` from ``sys.modules[__module__]``)."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, spec, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"hfactory encoder {spec.name or name} as a timm model (see hfactory.timm): "
        f"timm.create_model({name!r}, num_classes=..., in_chans=..., img_size=..., drop_path_rate=..., "
        "global_pool=..., features_only=..., out_indices=..., device=..., dtype=...).")
    return entrypoint


def _register(name: str, spec: EncoderSpec, cfg: dict) -> Callable[..., nn.Module]:
    default_cfgs.update(generate_default_cfgs({name: cfg}))
    _SPECS[name] = spec
    return register_model(_entrypoint(name, spec))


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        bad = sorted({c for c in name if c in "./\\:"}) if isinstance(name, str) else []
        why = (f"contains {' '.join(map(repr, bad))}: timm reads 'arch.tag' at the first '.', and '/', '\\' or ':' "
               "as a Hub repo id, a path or a source prefix" if bad else "is not a model name")
        raise UsageError(f"model name {name!r} {why}; use letters, digits, '_' and '-' (e.g. 'my_encoder')")
    if name in _PRESET_NAMES:
        raise UsageError(f"{name!r} is the timm name of hfactory's preset {name[len(PREFIX):]!r}; choose another name")
    if is_model(name) and name not in _SPECS:
        owner = model_entrypoint(name).__module__
        raise UsageError(f"{name!r} is already a timm model (registered by {owner}); choose another name, "
                         f"e.g. {'my_' + name!r}")


def register(name: str, spec: SpecSource, *, twin: Optional[str] = None,
             pretrained_cfg: Optional[dict] = None) -> Callable[..., nn.Module]:
    """Register ``spec`` in timm's registry as model ``name``, as the presets are.

    Afterwards ``timm.create_model(name, ...)`` builds the encoder with timm's arguments
    (``num_classes``, ``in_chans``, ``img_size``, ``drop_rate``, ``drop_path_rate``,
    ``global_pool``, ``output_stride`` (only the natural one), ``device``, ``dtype``,
    ``features_only`` / ``out_indices``), and ``timm.list_models(name_matches_cfg=True)`` lists it.
    Registering a name again (in the same process) replaces the earlier registration; timm warns
    "Overwriting ...".

    Args:
        name: the timm name: letters, digits, ``_`` and ``-`` (no ``.``, ``/``, ``\\``, ``:``).
        spec: YAML path, YAML text, dict or :class:`EncoderSpec`.
        twin: a timm model whose preprocessing (mean, std, crop, interpolation) the config copies.
        pretrained_cfg: further ``PretrainedCfg`` fields for the config (e.g. ``mean``, ``std``,
            or ``file`` to make ``pretrained=True`` load a local checkpoint).

    Returns:
        The registered entrypoint ``fn(pretrained=False, **kwargs) -> nn.Module``.

    Raises:
        UsageError (a ValueError): a name timm cannot hold, a preset's name, or a name another
            package registered in timm.
        pydantic.ValidationError / PlanError / SpecKindError: ``spec`` is not a buildable encoder spec.
        TypeError: a ``pretrained_cfg`` key that is not a ``PretrainedCfg`` field.
    """
    _check_name(name)
    spec = load_spec(spec)
    cfg = pretrained_cfg_for(spec, twin, **(pretrained_cfg or {}))
    return _register(name, spec, cfg)


# -- FX ------------------------------------------------------------------------------------------
# A stage picks its path from its inputs (grad checkpointing only when they require grad, oneDNN
# dispatch by size, Swin's window geometry and position-embedding resizing by grid size), which
# torch.fx's symbolic tracing cannot follow; timm's FX users (torchvision create_feature_extractor
# with timm.models.get_notrace_modules(), timm's FeatureGraphNet) then keep each stage as one
# call, as timm does for its own modules with data-dependent control flow.
register_notrace_module(Stage)

# -- the presets ----------------------------------------------------------------------------------
_PRESET_NAMES = frozenset(timm_name(p) for p in list_presets())

for _preset in list_presets():
    _spec = load_preset(_preset)
    _register(timm_name(_preset), _spec, pretrained_cfg_for(_spec, TIMM_TWINS.get(_preset)))
del _preset, _spec
