"""The checked-in JSON Schema matches the spec models, and every example validates against it."""

import json
from pathlib import Path

import jsonschema
import pytest

from hfactory.spec.io import load_yaml
from hfactory.spec.schema import SCHEMA_FILE, spec_json_schema, spec_json_schema_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_checked_in_schema_has_not_drifted():
    checked_in = (ROOT / SCHEMA_FILE).read_text()
    assert checked_in == spec_json_schema_text(), (
        f"{SCHEMA_FILE} is stale; regenerate with: hfactory schema --out {SCHEMA_FILE}")


def test_schema_is_valid_and_lists_every_component():
    schema = spec_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(schema)
    for name in ("AttentionParams", "PoolingParams", "SepConvParams", "ConvDownsampleParams", "MlpParams",
                 "LayerNormParams", "GroupNormParams", "LearnedPosEmbedParams"):
        assert name in schema["$defs"], name
    assert "x-hfactory-slot" not in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_schema_and_point_to_it(path):
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../schemas/encoder_spec.schema.json")
    jsonschema.validate(load_yaml(text), spec_json_schema())


def test_schema_rejects_what_the_spec_rejects():
    schema = spec_json_schema()
    for bad in ({"stages": [{"embedding": 8, "casual": 1}]},
                {"stages": [{"embedding": 8, "token_mixer": "poolng"}]},
                {"stages": [{"embedding": 0}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
