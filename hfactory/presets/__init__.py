"""Shipped presets: one YAML spec per reproduced architecture, named as in timm.

``list_models()`` lists them, ``load_preset(name)`` returns the validated spec and
``create_model(name, **overrides)`` builds it (timm's ``create_model`` convention).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from ..spec.base import did_you_mean
from ..spec.io import load_spec
from ..spec.model import EncoderSpec

__all__ = ["list_models", "preset_path", "load_preset", "create_model", "resolve_spec_arg"]

PRESET_DIR = Path(__file__).resolve().parent


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


def create_model(name: str, **overrides):
    """Build preset ``name`` with top-level spec fields overridden (``num_classes=10``,
    ``img_size=(256, 256)``, ...), like ``timm.create_model`` without weights.

    Raises:
        ValueError: no preset of that name (the message suggests the closest and lists them).
        pydantic.ValidationError / PlanError: an override that is not a valid field value or that
            the plan refuses (e.g. an ``img_size`` the strides do not divide), with its location.
    """
    from ..encoder import build_encoder

    return build_encoder(load_preset(name), **overrides)
