"""Model kinds: one small table from a spec class to how its model is planned, built, summarised
and loaded. Every model kind (encoder, SFT, masked autoencoder) goes through it, so the CLI,
training and saving dispatch here instead of testing spec classes themselves.

================ ===================== ====================================================== =========
kind             spec class            model                                                   default
================ ===================== ====================================================== =========
``encoder``      ``EncoderSpec``       :class:`~hfactory.encoder.HierarchicalEncoder`          yes
``sft``          ``SFTSpec``           :class:`~hfactory.sft.SFTEncoder`                       yes
``mae``          ``EncoderSpec``       :class:`~hfactory.mae.MaskedAutoencoder` (uses ``mae``) no
================ ===================== ====================================================== =========

A spec's kind is the default kind of its class; a saved directory's kind is the one recorded in
its weights (``model_kind`` of the model class, written by :func:`hfactory.io.save_model_dir`),
else the default kind of its spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from .encoder import HierarchicalEncoder
from .errors import UsageError
from .io import load_model_dir, saved_model_kind
from .mae import MaskedAutoencoder, mae_spec_of
from .plan import resolve
from .sft import SFTEncoder, format_sft_summary, summarize_sft
from .spec.base import did_you_mean
from .spec.io import load_any_spec
from .spec.model import EncoderSpec
from .spec.sft import SFTSpec, resolve_sft
from .summary import format_summary, summarize

__all__ = ["ModelKind", "MODEL_KINDS", "kind_of", "build", "load", "build_model", "load_model",
           "summarize_spec", "format_spec_summary"]


@dataclass(frozen=True)
class ModelKind:
    """One row of the table: ``plan(spec)`` the resolved plan, ``build(spec)`` the model,
    ``summarize(spec, batch)`` the JSON-ready summary, ``format_summary(summary)`` its table;
    ``default`` marks the kind a spec of ``spec_class`` builds when no kind is asked for."""

    name: str
    spec_class: type
    plan: Callable[[Any], Any]
    build: Callable[[Any], nn.Module]
    summarize: Callable[..., dict]
    format_summary: Callable[[dict], str]
    default: bool = True


def _summarize_mae(spec, batch: int = 1) -> dict:
    return summarize(spec, batch=batch)  # the encoder's numbers; the decoder is pretraining-only


MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("encoder", EncoderSpec, resolve, HierarchicalEncoder, summarize, format_summary),
    ModelKind("sft", SFTSpec, resolve_sft, SFTEncoder, summarize_sft, format_sft_summary),
    ModelKind("mae", EncoderSpec, resolve, lambda spec: MaskedAutoencoder(mae_spec_of(spec)), _summarize_mae,
              format_summary, default=False),
)}


def kind_of(spec, kind: Optional[str] = None) -> ModelKind:
    """The :class:`ModelKind` of a validated spec: ``kind`` when given (it must take this spec
    class), else the default kind of the spec's class.

    Raises:
        UsageError: an unknown ``kind``, one that does not take this spec, or an object that is
            not a spec of any kind.
    """
    if kind is not None:
        if kind not in MODEL_KINDS:
            raise UsageError(f"unknown model kind {kind!r}{did_you_mean(kind, MODEL_KINDS)}; "
                             f"valid: {', '.join(MODEL_KINDS)}")
        entry = MODEL_KINDS[kind]
        if not isinstance(spec, entry.spec_class):
            raise UsageError(f"model kind {kind!r} builds from a {entry.spec_class.__name__}, not a "
                             f"{type(spec).__name__}")
        return entry
    for entry in MODEL_KINDS.values():
        if entry.default and isinstance(spec, entry.spec_class):
            return entry
    names = ", ".join(sorted({k.spec_class.__name__ for k in MODEL_KINDS.values()}))
    raise UsageError(f"{type(spec).__name__} is not a spec hfactory builds; expected one of: {names}")


def build(spec: Union[str, os.PathLike, dict, Any], kind: Optional[str] = None, **overrides) -> nn.Module:
    """Validate, plan and build the model of any spec kind.

    Args:
        spec: a path (YAML/JSON), YAML text, a dict, or a validated spec (:class:`EncoderSpec`,
            :class:`~hfactory.spec.sft.SFTSpec`); the document's keys decide its class
            (:func:`hfactory.spec.io.load_any_spec`).
        kind: a model kind of :data:`MODEL_KINDS` (e.g. ``mae`` for the masked autoencoder of an
            encoder spec); default: the spec class's.
        **overrides: top-level spec fields to replace (``num_classes=10``, ``img_size=256``).

    Returns:
        the ``nn.Module`` (randomly initialised), with ``.spec`` and ``.plan``.

    Raises:
        pydantic.ValidationError / PlanError: a bad spec (located); nothing is built then.
        UsageError: an unknown kind, or one that does not take this spec.
    """
    spec = load_any_spec(spec)
    if overrides:
        spec = type(spec).model_validate({**spec.model_dump(mode="json", exclude_none=True), **overrides})
    return kind_of(spec, kind).build(spec)


def load(directory: Union[str, os.PathLike], map_location: str = "cpu") -> nn.Module:
    """Rebuild any model hfactory saved with ``save_pretrained`` (or a training run's model
    directory) and load its weights: the kind is the one the weights record, else the spec's.

    Raises:
        FileNotFoundError: ``spec.yaml`` or ``model.safetensors`` is missing.
        pydantic.ValidationError / PlanError: ``spec.yaml`` is not a valid spec.
        UsageError (a ValueError): the weights were saved for another spec, or do not fit it (the
            missing, unexpected and shape-mismatched keys are named), or an unknown recorded kind.
    """
    recorded = saved_model_kind(directory)

    def build_saved(path):
        spec = load_any_spec(path)
        return kind_of(spec, recorded).build(spec)

    return load_model_dir(directory, build_saved, map_location, "a save_pretrained() directory")


def summarize_spec(spec, batch: int = 1, kind: Optional[str] = None) -> dict:
    """The JSON-ready summary (params, GMACs, activation memory per part) of any spec kind."""
    return kind_of(spec, kind).summarize(spec, batch=batch)


def format_spec_summary(spec, summary: dict, kind: Optional[str] = None) -> str:
    """The printed table of :func:`summarize_spec`'s ``summary`` for ``spec``'s kind."""
    return kind_of(spec, kind).format_summary(summary)


def build_model(spec) -> nn.Module:
    """The model of a validated spec of any kind (:func:`build` without loading or overrides)."""
    return kind_of(spec).build(spec)


def load_model(directory: Union[str, os.PathLike], map_location: str = "cpu") -> nn.Module:
    """The same as :func:`load` (the name training and earlier releases use)."""
    return load(directory, map_location)
