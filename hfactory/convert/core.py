"""Weight conversion into hfactory models: the shared machinery of every family's converter.

A family converter (one module per architecture family) knows how its reference's state-dict
keys map onto an hfactory model built from the family's spec. Mapping is by key pattern, never
by position, using the model's plan (stage depths) where the reference numbers blocks flatly,
so every depth and width variant converts. After mapping, tensors whose size depends on the
input resolution (position embeddings, relative-position bias tables) are resized to the
model's (:mod:`hfactory.convert.resize`), then every key and shape is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import UsageError
from .resize import resize_to_model

__all__ = ["Family", "FAMILIES", "register_family", "convert_state_dict", "mismatch_report"]


@dataclass(frozen=True)
class Family:
    """A reference architecture family.

    ``detect(state_dict)`` says whether a foreign state dict is this family's;
    ``map(state_dict, model)`` returns the renamed / reshaped tensors for ``model``;
    ``spec_from_timm(timm_model)`` returns the spec (dict) of the hfactory twin of a timm model.
    """

    name: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    map: Callable[[Mapping[str, torch.Tensor], nn.Module], dict]
    spec_from_timm: Callable[[nn.Module], dict] | None = None
    timm_class: str | None = None


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    FAMILIES.append(family)
    return family


def mismatch_report(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], limit: int = 10) -> str:
    """A message naming missing, unexpected and shape-mismatched keys (first ``limit`` each), or ''."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Drop wrapper prefixes (``module.`` from DDP, ``model.`` from timm feature wrappers)."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, family: Family | None = None) -> dict:
    """Map a foreign state dict onto ``model`` and check it fits.

    Raises:
        ValueError: no family recognises the keys, or the mapped dict does not fit the model;
            the message names the first mismatching keys and shapes.
    """
    state_dict = _strip_prefixes(state_dict)
    if family is None:
        found = [f for f in FAMILIES if f.detect(state_dict)]
        if not found:
            sample = ", ".join(list(state_dict)[:5])
            raise UsageError(f"no converter recognises this state dict (first keys: {sample}); known families: "
                             f"{', '.join(f.name for f in FAMILIES)}")
        family = found[0]
    mapped = resize_to_model(family.map(state_dict, model), model.state_dict(), model)
    report = mismatch_report(model.state_dict(), mapped)
    if report:
        raise UsageError(f"{family.name} state dict does not fit this model ({getattr(model, 'spec', None) and model.spec.name}); "
                         f"{report}")
    return mapped
