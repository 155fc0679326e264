"""Variants: overrides by path, scaling rules reproducing the named sizes, lineage (issue 8)."""

import pytest
import torch
from pydantic import ValidationError

import hfactory
from hfactory import PlanError, build_encoder, resolve
from hfactory.encoder import HierarchicalEncoder
from hfactory.spec.variants import OverrideError, ScalingRule, parse_assignment, scale
from reference_utils import randomize_

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
    assert again.lineage.base == "poolformer_s12"
    assert [s.changes for s in again.lineage.steps] == [{"stages.3.depth": 4}]
    scaled = scale(again, {"depth_multiplier": 2})
    assert [s.changes for s in scaled.lineage.steps] == [{"stages.3.depth": 4}, None]
    assert scaled.lineage.steps[1].rule == {"depth_multiplier": 2.0}


def _depths(spec):
    return [s.depth for s in hfactory.resolve(spec).stages]


def test_replaying_the_lineage_rebuilds_every_chain_of_steps():
    """The lineage records ordered steps, so a variant can be rebuilt from its base: repeated
    rules, a later change overriding an earlier one, a change before a rule."""
    from hfactory.spec.variants import replay_lineage

    base = hfactory.load_preset("caformer_s18")  # depths 3, 3, 9, 3
    chains = [
        scale(scale(base, {"depth_multiplier": 2}), {"depth_multiplier": 2}),
        base.with_changes({"stages.0.depth": 5}).with_changes({"stages.*.depth": 2, "stages.0.depth": 7}),
        scale(base.with_changes({"stages.3.depth": 4}), {"depth_multiplier": 2}),
        scale(base, {"width_multiplier": 1.5}).with_changes({"stages.2.token_mixer.kind": "pooling"}),
        scale(base, {"depth_multiplier": [1, 1, 3, 1]}, name="renamed"),
    ]
    assert [_depths(c) for c in chains[:3]] == [[12, 12, 36, 12], [7, 2, 2, 2], [6, 6, 18, 8]]
    for spec in chains:
        again = hfactory.load_spec(hfactory.dump_spec(spec))  # as read back from a checkpoint
        assert replay_lineage(again) == spec
    from hfactory.sweep import expand_grid

    for name, variant in expand_grid(base, {"stages.2.depth": [6], "embedding_scale": [1.25]}):
        assert replay_lineage(hfactory.load_spec(hfactory.dump_spec(variant))) == variant and variant.name == name
    with pytest.raises(ValueError, match="has no lineage"):
        replay_lineage(base)
    with pytest.raises(ValueError, match="'mine' is not a preset; pass the base spec"):
        replay_lineage(base.model_copy(update={"name": "mine"}).with_changes({"drop_rate": 0.1}))


def test_parse_assignment():
    assert parse_assignment("stages.2.depth=9") == ("stages.2.depth", 9)
    assert parse_assignment("defaults.layer_scale=1e-5") == ("defaults.layer_scale", 1e-5)
    assert parse_assignment("stages.0.token_mixer={kind: pooling}") == ("stages.0.token_mixer", {"kind": "pooling"})
    with pytest.raises(ValueError, match="PATH=VALUE"):
        parse_assignment("stages.2.depth")
    with pytest.raises(ValueError, match=r"--set stages.2.depth: value '\[1' is not valid YAML \(while parsing"):
        parse_assignment("stages.2.depth=[1")


def test_a_path_with_spaces_is_refused():
    with pytest.raises(OverrideError, match="spaces around it"):
        hfactory.load_preset("caformer_s18").with_changes({"stages. 0.depth": 2})


def test_scaling_rounds_halves_up():
    caformer = hfactory.load_preset("caformer_s18")  # depths 3, 3, 9, 3
    assert _depths(scale(caformer, {"depth_multiplier": 1.5})) == [5, 5, 14, 5]  # 4.5 -> 5, 13.5 -> 14
    hiera = hfactory.load_preset("hiera_tiny_224")  # widths 96 ... 768, head dim 96: 2.5, 5, 10, 20 heads
    assert [s.out_chs for s in hfactory.resolve(scale(hiera, {"width_multiplier": 2.5})).stages] == [288, 480, 960,
                                                                                                    1920]


def test_bad_grid_text_names_the_path(capsys):
    from hfactory.cli import main
    from hfactory.sweep import parse_grid

    with pytest.raises(ValueError, match=r"--grid stages.2.depth: values '6,,9' are not a comma-separated list"):
        parse_grid("stages.2.depth=6,,9")
    assert main(["sweep", "caformer_s18", "--grid", "stages.2.depth=1", "--grid", "stages.2.depth=2"]) == 2
    assert "--grid stages.2.depth is given twice" in capsys.readouterr().err


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
    ("convformer_s18", dict(depth_multiplier=[1, 4, 2, 1], width_multiplier=[1.5, 1.5, 1.2, 1.125]), "convformer_m36"),
    ("convformer_s18", dict(depth_multiplier=[1, 4, 2, 1], width_multiplier=[2, 2, 1.6, 1.5]), "convformer_b36"),
    ("poolformerv2_s12", dict(depth_multiplier=2), "poolformerv2_s24"),
    ("poolformerv2_s12", dict(depth_multiplier=3), "poolformerv2_s36"),
    ("poolformerv2_s12", dict(depth_multiplier=3, width_multiplier=[1.5, 1.5, 1.2, 1.5], width_divisor=32),
     "poolformerv2_m36"),
    ("poolformerv2_s12", dict(depth_multiplier=4, width_multiplier=[1.5, 1.5, 1.2, 1.5], width_divisor=32),
     "poolformerv2_m48"),
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


def test_sweep_rows_equal_whole_model_summaries(tmp_path):
    from hfactory.summary import summarize
    from hfactory.sweep import expand_grid, sweep, write_variants

    base = hfactory.load_preset("caformer_s18")
    grid = {"stages.2.depth": [3, 6], "embedding_scale": [1, 1.5], "stages.*.feedforward.hidden_layer_multiplier": [2]}
    rows = sweep(base, grid)
    assert len(rows) == 4 and len({r["name"] for r in rows}) == 4
    for row in rows[::3]:  # measured stage by stage (cached) vs the whole model at once
        whole = summarize(row["spec"])["total"]
        assert row["params"] == whole["params"]
        assert row["gmacs"] == pytest.approx(whole["gmacs"], rel=1e-9)
        assert row["activation_bytes"] == whole["activation_bytes"]
    paths = write_variants(rows, tmp_path)
    again = hfactory.load_spec(paths[0])
    assert again.lineage.base == "caformer_s18" and "stages.2.depth" in again.lineage.steps[-1].changes
    with pytest.raises(OverrideError, match="no values"):
        expand_grid(base, {"stages.2.depth": []})


@pytest.mark.parametrize("name", ["hvt_s_1", "hvt_ti_1", "hiera_tiny_224", "swin_tiny_patch4_window7_224",
                                  "poolformerv2_s12"])
def test_sweep_rows_equal_whole_model_summaries_for_every_family(name):
    """Stage by stage (cached) and whole model agree for each family, at batch 2; HVT's first
    pooled stage opens with a weight-free 1-D max pooling whose saved input counts only when the
    stage input requires grad, as it does in training."""
    from hfactory.summary import summarize
    from hfactory.sweep import sweep

    spec = hfactory.load_preset(name)
    row = sweep(spec, {"drop_rate": [0.0]}, batch=2)[0]
    whole = summarize(spec, batch=2)["total"]
    assert (row["params"], row["activation_bytes"]) == (whole["params"], whole["activation_bytes"])
    assert row["gmacs"] == pytest.approx(whole["gmacs"], rel=1e-9)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            sweep(spec, {"drop_rate": [0.0]}, batch=bad)


def test_cli_set_and_sweep(tmp_path, capsys):
    from hfactory.cli import main

    assert main(["summary", "caformer_s18", "--set", "stages.2.depth=2", "--set", "stages.3.depth=1", "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert [s["depth"] for s in out["stages"]] == [3, 3, 2, 1]
    assert main(["summary", "caformer_s18", "--set", "stages.9.depth=2"]) == 2
    assert "stages.9: no such stage" in capsys.readouterr().err
    assert main(["summary", "caformer_s18", "--set", "stages.2.num_heads=7"]) == 2
    assert "stages.2.num_heads" in capsys.readouterr().err
    assert main(["sweep", "poolformer_s12", "--grid", "stages.3.depth=1,2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.split()[:7] == ["name", "params", "GMACs", "activations", "tokens", "per", "stage"]
    assert "poolformer_s12-s3.depth1" in text and "3136/784/196/49" in text
    assert len(list(tmp_path.glob("*.yaml"))) == 2
    assert main(["sweep", "poolformer_s12", "--grid", "stages.3.depth=1,2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    variant = hfactory.load_preset("poolformer_s12").with_changes({"stages.3.depth": 1})
    with torch.device("meta"):
        params = sum(p.numel() for p in HierarchicalEncoder(variant).parameters())
    assert [r["name"] for r in rows] == ["poolformer_s12-s3.depth1", "poolformer_s12-s3.depth2"]
    assert rows[0]["params"] == params and rows[1]["params"] > params
    assert rows[0]["gmacs"] < rows[1]["gmacs"] and 0 < rows[0]["activation_bytes"] < rows[1]["activation_bytes"]
    assert rows[0]["tokens"] == [3136, 784, 196, 49]
    assert main(["sweep", "poolformer_s12", "--grid", "stages.3.depth="]) == 2
    assert "no values" in capsys.readouterr().err


# ------------------------------------------------------------------ HVT: number of pooling stages

@pytest.mark.parametrize("base", ["hvt_s_0", "hvt_s_4"])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_pooling_stages_rule_rebuilds_hvt_s_n_block_for_block(base, n):
    # HVT's README table "More Pooling Stages with HVT-S": HVT-S-n pools after blocks 0, w, 2w, ...
    # with w = 12 / n (MonashAI/HVT config/*.json pool_block_width 12, 6, 4, 3).
    ref_spec = hfactory.load_preset(f"hvt_s_{n}")
    spec = scale(hfactory.load_preset(base), {"pooling_stages": n})
    assert [s.depth for s in resolve(spec).stages] == [s.depth for s in resolve(ref_spec).stages]
    ref = randomize_(build_encoder(ref_spec)).eval()
    model = build_encoder(spec).eval()
    model.load_state_dict(ref.state_dict(), strict=True)  # same keys and shapes
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert spec.lineage.base == base and spec.lineage.steps[-1].rule["pooling_stages"] == n


def test_pooling_stages_rule_errors_and_options():
    from hfactory.spec.variants import pooling_split

    assert pooling_split(12, 3) == [1, 4, 4, 3] and pooling_split(12, 6) == [1, 2, 2, 2, 2, 2, 1]
    hvt = hfactory.load_preset("hvt_s_0")
    with pytest.raises(OverrideError, match=r"pooling_stages: 5 poolings .* achievable: 0, 1, 2, 3, 4, 6"):
        scale(hvt, {"pooling_stages": 5})
    with pytest.raises(OverrideError, match=r"constant-width .* widths \[96, 192, 384, 768\]"):
        scale(hfactory.load_preset("swin_tiny_patch4_window7_224"), {"pooling_stages": 2})
    with pytest.raises(ValidationError):
        ScalingRule.model_validate({"pooling_stages": -1})
    # Another pooling downsampler for the pooled stages, and depth scaling before the re-split.
    spec = scale(hvt, {"pooling_stages": 2, "depth_multiplier": 2,
                       "pooling": {"kind": "max_pool_1d", "kernel_size": 2, "stride": 2}})
    plan = resolve(spec)
    assert [s.depth for s in plan.stages] == [1, 12, 11] and [s.seq_len for s in plan.stages] == [196, 98, 49]


def test_overrides_reach_the_mae_section():
    spec = hfactory.load_preset("mae_hiera_tiny_224").with_changes({"mae.decoder_depth": 4, "mae.mask_ratio": 0.75})
    assert spec.mae.decoder_depth == 4 and spec.mae.mask_ratio == 0.75
    with pytest.raises(OverrideError, match=r"mae.decoder_width: unknown key 'decoder_width' \(did you mean "
                                            r"'decoder_depth'"):
        spec.with_changes({"mae.decoder_width": 4})
    with pytest.raises(ValidationError, match="mask_ratio"):
        spec.with_changes({"mae.mask_ratio": 1.5})


def test_sweep_variant_names_are_distinct_file_names():
    from hfactory.sweep import expand_grid

    swin = hfactory.load_preset("swin_tiny_patch4_window7_224")
    names = [n for n, _ in expand_grid(swin, {"stages.0.token_mixer.window_size": [[7, 7], [8, 8]]})]
    assert names == [f"swin_tiny_patch4_window7_224-s0.token_mixer.window_size{w}" for w in ("7_7", "8_8")]
    twice = [n for n, _ in expand_grid(swin, {"stages.0.depth": [1, 1, 1]})]  # same spelling: still three files
    assert len(set(twice)) == 3


def test_a_pooling_downsampler_without_pooling_stages_is_refused():
    with pytest.raises(OverrideError, match="pooling: is the downsampler of the stages that pooling_stages makes"):
        scale(hfactory.load_preset("hvt_s_0"), {"pooling": {"kind": "max_pool_1d", "kernel_size": 2}})
