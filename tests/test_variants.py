"""Variants: overrides by path, scaling rules reproducing the named sizes, lineage (issue 8)."""

import pytest
import torch
from pydantic import ValidationError

import hfactory
from hfactory import PlanError
from hfactory.encoder import HierarchicalEncoder
from hfactory.spec.variants import OverrideError, ScalingRule, parse_assignment, scale

timm = pytest.importorskip("timm")


def test_overrides_by_path_and_star():
    base = hfactory.load_preset("caformer_s18")
    spec = base.with_changes({"stages.2.depth": 5, "stages.*.feedforward.hidden_layer_multiplier": 3,
                              "drop_path_rate": 0.2, "defaults.norm.eps": 1e-5})
    plan = hfactory.resolve(spec)
    assert [s.depth for s in plan.stages] == [3, 3, 5, 3]
    assert all(s.feedforward["hidden_features"] == 3 * s.out_chs for s in plan.stages)
    assert spec.drop_path_rate == 0.2 and spec.defaults.norm.eps == 1e-5
    assert base.stages[2].depth == 9  # the base is unchanged


def test_changing_a_component_kind_replaces_its_options():
    spec = hfactory.load_preset("caformer_s18").with_changes({"stages.*.token_mixer.kind": "pooling"})
    assert {s.token_mixer["kind"] for s in hfactory.resolve(spec).stages} == {"pooling"}


@pytest.mark.parametrize("changes,path,needle", [
    ({"stages.7.depth": 1}, "stages.7", "the spec has 4"),
    ({"stages.0.depht": 1}, "stages.0.depht", "did you mean 'depth'"),
    ({"stages.x.depth": 1}, "stages.x", "stage index"),
    ({"num_clases": 3}, "num_clases", "did you mean 'num_classes'"),
    ({"stages.0.token_mixer.pool_size": 3}, "stages.0.token_mixer.pool_size", "'sepconv' has no option"),
    ({"drop_path_rate.x": 1}, "drop_path_rate.x", "not a mapping"),
])
def test_paths_that_match_nothing_are_named(changes, path, needle):
    with pytest.raises(OverrideError) as info:
        hfactory.load_preset("caformer_s18").with_changes(changes)
    assert info.value.path == path and needle in str(info.value)


def test_wrong_types_and_plan_breaking_changes_fail_like_a_hand_written_spec():
    base = hfactory.load_preset("caformer_s18")
    with pytest.raises(ValidationError) as info:
        base.with_changes({"stages.1.depth": "deep"})
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == ["stages.1.depth"]
    with pytest.raises(PlanError) as err:
        hfactory.resolve(base.with_changes({"stages.2.num_heads": 7}))
    assert err.value.loc == "stages.2.num_heads"


def test_lineage_is_recorded_and_survives_yaml():
    spec = hfactory.load_preset("poolformer_s12").with_changes({"stages.3.depth": 4})
    again = hfactory.load_spec(hfactory.dump_spec(spec))
    assert again.lineage.base == "poolformer_s12" and again.lineage.changes == {"stages.3.depth": 4}
    scaled = scale(again, {"depth_multiplier": 2})
    assert scaled.lineage.changes == {"stages.3.depth": 4} and scaled.lineage.rule["depth_multiplier"] == 2


def test_parse_assignment():
    assert parse_assignment("stages.2.depth=9") == ("stages.2.depth", 9)
    assert parse_assignment("defaults.layer_scale=1e-5") == ("defaults.layer_scale", 1e-5)
    assert parse_assignment("stages.0.token_mixer={kind: pooling}") == ("stages.0.token_mixer", {"kind": "pooling"})
    with pytest.raises(ValueError, match="PATH=VALUE"):
        parse_assignment("stages.2.depth")


# The named sizes of each family as base preset + rule; parameter counts are checked against
# timm's models of those names (built on the meta device: nothing is allocated).
NAMED_SIZES = [
    ("poolformer_s12", dict(depth_multiplier=2), "poolformer_s24"),
    ("poolformer_s12", dict(depth_multiplier=3), "poolformer_s36"),
    ("poolformer_s12", dict(depth_multiplier=3, width_multiplier=[1.5, 1.5, 1.2, 1.5], width_divisor=32),
     "poolformer_m36"),
    ("poolformer_s12", dict(depth_multiplier=4, width_multiplier=[1.5, 1.5, 1.2, 1.5], width_divisor=32),
     "poolformer_m48"),
    ("caformer_s18", dict(depth_multiplier=[1, 4, 2, 1]), "caformer_s36"),
    ("caformer_s18", dict(depth_multiplier=[1, 4, 2, 1], width_multiplier=[1.5, 1.5, 1.2, 1.125]), "caformer_m36"),
    ("caformer_s18", dict(depth_multiplier=[1, 4, 2, 1], width_multiplier=[2, 2, 1.6, 1.5]), "caformer_b36"),
    ("convformer_s18", dict(depth_multiplier=[1, 4, 2, 1]), "convformer_s36"),
    ("swin_tiny_patch4_window7_224", dict(depth_multiplier=[1, 1, 3, 1]), "swin_small_patch4_window7_224"),
    ("swin_tiny_patch4_window7_224", dict(depth_multiplier=[1, 1, 3, 1], width_multiplier=4 / 3),
     "swin_base_patch4_window7_224"),
    ("swin_tiny_patch4_window7_224", dict(depth_multiplier=[1, 1, 3, 1], width_multiplier=2),
     "swin_large_patch4_window7_224"),
    ("hiera_tiny_224", dict(depth_multiplier=[1, 1, 11 / 7, 1]), "hiera_small_224"),
    ("hiera_tiny_224", dict(depth_multiplier=[2, 1.5, 16 / 7, 1.5]), "hiera_base_224"),
    ("hiera_tiny_224", dict(depth_multiplier=[2, 1.5, 16 / 7, 1.5], width_multiplier=7 / 6, heads="keep_num_heads",
                            head_multiplier=2), "hiera_base_plus_224"),
    ("hiera_tiny_224", dict(depth_multiplier=[2, 3, 36 / 7, 2], width_multiplier=1.5, heads="keep_num_heads",
                            head_multiplier=2), "hiera_large_224"),
    ("hiera_tiny_224", dict(depth_multiplier=[2, 3, 36 / 7, 2], width_multiplier=8 / 3, heads="keep_num_heads",
                            head_multiplier=4), "hiera_huge_224"),
]


@pytest.mark.parametrize("base,rule,name", NAMED_SIZES, ids=[n for _, _, n in NAMED_SIZES])
def test_named_sizes_are_a_preset_plus_a_rule(base, rule, name):
    spec = scale(hfactory.load_preset(base), rule, name=name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in HierarchicalEncoder(spec).parameters())
        theirs = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    assert ours == theirs
    assert spec.lineage.base == base


def test_bad_rules_are_named():
    base = hfactory.load_preset("caformer_s18")
    with pytest.raises(OverrideError, match="rounds to 0"):
        scale(base, {"width_multiplier": 0.1, "width_divisor": 64})
    with pytest.raises(OverrideError, match="3 values for 4 stages"):
        scale(base, {"depth_multiplier": [1, 2, 3]})
    with pytest.raises(OverrideError, match="> 0"):
        scale(base, {"depth_multiplier": -1})
    with pytest.raises(ValidationError):
        ScalingRule.model_validate({"heads": "keep_all"})
