"""PVTv2 (issue 13): the pvt_v2_b0 preset and the linear variant reproduce timm ``pvt_v2.py``
exactly after weight conversion (arXiv 2106.13797)."""

import pytest
import torch

import hfactory
from hfactory import resolve
from hfactory.convert import from_timm, from_timm_state_dict
from hfactory.spec import EncoderSpec
from hfactory.spec.base import PlanError
from reference_utils import assert_rel_close, randomize_

timm = pytest.importorskip("timm")


def count(model):
    return sum(p.numel() for p in model.parameters())


def check_equal(model, ref, x, what):
    """Logits and every stage map (NCHW) within 1e-4 of max|ref|; returns the worst ratio."""
    worst = []
    with torch.no_grad():
        worst.append(assert_rel_close(model(x), ref(x), what=f"{what} logits"))
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    assert len(ours) == len(theirs) == 4
    for i, (o, t) in enumerate(zip(ours, theirs)):
        worst.append(assert_rel_close(o, t, what=f"{what} stage {i}"))
    return max(worst)


def test_pvt_v2_b0_preset_matches_timm():
    ref = randomize_(timm.create_model("pvt_v2_b0", pretrained=False)).eval()
    model = hfactory.create_model("pvt_v2_b0").eval()
    assert count(model) == count(ref) == 3_666_760
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    check_equal(model, ref, x, "pvt_v2_b0")


def test_pvt_v2_b0_other_input_size_via_from_timm():
    # timm's PVTv2 runs at any size the strides divide; the hfactory twin is planned for it.
    ref = randomize_(timm.create_model("pvt_v2_b0", pretrained=False, num_classes=7), seed=3).eval()
    spec = dict(hfactory.convert.pvt.spec_from_timm_pvt_v2(ref), img_size=[96, 128])
    model = hfactory.build_encoder(spec).eval()
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    check_equal(model, ref, x, "pvt_v2_b0 96x128")
    with torch.no_grad():  # both give the last stage's normed NCHW map, and the same pooled features
        assert_rel_close(model.forward_features(x), ref.forward_features(x), what="forward_features")
        assert_rel_close(model.forward_head(model.forward_features(x), pre_logits=True),
                         ref.forward_head(ref.forward_features(x), pre_logits=True), what="pre_logits")
    assert [f["reduction"] for f in model.feature_info] == [f["reduction"] for f in ref.feature_info]


def test_linear_variant_matches_timm():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    ref = randomize_(PyramidVisionTransformerV2(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128),
                                                num_heads=(1, 2, 3, 4), mlp_ratios=(8, 8, 4, 4),
                                                linear=True, num_classes=10), seed=5).eval()
    model = from_timm(ref).eval()
    assert count(model) == count(ref)
    mixer = model.plan.stages[0].token_mixer
    assert mixer["linear"] and mixer["pool_size"] == 7
    assert model.plan.stages[0].feedforward["extra_relu"]
    # 128x128: stage 3's 4x4 grid is pooled *up* to 7x7 keys, as timm's adaptive pool does
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    spec = dict(hfactory.convert.pvt.spec_from_timm_pvt_v2(ref), img_size=128)
    small = hfactory.build_encoder(spec).eval()
    small.load_state_dict(model.state_dict(), strict=True)
    check_equal(small, ref, x, "pvt_v2 linear")


def test_plan_declarations_and_errors():
    plan = resolve(hfactory.load_preset("pvt_v2_b0"))
    assert [s.token_mixer["kv_grid"] for s in plan.stages] == [[7, 7], [7, 7], [7, 7], [7, 7]]
    assert [s.num_heads for s in plan.stages] == [1, 2, 5, 8]
    from hfactory.spec.pvt import DWConvMlpParams, SpatialReductionAttentionParams as SRA
    assert SRA.describe(plan.stages[0].token_mixer) == "sra8"
    assert "strided reduction conv" in SRA.crosses_units(plan.stages[0].token_mixer)
    assert "depthwise conv" in DWConvMlpParams.crosses_units(plan.stages[0].feedforward)
    spec = hfactory.load_preset("pvt_v2_b0").model_dump(mode="json", exclude_none=True)
    spec["img_size"] = 64  # stage 1's grid is 8x8: sr_ratio 16 would leave no keys
    spec["stages"][1]["token_mixer"]["sr_ratio"] = 16
    with pytest.raises(PlanError, match=r"stages\.1\.token_mixer\.sr_ratio"):
        resolve(EncoderSpec.model_validate(spec))
    spec = hfactory.load_preset("pvt_v2_b0").model_dump(mode="json", exclude_none=True)
    spec["stages"][0]["feedforward"]["kernel_size"] = 4
    with pytest.raises(PlanError, match=r"stages\.0\.feedforward\.kernel_size"):
        resolve(EncoderSpec.model_validate(spec))


#: The other named sizes as the b0 preset plus a scaling rule (timm ``pvt_v2.py``'s registrations):
#: b1-b5 double b0's widths with the head counts kept (head dim 32 -> 64) and deepen the stages;
#: b5 also uses MLP ratio 4 in stages 0-1 (b0-b4: 8) and b2_li swaps in the linear attention and
#: the ReLU after fc1, both ordinary overrides. Every size timm registers is expressible.
B_SIZES = {
    "pvt_v2_b1": ([1, 1, 1, 1], {}),
    "pvt_v2_b2": ([1.5, 2, 3, 1.5], {}),
    "pvt_v2_b3": ([1.5, 2, 9, 1.5], {}),
    "pvt_v2_b4": ([1.5, 4, 13.5, 1.5], {}),
    "pvt_v2_b5": ([1.5, 3, 20, 1.5], {"stages.0.feedforward.hidden_layer_multiplier": 4,
                                      "stages.1.feedforward.hidden_layer_multiplier": 4}),
    "pvt_v2_b2_li": ([1.5, 2, 3, 1.5], {"stages.*.token_mixer.linear": True, "stages.*.feedforward.extra_relu": True}),
}


@pytest.mark.parametrize("name", list(B_SIZES))
def test_named_sizes_from_scaling_rule(name):
    from hfactory.spec.variants import scale

    depths, changes = B_SIZES[name]
    rule = {"width_multiplier": 2, "heads": "keep_num_heads", "depth_multiplier": depths}
    spec = scale(hfactory.load_preset("pvt_v2_b0"), rule, name=name)
    if changes:
        spec = spec.with_changes(changes)
    with torch.device("meta"):  # shapes only: timm's own count, never one hfactory computes
        ref = timm.create_model(name, pretrained=False)
        model = hfactory.build_encoder(spec)
    assert count(model) == count(ref), name
    # what the count cannot see: head counts and the parameter-free ReLU of the linear variant
    plan = model.plan.stages
    assert [s.depth for s in plan] == [len(st.blocks) for st in ref.stages]
    assert [s.num_heads for s in plan] == [st.blocks[0].attn.num_heads for st in ref.stages]
    assert [s.feedforward["extra_relu"] for s in plan] == [
        isinstance(st.blocks[0].mlp.relu, torch.nn.ReLU) for st in ref.stages]
