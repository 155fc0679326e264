"""JSON Schema of the spec, listing every registered component and its options.

Editors use it to autocomplete and check YAML (``# yaml-language-server: $schema=...``). The
checked-in copy lives in ``schemas/encoder_spec.schema.json``; regenerate it with
``hfactory schema --out schemas/encoder_spec.schema.json`` (a test fails on drift).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from .. import registry
from .model import EncoderSpec

__all__ = ["spec_json_schema", "SCHEMA_FILE"]

SCHEMA_FILE = "schemas/encoder_spec.schema.json"


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :class:`EncoderSpec` with component unions filled in.

    Each component field accepts a registered name (string) or a mapping validated by that
    component's params schema, selected by ``kind``.
    """
    entries = {slot: [registry.get(slot, n) for n in registry.names(slot)] for slot in registry.SLOTS}
    models = [(EncoderSpec, "validation")] + [(c.params, "validation") for es in entries.values() for c in es]
    refs, top = models_json_schema(models, ref_template="#/$defs/{model}")
    defs = top["$defs"]

    def union(slot: str) -> dict:
        comps = entries[slot]
        return {
            "anyOf": [
                {"type": "string", "enum": [c.name for c in comps], "description": f"a registered {slot} name"},
                *[{"$ref": refs[(c.params, "validation")]["$ref"]} for c in comps],
            ]
        }

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            if "x-hfactory-slot" in node:
                return union(node["x-hfactory-slot"])
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    defs = fill(defs)
    root = defs.pop("EncoderSpec")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "hfactory EncoderSpec",
              **root, "$defs": defs}
    return schema


def spec_json_schema_text() -> str:
    """:func:`spec_json_schema` as stable, indented JSON text (what the checked-in file holds)."""
    return json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"
