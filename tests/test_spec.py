"""Spec validation: located errors, aliases, round trips, safe YAML, user components."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

import hfactory
from hfactory import EncoderSpec, dump_spec, load_spec, registry
from hfactory.spec.components import ComponentParams, TokenMixerParams

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def errors_of(source) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        load_spec(source)
    return info.value.errors()


def locs(errs) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in errs]


def test_unknown_key_is_located_and_lists_valid_keys():
    errs = errors_of({"stages": [{"embedding": 64}, {"embedding": 128, "casual": True}]})
    assert locs(errs) == ["stages.1.casual"]
    assert "valid keys of StageSpec" in errs[0]["msg"] and "token_mixer" in errs[0]["msg"]


def test_unknown_option_of_a_component_suggests_the_right_one():
    errs = errors_of({"stages": [{"embedding": 64, "token_mixer": {"kind": "pooling", "pool_sz": 3}}]})
    assert locs(errs) == ["stages.0.token_mixer.pool_sz"]
    assert "did you mean 'pool_size'" in errs[0]["msg"]


def test_unknown_component_name_gets_did_you_mean_and_the_registered_names():
    errs = errors_of({"stages": [{"embedding": 64, "token_mixer": "poolng"}]})
    assert locs(errs) == ["stages.0.token_mixer.kind"]
    assert "did you mean 'pooling'" in errs[0]["msg"]
    for name in registry.names("token_mixer"):
        assert name in errs[0]["msg"]


def test_unknown_top_level_key():
    errs = errors_of({"stages": [{"embedding": 8}], "num_clases": 10})
    assert locs(errs) == ["num_clases"] and "did you mean 'num_classes'" in errs[0]["msg"]


@pytest.mark.parametrize("stage,loc", [
    ({"embedding": 0}, "stages.0.embedding"),
    ({"embedding": -3}, "stages.0.embedding"),
    ({"embedding": "wide"}, "stages.0.embedding"),
    ({"embedding": 8, "depth": 0}, "stages.0.depth"),
    ({"embedding": 8, "num_heads": 0}, "stages.0.num_heads"),
    ({"embedding": 8, "patch_size": 0}, "stages.0.downsample.patch_size"),
    ({"embedding": 8, "downsample": {"kind": "conv", "patch_size": 4, "stride": -1}}, "stages.0.downsample.stride"),
    ({"embedding": 8, "residual_norm_style": "sandwich"}, "stages.0.residual_norm_style"),
    ({"embedding": 8, "feedforward": {"kind": "mlp", "activation": "swish"}}, "stages.0.feedforward.activation"),
    ({"embedding": 8, "token_mixer": 3}, "stages.0.token_mixer"),
    ({"embedding": 8, "token_mixer": {"pool_size": 3}}, "stages.0.token_mixer"),
])
def test_bad_field_values_are_located(stage, loc):
    errs = errors_of({"stages": [stage]})
    assert loc in locs(errs)


def test_bad_model_level_values():
    assert "img_size" in locs(errors_of({"img_size": 0, "stages": [{"embedding": 8}]}))
    assert "img_size" in locs(errors_of({"img_size": [224, -1], "stages": [{"embedding": 8}]}))
    assert "stages" in locs(errors_of({"stages": []}))
    assert "drop_path_rate" in locs(errors_of({"drop_path_rate": 1.5, "stages": [{"embedding": 8}]}))


def test_booleans_are_refused_where_numbers_go_and_taken_where_a_field_allows_them():
    """pydantic's lax mode reads true as 1: `depth: true` would build one block."""
    for stage, loc, word in [({"embedding": 8, "depth": True}, "stages.0.depth", "true"),
                             ({"embedding": False}, "stages.0.embedding", "false"),
                             ({"embedding": 8, "token_mixer": {"kind": "pooling", "pool_size": True}},
                              "stages.0.token_mixer.pool_size", "true")]:
        errs = errors_of({"stages": [stage]})
        assert [e["msg"] for e in errs if ".".join(map(str, e["loc"])) == loc] == [
            f"expected a number, got the boolean {word}"]
    assert "img_size" in locs(errors_of({"img_size": True, "stages": [{"embedding": 8}]}))
    spec = load_spec({"head_norm_first": True, "stages": [{"embedding": 8, "layer_scale": False,
                                                           "token_mixer": {"kind": "attention", "qkv_bias": False}}]})
    assert spec.head_norm_first is True and spec.stages[0].layer_scale is False


def test_xformers_aliases_and_patch_shorthand():
    spec = load_spec({"stages": [{"embedding": 64, "repeat_layer": 3, "attention_mechanism": "pooling",
                                  "normalization": "groupnorm", "patch_size": 4}]})
    stage = spec.stages[0]
    assert stage.depth == 3 and stage.token_mixer.kind == "pooling" and stage.norm.kind == "groupnorm"
    assert stage.downsample.kind == "conv" and stage.downsample.patch_size == 4 and stage.downsample.stride is None


def test_patch_shorthand_conflicts_with_downsample():
    errs = errors_of({"stages": [{"embedding": 8, "patch_size": 4, "downsample": "none"}]})
    assert locs(errs) == ["stages.0"] and "not both" in errs[0]["msg"]


def test_layer_scale_false_or_positive():
    assert load_spec({"stages": [{"embedding": 8, "layer_scale": False}]}).stages[0].layer_scale is False
    assert "stages.0.layer_scale" in locs(errors_of({"stages": [{"embedding": 8, "layer_scale": -1.0}]}))
    assert "stages.0.layer_scale" in locs(errors_of({"stages": [{"embedding": 8, "layer_scale": True}]}))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_yaml_round_trip_of_examples(path):
    spec = load_spec(path)
    assert load_spec(dump_spec(spec)) == spec
    assert load_spec(spec.model_dump(mode="json")) == spec


def test_round_trip_keeps_every_set_option():
    text = textwrap.dedent("""
        img_size: [256, 192]
        in_chans: 1
        defaults: {norm: {kind: layernorm, eps: 1.0e-6, bias: false}, layer_scale: 1.0e-5}
        stages:
          - {embedding: 32, downsample: {kind: conv, patch_size: 4, norm: {kind: layernorm}}}
          - {embedding: 64, token_mixer: {kind: attention, qkv_bias: false, rotary: true}, num_heads: 2}
    """)
    spec = load_spec(text)
    again = load_spec(dump_spec(spec))
    assert again == spec
    assert again.defaults.norm.eps == 1e-6 and again.stages[1].token_mixer.qkv_bias is False
    assert again.stages[0].downsample.norm.kind == "layernorm"


def test_python_example_equals_yaml_example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import poolformer_s12
    finally:
        sys.path.pop(0)
    assert poolformer_s12.spec == load_spec(EXAMPLES / "poolformer_s12.yaml")


@pytest.mark.parametrize("text,needle", [
    ("!!python/object/apply:os.system ['echo pwned']", "python/object"),
    ("stages: !!python/name:os.system", "python/name"),
    ("stages: [{embedding: 8}]\nstages: [{embedding: 9}]", "duplicate key 'stages'"),
    ("a: &x [1, 2]\nb: *x", "aliases"),
    ("stages: [{embedding: 8}", "invalid spec YAML"),
    ("- 1\n- 2", "must be a mapping"),
])
def test_hostile_or_malformed_yaml_is_refused(text, needle, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError) as info:
        load_spec(text.replace("echo pwned", f"touch {marker}"))
    assert needle in str(info.value)
    assert not marker.exists()


def test_billion_laughs_is_refused_quickly():
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    with pytest.raises(ValueError, match="aliases"):
        load_spec("\n".join(lines))


def test_oversized_document_is_refused():
    with pytest.raises(ValueError, match="refused"):
        load_spec("name: " + "x" * 2_000_000)


def test_missing_spec_file():
    with pytest.raises(FileNotFoundError):
        load_spec("does/not/exist.yaml")


def test_spec_and_plan_do_not_import_torch():
    code = textwrap.dedent("""
        import sys, hfactory
        spec = hfactory.load_spec({"stages": [{"embedding": 64}, {"embedding": 128}]})
        print(hfactory.resolve(spec))
        hfactory.dump_spec(spec)
        from hfactory.spec.schema import spec_json_schema
        spec_json_schema()
        assert "torch" not in sys.modules, "spec/plan imported torch"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


class _ScaledIdentity(TokenMixerParams):
    kind: str = "scaled_identity"
    factor: float = 1.0


def test_user_registered_component_gets_the_same_validation_and_builds():
    import torch
    from pydantic import Field
    from torch import nn
    from typing import Literal

    class ScaledIdentityParams(TokenMixerParams):
        kind: Literal["scaled_identity"] = "scaled_identity"
        factor: float = Field(1.0, gt=0)

    class ScaledIdentity(nn.Module):
        def __init__(self, dim, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    registry.register("token_mixer", "scaled_identity", ScaledIdentityParams, ScaledIdentity, overwrite=True)
    try:
        errs = errors_of({"stages": [{"embedding": 8, "token_mixer": {"kind": "scaled_identity", "factr": 2}}]})
        assert "did you mean 'factor'" in errs[0]["msg"]
        assert locs(errors_of({"stages": [{"embedding": 8, "token_mixer": {"kind": "scaled_identity",
                                                                            "factor": -1}}]})) == \
            ["stages.0.token_mixer.factor"]
        model = hfactory.build_encoder({"img_size": 32, "num_classes": 3, "stages": [
            {"embedding": 8, "token_mixer": {"kind": "scaled_identity", "factor": 0.5}}]})
        assert isinstance(model.stages[0].blocks[0].token_mixer, ScaledIdentity)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        from hfactory.spec.schema import spec_json_schema_text
        assert "ScaledIdentityParams" in spec_json_schema_text()
    finally:
        registry._REGISTRY["token_mixer"].pop("scaled_identity", None)


def test_register_refuses_bad_entries():
    with pytest.raises(ValueError, match="unknown slot"):
        registry.register("mixer", "x", TokenMixerParams, lambda **k: None)
    with pytest.raises(ValueError, match="must subclass"):
        registry.register("token_mixer", "x", ComponentParams, lambda **k: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("token_mixer", "pooling", registry.get("token_mixer", "pooling").params, lambda **k: None)
    with pytest.raises(ValueError, match="Literal"):
        registry.register("token_mixer", "scaled_identity", _ScaledIdentity, lambda **k: None)


def test_encoder_spec_in_python():
    spec = EncoderSpec(stages=[{"embedding": 32, "token_mixer": "pooling"}], img_size=(64, 32))
    assert spec.img_hw == (64, 32)


def test_unknown_registry_slot_is_named():
    from hfactory import registry

    with pytest.raises(ValueError, match=r"unknown slot 'mixer' \(did you mean 'token_mixer'\?\); valid slots"):
        registry.names("mixer")
