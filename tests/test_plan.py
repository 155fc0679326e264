"""The plan: gap-filling, derived numbers, and every shape check with a located message."""

import json

import pytest
import torch

from hfactory import PlanError, load_spec, resolve


def plan_of(data, **kw):
    return resolve(load_spec(data), **kw)


def pooled(data):
    """The spec with a head-free default mixer, so small widths need no heads."""
    return {**data, "defaults": {"token_mixer": "pooling", **data.get("defaults", {})}}


def plan_error(data) -> PlanError:
    with pytest.raises(PlanError) as info:
        plan_of(data)
    return info.value


FOUR = [{"embedding": 64, "depth": 2}, {"embedding": 128, "depth": 2}, {"embedding": 320, "depth": 6},
        {"embedding": 512, "depth": 2}]


def test_grids_channels_and_reductions_hand_computed():
    plan = plan_of({"img_size": [224, 160], "stages": FOUR})
    # 7x7/4 stem then 3x3/2 downsamplers: 224x160 -> 56x40 -> 28x20 -> 14x10 -> 7x5
    assert [s.out_grid for s in plan.stages] == [(56, 40), (28, 20), (14, 10), (7, 5)]
    assert [s.in_grid for s in plan.stages] == [(224, 160), (56, 40), (28, 20), (14, 10)]
    assert [s.seq_len for s in plan.stages] == [2240, 560, 140, 35]
    assert [(s.in_chs, s.out_chs) for s in plan.stages] == [(3, 64), (64, 128), (128, 320), (320, 512)]
    assert [s.reduction for s in plan.stages] == [4, 8, 16, 32]
    assert plan.num_features == 512


def test_heads_default_dim_head_32_and_overrides():
    plan = plan_of({"stages": FOUR})
    assert [s.num_heads for s in plan.stages] == [2, 4, 10, 16]
    plan = plan_of({"defaults": {"num_heads": 4}, "stages": [{"embedding": 64, "dim_head": 8}, {"embedding": 128}]})
    assert [(s.num_heads, s.dim_head) for s in plan.stages] == [(8, 8), (4, 32)]
    assert plan_of({"stages": [{"embedding": 64, "token_mixer": "pooling"}]}).stages[0].num_heads is None


def test_heads_that_do_not_divide_are_located():
    err = plan_error({"stages": [{"embedding": 64}, {"embedding": 96, "num_heads": 5}]})
    assert err.loc == "stages.1.num_heads" and "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96" in err.message
    err = plan_error({"stages": [{"embedding": 48, "dim_head": 32}]})
    assert err.loc == "stages.0.dim_head"
    err = plan_error({"stages": [{"embedding": 40}]})  # library default dim_head 32
    assert err.loc == "stages.0.dim_head" and "default dim_head" in err.message
    err = plan_error({"stages": [{"embedding": 48, "num_heads": 2, "dim_head": 32}]})
    assert err.loc == "stages.0.num_heads" and "set only one" in err.message


def test_drop_path_is_linear_over_all_blocks_like_timm():
    plan = plan_of({"drop_path_rate": 0.3, "stages": FOUR})
    rates = [r for s in plan.stages for r in s.drop_path]
    expected = torch.linspace(0, 0.3, 12).tolist()
    assert rates == pytest.approx(expected, abs=1e-7)
    assert [len(s.drop_path) for s in plan.stages] == [2, 2, 6, 2]


def test_gap_filling_precedence_stage_then_defaults_then_library():
    plan = plan_of({"defaults": {"token_mixer": "pooling", "norm": "groupnorm", "layer_scale": 1e-5},
                    "stages": [{"embedding": 32, "token_mixer": "attention"}, {"embedding": 64, "layer_scale": False}]})
    s0, s1 = plan.stages
    assert s0.token_mixer["kind"] == "attention" and s1.token_mixer["kind"] == "pooling"
    assert s0.norm["kind"] == s1.norm["kind"] == "groupnorm"
    assert s0.layer_scale == 1e-5 and s1.layer_scale is None
    assert s0.feedforward == {"kind": "mlp", "dim": 32, "hidden_features": 128, "activation": "gelu", "bias": True,
                              "drop": 0.0}
    assert s0.residual_norm_style == "pre" and s0.depth == 1
    assert s0.downsample["patch_size"] == 7 and s1.downsample["patch_size"] == 3


def test_stride_not_dividing_the_grid():
    err = plan_error({"img_size": 100, "stages": [{"embedding": 8, "patch_size": 8}]})
    assert err.loc == "stages.0.downsample.stride" and "100" in err.message


def test_padding_that_changes_the_grid_suggests_the_right_padding():
    err = plan_error({"stages": [{"embedding": 32, "patch_size": 4}, {"embedding": 64, "patch_size": 3, "stride": 2}]})
    assert err.loc == "stages.1.downsample.padding" and "padding 1 gives 28" in err.message


def test_grid_reduced_to_nothing():
    err = plan_error(pooled({"img_size": 32, "stages": [{"embedding": 8, "patch_size": 32},
                                                        {"embedding": 8, "patch_size": 2, "stride": 2}]}))
    assert err.loc == "stages.1.downsample.stride"


def test_seq_len_given_must_match():
    assert plan_of({"stages": [{"embedding": 32, "patch_size": 4, "seq_len": 3136}]}).stages[0].seq_len == 3136
    err = plan_error({"stages": [{"embedding": 32, "patch_size": 4}, {"embedding": 32, "seq_len": 100}]})
    assert err.loc == "stages.1.seq_len" and "784" in err.message


def test_downsample_none_keeps_width():
    plan = plan_of(pooled({"stages": [{"embedding": 8, "patch_size": 4}, {"embedding": 8, "downsample": "none"}]}))
    assert plan.stages[1].out_grid == plan.stages[1].in_grid == (56, 56)
    err = plan_error(pooled({"stages": [{"embedding": 8, "patch_size": 4}, {"embedding": 16, "downsample": "none"}]}))
    assert err.loc == "stages.1.downsample"
    err = plan_error(pooled({"stages": [{"embedding": 8, "downsample": "none"}]}))
    assert err.loc == "stages.0.downsample" and "patch embedding" in err.message


@pytest.mark.parametrize("stage,loc", [
    ({"embedding": 8, "token_mixer": {"kind": "pooling", "pool_size": 4}}, "stages.0.token_mixer.pool_size"),
    ({"embedding": 8, "token_mixer": {"kind": "sepconv", "kernel_size": 6}}, "stages.0.token_mixer.kernel_size"),
    ({"embedding": 6, "norm": {"kind": "groupnorm", "num_groups": 4}}, "stages.0.norm.num_groups"),
    ({"embedding": 8, "num_heads": 8, "token_mixer": {"kind": "attention", "rotary": True}},
     "stages.0.token_mixer.rotary"),
    ({"embedding": 8, "feedforward": {"kind": "mlp", "hidden_layer_multiplier": 0.01}},
     "stages.0.feedforward.hidden_layer_multiplier"),
])
def test_component_checks_are_located(stage, loc):
    stage = {"token_mixer": "pooling", **stage}
    assert plan_error({"stages": [stage]}).loc == loc


def test_plan_is_printable_serialisable_and_deterministic():
    spec = load_spec({"img_size": [64, 96], "stages": FOUR[:2]})
    from hfactory.plan import _resolve  # uncached: resolve() memoises on the spec's JSON

    a, b = resolve(spec), _resolve(load_spec(spec.model_dump(mode="json")), spec.img_hw)
    assert a is not b and str(a) == str(b) and a == b
    assert "64x96 -> 16x24" in str(a) and "16x24 -> 8x12" in str(a)
    data = json.loads(a.to_json())
    assert data["stages"][1]["out_grid"] == [8, 12]
    assert data["stages"][0]["token_mixer"]["num_heads"] == 2


def test_other_input_size_is_planned_on_request():
    spec = load_spec({"stages": FOUR})
    assert resolve(spec, img_size=(256, 320)).stages[-1].out_grid == (8, 10)
    with pytest.raises(PlanError):
        resolve(spec, img_size=(250, 320))


def test_seq_len_refers_to_the_specs_own_img_size():
    spec = load_spec({"stages": [{"embedding": 32, "patch_size": 4, "seq_len": 3136}]})
    assert resolve(spec, img_size=(224, 160)).stages[0].seq_len == 56 * 40


@pytest.mark.parametrize("downsample,advice", [
    ({"kind": "conv", "patch_size": 3, "stride": 2, "padding": 0}, "padding 1 gives 16"),
    ({"kind": "conv", "patch_size": 7, "stride": 4, "padding": 0}, "padding 2 gives 8"),
    # an even kernel with stride 1 cannot keep the size: no padding is offered that would not work
    ({"kind": "conv", "patch_size": 2, "stride": 1, "padding": 1}, "no padding gives 32 with patch_size 2"),
])
def test_padding_advice_is_a_padding_that_works(downsample, advice):
    err = plan_error({"img_size": 32, "stages": [{"embedding": 8, "downsample": downsample}]})
    assert err.loc == "stages.0.downsample.padding" and advice in str(err)
    if advice.startswith("padding"):  # the advised padding plans
        fixed = {**downsample, "padding": int(advice.split()[1])}
        spec = {"img_size": 32, "stages": [{"embedding": 8, "num_heads": 1, "downsample": fixed}]}
        assert resolve(load_spec(spec)).stages[0].out_grid == (32 // downsample["stride"],) * 2
