"""MViTv2 (issue 13): the mvitv2_tiny preset and custom MultiScaleVit configurations reproduce timm
``mvitv2.py`` exactly after weight conversion (arXiv 2112.01526), at the built size and at others
(relative-position tables resized linearly, as timm's ``checkpoint_filter_fn``)."""

import pytest
import torch

import hfactory
from hfactory import resolve
from hfactory.convert import from_timm, from_timm_state_dict
from hfactory.spec import EncoderSpec
from hfactory.spec.base import PlanError
from hfactory.spec.variants import scale
from reference_utils import assert_rel_close, randomize_

timm = pytest.importorskip("timm")
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg, checkpoint_filter_fn  # noqa: E402


def count(model):
    return sum(p.numel() for p in model.parameters())


def check_equal(model, ref, x, what):
    """Logits and every stage map (NCHW) within 1e-4 of max|ref|; returns the worst ratio."""
    worst = []
    with torch.no_grad():  # one forward each: the maps on the way, then the head (= model(x))
        final, ours = model.forward_intermediates(x)
        ref_final, theirs = ref.forward_intermediates(x)
        worst.append(assert_rel_close(model.forward_head(final), ref.forward_head(ref_final), what=f"{what} logits"))
    assert len(ours) == len(theirs) == len(ref.stages)
    for i, (o, t) in enumerate(zip(ours, theirs)):
        worst.append(assert_rel_close(o, t, what=f"{what} stage {i}"))
    return max(worst)


def uninitialised(build):
    """``build()`` on the meta device, then given empty CPU storage: for models whose every
    tensor is loaded right after (skips the init of 24M parameters; MViTv2 has no buffers)."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu").eval()


@pytest.fixture(scope="module")
def tiny():
    """timm's mvitv2_tiny with random weights and the preset loaded from it (built at 224)."""
    ref = randomize_(timm.create_model("mvitv2_tiny", pretrained=False)).eval()
    model = uninitialised(lambda: hfactory.create_model("mvitv2_tiny"))
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    return ref, model


def test_mvitv2_tiny_preset_matches_timm(tiny):
    ref, model = tiny
    assert count(model) == count(ref) == 24_173_320
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    check_equal(model, ref, x, "mvitv2_tiny")
    assert [f["reduction"] for f in model.feature_info] == [f["reduction"] for f in ref.feature_info]


def test_other_input_size_resizes_rel_pos_tables(tiny):
    # timm builds MViTv2 for one size (fixed_input_size) and resizes the rel-pos tables linearly
    # when loading weights into a model built for another; hfactory does the same on load, and
    # the model built at 224 run at 128 resizes them on the fly to the same values.
    ref, at224 = tiny
    ref128 = uninitialised(lambda: timm.create_model("mvitv2_tiny", pretrained=False, img_size=128))
    ref128.load_state_dict(checkpoint_filter_fn(dict(ref.state_dict()), ref128), strict=True)
    built = uninitialised(lambda: hfactory.create_model("mvitv2_tiny", img_size=128))
    assert built.plan.stages[0].blocks[0].token_mixer["rel_pos_size"] == [63, 63]
    built.load_state_dict(from_timm_state_dict(ref.state_dict(), built), strict=True)
    assert built.stages[0].blocks[0].token_mixer.rel_pos_h.shape == ref128.stages[0].blocks[0].attn.rel_pos_h.shape
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    check_equal(built, ref128, x, "mvitv2_tiny built at 128")
    check_equal(at224, ref128, x, "mvitv2_tiny built at 224, run at 128")
    with torch.no_grad():  # non-square grids (timm asserts square ones) plan and run too
        assert at224(torch.randn(1, 3, 128, 96)).shape == (1, 1000)


CUSTOM = {
    "small_conv": dict(depths=(1, 2, 1, 1), embed_dim=32, num_heads=1),
    "avg_k1_no_rel_pos": dict(depths=(1, 1, 2, 1), embed_dim=(24, 48, 96, 96), num_heads=(1, 2, 2, 4),
                              mode="avg", kernel_qkv=(1, 1), rel_pos_type="none", residual_pooling=False,
                              qkv_bias=False, mlp_ratio=2.0),
    "max_three_stages": dict(depths=(2, 1, 1), embed_dim=16, num_heads=(1, 2, 2), mode="max",
                             stride_q=((1, 1), (2, 2), (2, 2)), stride_kv_adaptive=(2, 2)),
}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_from_timm_builds_equal_twin_of_custom_configs(name):
    ref = randomize_(MultiScaleVit(MultiScaleVitCfg(**CUSTOM[name]), img_size=64, num_classes=10), seed=5).eval()
    model = from_timm(ref).eval()
    assert count(model) == count(ref)
    if CUSTOM[name].get("rel_pos_type", "spatial") == "spatial":  # the built size, read from the tables
        assert model.plan.img_size == (64, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    check_equal(model, ref, x, name)


def test_named_sizes_from_scaling_rule():
    # mvitv2_small / _base are the tiny preset with deeper stages (timm's model_cfgs)
    tiny = hfactory.load_preset("mvitv2_tiny")
    for name, mult, depths in (("mvitv2_small", [1, 1, 2.2, 1], [1, 2, 11, 2]),
                               ("mvitv2_base", [2, 1.5, 3.2, 1.5], [2, 3, 16, 3])):
        spec = scale(tiny, {"depth_multiplier": mult}, name=name)
        assert [s.depth for s in spec.stages] == depths
        ref = timm.create_model(name, pretrained=False, device="meta")
        with torch.device("meta"):
            model = hfactory.build_encoder(spec)
        assert count(model) == count(ref), name


def test_plan_declarations_and_errors():
    plan = resolve(hfactory.load_preset("mvitv2_tiny"))
    first = [s.blocks[0].token_mixer for s in plan.stages]
    assert [m["kv_grid"] for m in first] == [[14, 14], [28, 28], [28, 28], [14, 14]]
    assert [m["q_grid"] for m in first] == [[56, 56], [28, 28], [14, 14], [7, 7]]
    assert [s.blocks[0].expand for s in plan.stages[1:]] == ["proj_overlap"] * 3
    from hfactory.spec.mvit import MViTAttentionParams, MViTQPoolParams

    assert MViTAttentionParams.describe(first[1]) == "mvit_attention kv/2 q/2"
    assert MViTQPoolParams.describe(plan.stages[1].downsample) == "mvit_q_pool/2"
    assert "no per-mask-unit form" in MViTAttentionParams.crosses_units(first[0])
    base = hfactory.load_preset("mvitv2_tiny").model_dump(mode="json", exclude_none=True)

    def fails(change, where):
        spec = {**base, "stages": [dict(s) for s in base["stages"]], "defaults": dict(base["defaults"])}
        change(spec)
        with pytest.raises(PlanError, match=where):
            resolve(EncoderSpec.model_validate(spec))

    fails(lambda s: s["stages"][1].update(downsample={"kind": "mvit_q_pool", "q_stride": 3}),
          r"stages\.1\.downsample\.q_stride.*odd")
    fails(lambda s: s.update(img_size=200), r"stages\.2\.downsample\.q_stride.*does not divide")  # 50 -> 25
    fails(lambda s: s["stages"][0].update(token_mixer={"kind": "mvit_attention", "kernel_q": 2}),
          r"stages\.0\.token_mixer\.kernel_q")
    fails(lambda s: s["stages"][3].update(token_mixer={"kind": "mvit_attention", "kv_stride": 16}),
          r"stages\.3\.token_mixer\.kv_stride")
    with torch.device("meta"):
        model = hfactory.create_model("mvitv2_tiny")
    with pytest.raises(PlanError, match=r"stages\.2\.downsample\.q_stride"):  # the input's plan says why
        model(torch.zeros(1, 3, 200, 200, device="meta"))


def test_bad_state_dicts_and_configs_are_refused():
    meta = dict(img_size=64, device="meta")  # shapes are all a refusal needs
    small = MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=32, num_heads=1), **meta)
    with torch.device("meta"):
        model = hfactory.create_model("mvitv2_tiny")
    with pytest.raises(ValueError, match=r"shape mismatch: stages\.0\.downsample\.conv\.weight: \(32, 3, 7, 7\) "
                                         r"vs model \(96, 3, 7, 7\)"):
        from_timm_state_dict(small.state_dict(), model)
    deeper = MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 6, 2), embed_dim=96, num_heads=1), **meta)
    with pytest.raises(ValueError, match=r"unexpected: stages\.2\.blocks\.5\."):
        from_timm_state_dict(deeper.state_dict(), model)
    cls = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, use_cls_token=True), **meta)
    with pytest.raises(ValueError, match="class token"):
        from_timm(cls)
    narrow = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, expand_attn=False), **meta)
    with pytest.raises(ValueError, match="expand_attn=False"):
        from_timm(narrow)
