"""Dotted-path changes to a spec's data (``stages.2.depth=9``, ``stages.*.token_mixer.kind``,
``stages.2.blocks.0.at``: a per-block override entry by position):
the engine behind :meth:`hfactory.EncoderSpec.with_changes`, ``--set`` and sweeps.

It works on a spec dumped to JSON-like data and is given the section models by its caller, so it
imports no spec model (the models import it; :mod:`hfactory.spec.variants` builds on both).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

from .. import registry
from ..errors import OverrideError
from .base import did_you_mean

__all__ = ["apply_changes", "record_step"]

_COMPONENT_FIELDS = {"token_mixer": "token_mixer", "downsample": "downsample", "feedforward": "feedforward",
                     "norm": "norm", "pos_embed": "pos_embed", "head_norm": "norm"}


def _component_fields(slot: str, value: Any, path: str) -> set[str]:
    if not isinstance(value, dict) or "kind" not in value:
        raise OverrideError(path, f"no {slot} is set here; set {path} to a component first "
                            f"(e.g. {{kind: {registry.names(slot)[0]}}})")
    params = registry.get(slot, value["kind"]).params
    return set(params.model_fields)


def _positions(key: str, n: int, path: str, not_an_index: str, out_of_range: str) -> range | list[int]:
    """The list positions ``key`` addresses in a list of ``n``: ``*`` (all) or one index
    (negative from the end); the messages say what was expected for this list."""
    if key == "*":
        return range(n)
    try:
        i = int(key)
    except ValueError:
        raise OverrideError(path, not_an_index) from None
    if not -n <= i < n:
        raise OverrideError(path, out_of_range)
    return [i]


def _descend(node: Any, kind: str, tokens: list[str], value: Any, done: str, models: Mapping[str, type],
             inherited: Callable[[dict, str, int], Any], root: dict | None = None) -> None:
    """Set ``value`` at ``tokens`` inside ``node`` (JSON-like data of model ``kind``)."""
    root = node if root is None else root
    key, rest = tokens[0], tokens[1:]
    path = f"{done}.{key}" if done else key
    if kind == "stages":
        targets = _positions(key, len(node), path, "a stage index or '*' was expected",
                             f"no such stage; the spec has {len(node)} (0-{len(node) - 1}) or use '*'")
        if not rest:
            raise OverrideError(path, "name a stage field, e.g. stages.0.depth")
        for i in targets:
            _descend(node[i], "stage", rest, copy.deepcopy(value), f"{done}.{i}" if done else str(i), models, inherited,
                     root)
        return
    if kind.startswith("component:"):
        slot = kind.split(":", 1)[1]
        fields = _component_fields(slot, node, done)
        if key not in fields:
            raise OverrideError(path, f"{node['kind']!r} has no option {key!r}{did_you_mean(key, fields)}; "
                                f"valid: {', '.join(sorted(fields))}")
        if rest:
            if key == "norm":
                sub = node.get(key)
                if isinstance(sub, str):
                    sub = node[key] = {"kind": sub}
                _descend(sub, "component:norm", rest, value, path, models, inherited, root)
                return
            raise OverrideError(path, f"{key!r} is a value, not a mapping")
        if key == "kind":
            # A new kind gets its own defaults: the old kind's options may not exist on it.
            node.clear()
        node[key] = value
        return
    model = models[kind]
    fields = set(model.model_fields)
    if key not in fields:
        raise OverrideError(path, f"unknown key {key!r}{did_you_mean(key, fields)}; valid: {', '.join(sorted(fields))}")
    if not rest:
        node[key] = value
        return
    if key == "stages":
        _descend(node[key], "stages", rest, value, path, models, inherited, root)
    elif key == "blocks" and kind == "stage":
        _descend_block(node.get(key) or [], rest, value, path, models, inherited, root)
    elif key in _COMPONENT_FIELDS:
        sub = node.get(key)
        if sub is None and kind == "stage":
            # Changing an option of a component the stage inherits: the stage gets its own copy.
            sub = inherited(root, key, int(done.rsplit(".", 1)[-1]))
        if isinstance(sub, str):
            sub = {"kind": sub}
        if sub is not None:
            node[key] = sub
        _descend(sub, f"component:{_COMPONENT_FIELDS[key]}", rest, value, path, models, inherited, root)
    elif key in ("defaults", "head", "mae"):  # nested sections; a missing one starts from its defaults
        _descend(node.setdefault(key, {}), key, rest, value, path, models, inherited, root)
    elif key == "lineage":
        raise OverrideError(path, "lineage is recorded by hfactory, not set by hand")
    else:
        raise OverrideError(".".join([path, *rest]), f"{key!r} is a value, not a mapping")


def _descend_block(entries: list, tokens: list[str], value: Any, done: str, models: Mapping[str, type],
                   inherited: Callable[[dict, str, int], Any], root: dict) -> None:
    """``stages.N.blocks.K.<field>``: one of the stage's per-block override entries (a list, so
    addressed by position; ``*`` for all of them). A component inside the entry is changed like a
    stage's (``stages.2.blocks.0.token_mixer.window_size``); the entry must set it already."""
    key, rest = tokens[0], tokens[1:]
    path = f"{done}.{key}"
    if not entries:
        raise OverrideError(path, "the stage has no per-block overrides; set the whole list, e.g. "
                            f"{done}: [{{at: [0], token_mixer: attention}}]")
    targets = _positions(key, len(entries), path, f"an entry index (0-{len(entries) - 1}) or '*' was expected",
                         f"no such entry; the stage has {len(entries)} (0-{len(entries) - 1})")
    if not rest:
        raise OverrideError(path, f"name a field of the entry, e.g. {path}.at")
    for i in targets:
        _descend(entries[i], "block", rest, copy.deepcopy(value), f"{done}.{i}", models, inherited, root)


def apply_changes(data: dict, changes: Mapping[str, Any], models: Mapping[str, type],
                  inherited: Callable[[dict, str, int], Any]) -> dict:
    """Set the values of ``changes`` (``{dotted path: value}``, in order) in ``data``, a spec dumped
    to JSON-like data, and return it (changed in place).

    ``models`` maps the section names ``spec``, ``stage``, ``block``, ``defaults``, ``head`` and ``mae`` to their
    pydantic models (their fields are the valid keys); ``inherited(root, key, stage_index)`` gives
    the component a stage uses for ``key`` when it sets none (the spec's default, else the
    library's), which a change to one of its options copies into the stage.

    Raises:
        OverrideError: a path that matches nothing (names the path and the valid keys).
    """
    for path, value in changes.items():
        tokens = str(path).split(".")
        if not all(tokens):
            raise OverrideError(str(path), "empty path component")
        if any(t != t.strip() for t in tokens):
            raise OverrideError(str(path), "a path component has spaces around it; write e.g. stages.0.depth")
        _descend(data, "spec", tokens, value, "", models, inherited)
    return data


def record_step(data: dict, spec: Any, step: dict) -> None:
    """Append ``step`` to the lineage in ``data`` (a dumped spec derived from ``spec``)."""
    lineage = dict(data.get("lineage") or {})
    lineage.setdefault("base", spec.name)
    lineage["steps"] = [*lineage.get("steps", []), step]
    data["lineage"] = lineage
