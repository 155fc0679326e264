"""Saving and loading models with their spec, and the spec hash that ties weights to a spec.

A saved model is a directory with ``spec.yaml`` (the spec, :func:`hfactory.spec.io.dump_spec`) and
``model.safetensors`` (the state dict, with the spec's hash and the model kind as metadata), the
same for every model kind (encoder, SFT, masked autoencoder). :func:`load_checked` is the one
strict loader: it resizes resolution-dependent tables first and names every mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

from pydantic import BaseModel, TypeAdapter
from torch import nn

from .atomic import atomic_path
from .errors import UsageError
from .spec.io import dump_spec

__all__ = ["WEIGHTS_NAME", "SPEC_NAME", "spec_hash", "spec_hashes", "save_model_dir", "load_model_dir",
           "saved_model_kind", "load_checked"]

WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "spec.yaml"
#: safetensors metadata key naming the model kind (``encoder``, ``sft``, ``mae``; see hfactory.models)
KIND_KEY = "hfactory_kind"


def spec_hash(spec) -> str:
    """SHA-256 (hex, first 16 chars) of the spec's canonical JSON: every field that differs from
    its default, components always with their ``kind``, keys sorted.

    Fields left at their defaults do not enter the hash, so a later hfactory whose spec models gain
    a field (with a default that keeps the old behaviour) still accepts the weights and
    checkpoints saved before it; writing a default value out explicitly does not change the hash
    either. Any non-default value does (architecture, lineage, name).
    """
    text = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: StageSpec / StageDefaults fields that the first hash format (full dump) did not have.
_STAGE_FIELDS_AFTER_FIRST_FORMAT = ("blocks", "out_norm")


def spec_hashes(spec) -> set[str]:
    """The hashes saved files may carry for ``spec``: :func:`spec_hash`, and the one hfactory
    wrote before it hashed only non-default fields: SHA-256 of the full JSON dump, with a
    ``lineage`` in its first format (``base``, one merged ``changes``, one ``rule``), which a
    lineage read from such a file converts back to."""
    from pydantic_core import to_json

    legacy = spec.model_dump()
    # stage fields added after that format existed are absent from its dump when left unset
    for part in [legacy.get("defaults") or {}, *(legacy.get("stages") or [])]:
        for key in _STAGE_FIELDS_AFTER_FIRST_FORMAT:
            if key in part and part[key] is None:
                del part[key]
    lineage = getattr(spec, "lineage", None)
    if lineage is not None:
        changes = [s.changes for s in lineage.steps if s.changes is not None]
        rules = [s.rule for s in lineage.steps if s.rule is not None]
        if len(changes) <= 1 and len(rules) <= 1:
            legacy["lineage"] = {"base": lineage.base, "changes": changes[0] if changes else {},
                                 "rule": rules[0] if rules else None}
    return {spec_hash(spec), hashlib.sha256(to_json(legacy)).hexdigest()[:16]}


def _canonical(value):
    """JSON-ready value of a spec part with default-valued fields left out (``kind`` kept)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if name == "kind" or field.is_required() or item != field.get_default(call_default_factory=True):
                out[name] = _canonical(item)
        return out
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return TypeAdapter(type(value)).dump_python(value, mode="json")  # enums and the like


def save_model_dir(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """``model.spec`` as ``spec.yaml`` and its weights as ``model.safetensors`` (with the spec's
    hash as metadata) in ``directory``, each written atomically; shared by every model class with a
    ``spec``. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"spec_hash": spec_hash(model.spec), "format": "pt"}
    kind = getattr(type(model), "model_kind", None)  # set by hfactory's model classes; a subclass may not
    if kind:
        metadata[KIND_KEY] = kind
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    with atomic_path(directory / SPEC_NAME) as tmp:
        tmp.write_text(dump_spec(model.spec), encoding="utf-8")
    return directory


def saved_model_kind(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The model kind recorded in ``directory``'s weights (None for files saved before kinds were
    recorded, or by other tools).

    Raises:
        FileNotFoundError: ``model.safetensors`` is missing.
    """
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a save_pretrained() directory")
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(KIND_KEY)


def load_model_dir(directory: Union[str, os.PathLike], build: Callable[[Path], nn.Module], map_location: str,
                   expected: str) -> nn.Module:
    """The model ``build(directory / "spec.yaml")`` with the weights of ``model.safetensors``,
    after checking that they were saved for that spec (the ``spec_hash`` metadata, when present).

    Raises:
        FileNotFoundError: a file is missing (``expected`` says what the directory should be).
        UsageError (a ValueError): the weights were saved for another spec, or they do not fit it
            (keys named).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (SPEC_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; expected {expected}")
    model = build(directory / SPEC_NAME)
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        saved = (f.metadata() or {}).get("spec_hash")
    if saved is not None and saved not in spec_hashes(model.spec):
        raise UsageError(f"{directory / WEIGHTS_NAME} was saved for spec hash {saved}, but {directory / SPEC_NAME} "
                         f"hashes to {spec_hash(model.spec)}: the spec was changed after saving; restore it, or "
                         "build the new spec and load the weights with load_checked to convert deliberately")
    load_checked(model, load_file(str(directory / WEIGHTS_NAME), device=map_location),
                 source=str(directory / WEIGHTS_NAME))
    return model


def load_checked(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """``load_state_dict(strict=True)`` that first resizes resolution-dependent tensors (position
    embeddings, relative-position tables) and lists every key and shape mismatch.

    Raises:
        UsageError (a ValueError): naming up to 10 missing, unexpected and shape-mismatched keys each.
    """
    from .convert.core import mismatch_report
    from .convert.resize import resize_to_model

    state = resize_to_model(state, model.state_dict(), model)
    report = mismatch_report(model.state_dict(), state)
    if report:
        raise UsageError(f"{source} does not fit this model's spec; {report}")
    model.load_state_dict(state, strict=True)
