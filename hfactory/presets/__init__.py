"""Shipped presets: one YAML spec per reproduced architecture, named as in timm.

``list_models()`` lists them, ``load_preset(name)`` returns the validated spec and
``create_model(name, **overrides)`` builds it (timm's ``create_model`` convention);
``create_model(name, pretrained=True)`` loads the preset's timm weights (:func:`timm_weights`,
through :mod:`hfactory.pretrained`).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Optional, Union

from ..errors import UsageError
from ..spec.base import did_you_mean
from ..spec.io import load_spec
from ..spec.model import EncoderSpec

__all__ = ["list_models", "preset_path", "load_preset", "create_model", "resolve_spec_arg", "EXTRA_TIMM_WEIGHTS",
           "timm_weights", "presets_with_weights"]

PRESET_DIR = Path(__file__).resolve().parent

#: Presets whose weights are not published under their own name: preset -> timm weights
#: (``name`` or ``name.tag``). mae_hiera_tiny_224 (the official package's MAE encoder: Hiera-T
#: without q-pooling into its last stage, which has no weights) takes the MAE-pretrained Hiera-T
#: encoder timm publishes as ``hiera_tiny_224.mae`` (no classifier).
EXTRA_TIMM_WEIGHTS: dict[str, str] = {"mae_hiera_tiny_224": "hiera_tiny_224.mae"}


def timm_weights(name: str) -> Optional[str]:
    """The timm weights ``create_model(name, pretrained=True)`` loads into preset ``name``: the
    preset's own name when timm has a model of that name with pretrained weights (presets are named
    as the timm model they reproduce exactly, their twin: :data:`hfactory.timm.TIMM_TWINS`; the
    default tag is timm's, the first of ``timm.list_pretrained(name + ".*")``), else its
    :data:`EXTRA_TIMM_WEIGHTS` entry; None without weights (the hvt_* presets) or without timm."""
    if name in EXTRA_TIMM_WEIGHTS:
        return EXTRA_TIMM_WEIGHTS[name]
    try:
        import timm
        from timm.models import is_model_pretrained
    except ImportError:
        return None
    return name if timm.is_model(name) and is_model_pretrained(name) else None


def presets_with_weights() -> list[str]:
    """Presets that ``create_model(name, pretrained=True)`` can load timm weights into, sorted
    (empty without timm)."""
    return [n for n in list_models() if timm_weights(n) is not None]


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Preset names, sorted; ``pattern`` filters with shell wildcards (``'caformer*'``)."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def preset_path(name: str) -> Path:
    """Path of preset ``name``'s YAML. Raises ``ValueError`` (with a suggestion) if unknown."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = list_models()
        raise UsageError(f"unknown preset {name!r}{did_you_mean(name, known)}; presets: "
                         f"{', '.join(known) or 'none'}")
    return path


def load_preset(name: str) -> EncoderSpec:
    """The validated :class:`EncoderSpec` of preset ``name`` (``list_models()`` lists them).

    Raises:
        ValueError: no preset of that name (the message suggests the closest and lists them).
    """
    return load_spec(preset_path(name))


def resolve_spec_arg(arg: str, loader=None) -> EncoderSpec:
    """A command-line spec argument: a YAML/JSON path (read by ``loader``, default
    :func:`hfactory.load_spec`), or else a preset name.

    Raises:
        as ``loader`` for a path; ValueError for an unknown preset name (the closest are named).
    """
    path = Path(arg)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return (loader or load_spec)(path)
    return load_preset(arg)


def create_model(name: str, pretrained: Union[bool, str, os.PathLike] = False, *,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, **overrides):
    """Build preset ``name`` with top-level spec fields overridden (``num_classes=10``,
    ``img_size=(256, 256)``, ...), like ``timm.create_model``; optionally with pretrained weights.

    Args:
        name: a preset (:func:`list_models`), optionally with a timm weight tag after a dot
            (``caformer_s18.sail_in22k_ft_in1k``: those weights, with ``pretrained=True``).
        pretrained: False (random initialisation); True: the preset's timm weights
            (:func:`timm_weights`), downloaded into and read from timm's cache (the Hugging Face
            cache; with ``HF_HUB_OFFLINE=1`` the cache alone); or a source of
            :mod:`hfactory.pretrained`: a local weights file or directory (timm format, the official
            Hiera package's ``model_state`` checkpoints, an hfactory save), ``hf-hub:org/name``,
            ``timm:<model>[.<tag>]``.
        cache_dir: the download cache of timm / Hub sources (default: the Hugging Face cache).
        **overrides: top-level spec fields. Without ``num_classes`` the model takes the weights'
            class count; with another one, the classifier is reset (new initialisation, a warning
            says so) and everything else is loaded.

    Raises:
        UsageError (a ValueError): no preset of that name (the closest are named); ``pretrained=True``
            for a preset without weights (the presets with weights are named); a tag without
            ``pretrained=True``; weights that do not fit (keys and shapes named; nothing is loaded).
        FileNotFoundError: a missing file, or weights neither in the cache nor downloadable.
        pydantic.ValidationError / PlanError: an override that is not a valid field value or that
            the plan refuses (e.g. an ``img_size`` the strides do not divide), with its location.
    """
    from ..encoder import build_encoder

    arch, _, tag = name.partition(".")
    spec = load_preset(arch)
    if tag and pretrained is not True:
        raise UsageError(f"{name!r}: the tag {tag!r} selects timm weights; pass pretrained=True, or use {arch!r}")
    if pretrained is False or pretrained is None:
        return build_encoder(spec, **overrides)
    from ..pretrained import TIMM_PREFIX, create_pretrained, timm_preprocessing

    weights = timm_weights(arch)
    if pretrained is True:
        if weights is None:
            raise UsageError(f"preset {arch!r} has no pretrained weights; presets with weights (timm's, "
                             f"pretrained=True): {', '.join(presets_with_weights())}. Pass pretrained=PATH for "
                             "weights of your own")
        source = TIMM_PREFIX + (f"{weights.split('.', 1)[0]}.{tag}" if tag else weights)
        return create_pretrained(spec, source, cache_dir=cache_dir, **overrides)
    # a file or a Hub source: the preprocessing of the preset's timm weights, when it has some
    preprocess = timm_preprocessing(weights) if weights is not None else None
    return create_pretrained(spec, os.fspath(pretrained), preprocess=preprocess, cache_dir=cache_dir, **overrides)
