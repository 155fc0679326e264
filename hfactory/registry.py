"""Components found by name: slot (what a component does in a stage) -> name -> params + builder.

A component is a pydantic params model (what users write, validated; it also does the
component's own shape arithmetic for the plan) plus a builder that turns resolved numbers into
an ``nn.Module``. Built-in builders are given as ``"module:attribute"`` strings and imported
only when a model is built, so this module, the spec and the plan never import torch.

Users register their own components with :func:`register` and get the same validation,
"did you mean" errors and JSON Schema entries as the built-in ones.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

from .errors import UnknownComponentError, UsageError
from .spec.base import did_you_mean
from .spec.protocol import SLOT_BASES

__all__ = ["SLOTS", "Component", "register", "unregister", "get", "names", "UnknownComponentError"]

#: The places a component can fill, named as the StageSpec fields that hold them.
SLOTS = ("token_mixer", "downsample", "feedforward", "norm", "pos_embed")

Builder = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class Component:
    """One registry entry.

    ``params`` is a subclass of the slot's params base in :mod:`hfactory.spec.protocol`; its
    ``kind`` field is the name. ``builder`` is called with the resolved numbers of the plan
    (the params plus derived values such as ``dim``) and returns an ``nn.Module``.
    """

    slot: str
    name: str
    params: type
    builder: Builder

    def build(self, **resolved: Any):
        builder = self.builder
        if isinstance(builder, str):
            module_name, _, attr = builder.partition(":")
            builder = getattr(importlib.import_module(module_name), attr)
        return builder(**resolved)


_REGISTRY: dict[str, dict[str, Component]] = {slot: {} for slot in SLOTS}


def register(slot: str, name: str, params: type, builder: Builder, *, overwrite: bool = False) -> Component:
    """Register a component under ``slot``/``name``.

    Args:
        slot: one of :data:`SLOTS`.
        name: the value users write as ``kind`` (e.g. ``token_mixer: {kind: my_mixer}``).
        params: a subclass of the slot's params base in :mod:`hfactory.spec.protocol`
            (``TokenMixerParams``, ``DownsampleParams``, ``FeedforwardParams``, ``NormParams``,
            ``PosEmbedParams``) whose ``kind`` field is ``Literal[name]``. What the core needs to
            know about the component (unit locality, description, layouts, ...) is declared on
            it; the base classes give the defaults (see :mod:`hfactory.spec.protocol`).
        builder: callable (or ``"module:attr"`` string) taking the resolved keyword arguments.
        overwrite: allow replacing an existing entry (otherwise a ``ValueError``).

    Raises:
        ValueError: unknown slot, a name already taken, or params that do not fit the slot.
    """
    if slot not in _REGISTRY:
        raise UsageError(f"unknown slot {slot!r}{did_you_mean(slot, SLOTS)}; valid slots: {', '.join(SLOTS)}")
    expected = SLOT_BASES[slot]
    if not (isinstance(params, type) and issubclass(params, expected)):
        raise UsageError(f"params for {slot} {name!r} must subclass hfactory.spec.protocol.{expected.__name__}")
    kind_field = params.model_fields.get("kind")
    if kind_field is None or kind_field.default != name or typing.get_origin(kind_field.annotation) is not Literal \
            or typing.get_args(kind_field.annotation) != (name,):
        raise UsageError(f"params {params.__name__} must declare kind: Literal[{name!r}] = {name!r}")
    if name in _REGISTRY[slot] and not overwrite:
        raise UsageError(f"{slot} {name!r} is already registered; pass overwrite=True to replace it")
    entry = Component(slot, name, params, builder)
    _REGISTRY[slot][name] = entry
    return entry


def unregister(slot: str, name: str) -> Component:
    """Remove and return the entry ``slot``/``name`` (e.g. a component a test or notebook registered).

    Raises:
        UnknownComponentError: no such entry (the registered names are listed).
    """
    entry = get(slot, name)
    del _REGISTRY[slot][name]
    return entry


def get(slot: str, name: str) -> Component:
    """Look up a component; unknown names raise :class:`UnknownComponentError` with a suggestion."""
    if slot not in _REGISTRY:
        raise UsageError(f"unknown slot {slot!r}{did_you_mean(slot, SLOTS)}; valid slots: {', '.join(SLOTS)}")
    try:
        return _REGISTRY[slot][name]
    except KeyError:
        known = sorted(_REGISTRY[slot])
        raise UnknownComponentError(
            f"unknown {slot} {name!r}{did_you_mean(name, known)}; registered: {', '.join(known)}"
        ) from None


def names(slot: str) -> list[str]:
    """Registered names for ``slot``, sorted.

    Raises:
        ValueError: ``slot`` is not a registry slot (the valid ones are named).
    """
    if slot not in _REGISTRY:
        raise UsageError(f"unknown slot {slot!r}{did_you_mean(slot, SLOTS)}; valid slots: {', '.join(SLOTS)}")
    return sorted(_REGISTRY[slot])
