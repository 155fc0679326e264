"""MaxViT (issue 13): the maxvit_tiny_tf_224 preset and custom MaxViTs reproduce timm ``maxxvit.py``
exactly after weight conversion (arXiv 2204.01697)."""

from dataclasses import replace

import pytest
import torch

import hfactory
from hfactory import resolve
from hfactory.convert import from_timm, from_timm_state_dict
from hfactory.spec import EncoderSpec
from hfactory.spec.base import PlanError
from reference_utils import assert_rel_close, randomize_

timm = pytest.importorskip("timm")
maxxvit = pytest.importorskip("timm.models.maxxvit")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Many small convs: with conftest's 2 threads on a loaded 2-core machine each op waits for the
    # second thread (the small twins ran ~25x slower); one thread here, restored after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomize_all_(model, seed=0):
    """randomize_ plus BatchNorm running statistics (so their conversion is checked too)."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def check_equal(model, ref, x, what):
    """Logits and every stage map (NCHW) within 1e-4 of max|ref|; returns the worst ratio. timm's
    intermediates start with the stem's map (reduction 2), which is inside hfactory's stage 0."""
    with torch.no_grad():  # one pass each: the final map gives the logits
        final, ours = model.forward_intermediates(x)
        ref_final, theirs = ref.forward_intermediates(x)
        worst = [assert_rel_close(model.forward_head(final), ref.forward_head(ref_final), what=f"{what} logits")]
    assert len(ours) == 4 and len(theirs) == 5
    for i, (o, t) in enumerate(zip(ours, theirs[1:])):
        worst.append(assert_rel_close(o, t, what=f"{what} stage {i}"))
    return max(worst)


def small_cfg(**changes):
    """A small TF-style MaxViT: stem (16, 24) so stage 0's shortcut has a 1x1 conv, depths 1 and 2,
    dim_head 16; windows img_size / 32."""
    tf = maxxvit._tf_cfg()
    cfg = maxxvit.MaxxVitCfg(embed_dim=(32, 48, 64, 96), depths=(1, 2, 1, 1), block_type=("M",) * 4,
                             stem_width=(16, 24), stem_bias=True, head_hidden_size=96, conv_cfg=tf["conv_cfg"],
                             transformer_cfg=replace(tf["transformer_cfg"], dim_head=16))
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def tiny_ref():
    return randomize_all_(timm.create_model("maxvit_tiny_tf_224", pretrained=False)).eval()


def test_maxvit_tiny_tf_224_preset_matches_timm(tiny_ref):
    model = hfactory.create_model("maxvit_tiny_tf_224").eval()
    assert count(model) == count(tiny_ref) == 30_916_528
    model.load_state_dict(from_timm_state_dict(tiny_ref.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    check_equal(model, tiny_ref, x, "maxvit_tiny_tf_224")
    assert [f["reduction"] for f in model.feature_info] == [f["reduction"] for f in tiny_ref.feature_info[1:]]
    assert "stages.0.blocks.0.token_mixer.relative_position_bias_table" in model.no_weight_decay()


def test_preset_at_256_with_window_8_and_resized_tables(tiny_ref):
    # timm derives window = grid = img_size // 32 (8 at 256) and resizes the bias tables on load;
    # hfactory's preset states its window (7), so at 256 the spec says 8, and the 13x13 tables of
    # the 224 weights are resized (bicubic) to 15x15 on load.
    data = hfactory.load_preset("maxvit_tiny_tf_224").model_dump(mode="json", exclude_none=True)
    data["img_size"] = 256
    data["defaults"]["token_mixer"]["window_size"] = 8
    for stage in data["stages"]:
        stage["blocks"][0]["token_mixer"]["grid_size"] = 8
    model = hfactory.build_encoder(data).eval()
    state = from_timm_state_dict(tiny_ref.state_dict(), model)
    model.load_state_dict(state, strict=True)
    key = "stages.2.blocks.4.token_mixer.relative_position_bias_table"
    assert tuple(state[key].shape) == (15 * 15, 8)
    ref = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=256).eval()
    assert ref.stages[0].blocks[0].attn_block.partition_size == (8, 8)
    theirs = dict(tiny_ref.state_dict())
    for k in theirs:  # the same resized tables, back in timm's (heads, 2h-1, 2w-1) layout
        if k.endswith("relative_position_bias_table"):
            i, j, part = k.split(".")[1], int(k.split(".")[3]), k.split(".")[4]
            ours = state[f"stages.{i}.blocks.{3 * j + (part == 'attn_grid')}.token_mixer.relative_position_bias_table"]
            theirs[k] = ours.reshape(15, 15, -1).permute(2, 0, 1).flip(1, 2)
    ref.load_state_dict(theirs, strict=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    check_equal(model, ref, x, "maxvit_tiny_tf 256")


@pytest.mark.parametrize("variant", ["tf_mlp_head", "symmetric_linear_head"])
def test_from_timm_builds_custom_maxvit_twins(variant):
    cfg = small_cfg()
    if variant == "symmetric_linear_head":  # timm's default padding/eps/GELU, norm before pooling + Linear
        cfg = small_cfg(head_hidden_size=None, stem_bias=False, conv_cfg=maxxvit.MaxxVitConvCfg(),
                        transformer_cfg=replace(cfg.transformer_cfg, act_layer="gelu", norm_eps=1e-6))
    ref = randomize_all_(maxxvit.MaxxVit(cfg, img_size=64, num_classes=10), seed=3).eval()
    model = from_timm(ref).eval()
    assert count(model) == count(ref)
    plan = model.plan
    assert [s.depth for s in plan.stages] == [2, 5, 2, 2]
    assert plan.stages[0].downsample["stem"]["widths"] == [16, 24]
    assert plan.stages[0].token_mixer["partition_size"] == [2, 2]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    check_equal(model, ref, x, f"maxvit {variant}")
    model.train(), ref.train()  # BatchNorm on batch statistics (no dropout, no drop path here)
    assert_rel_close(model(x), ref(x), what=f"maxvit {variant} train mode")


def test_plan_declarations_and_describe():
    plan = resolve(hfactory.load_preset("maxvit_tiny_tf_224"))
    assert [s.depth for s in plan.stages] == [5, 5, 14, 5]
    assert [s.num_heads for s in plan.stages] == [2, 4, 8, 16]
    s2 = plan.stages[2]
    kinds = [b.token_mixer["kind"] for b in s2.blocks]
    assert kinds == ["block_attention", "grid_attention"] + ["mbconv", "block_attention", "grid_attention"] * 4
    assert s2.blocks[2].feedforward == {"kind": "none", "dim": 256} and s2.blocks[2].norm1["kind"] == "identity"
    ds = plan.stages[1].downsample
    assert (ds["mid_chs"], ds["se_chs"], ds["padding"]) == (512, 32, "same")
    from hfactory.spec.maxvit import GridAttentionParams, MBConvDownsampleParams
    assert MBConvDownsampleParams.describe(plan.stages[0].downsample) == "conv_stem 3x3/s2+3x3+mbconv3+se/s2"
    assert GridAttentionParams.describe(s2.blocks[1].token_mixer) == "grid_attention 7x7"
    assert "across mask units" in GridAttentionParams.crosses_units(s2.blocks[1].token_mixer)
    assert plan.mae_incompatibility is not None


def test_bad_input_located_in_the_plan():
    with pytest.raises(PlanError, match=r"stages\.0\.token_mixer\.window_size: .*64x64.*valid heights: 1, 2, 4, 8"):
        hfactory.create_model("maxvit_tiny_tf_224", img_size=256)
    data = hfactory.load_preset("maxvit_tiny_tf_224").model_dump(mode="json", exclude_none=True)
    data["img_size"] = 256
    data["defaults"]["token_mixer"]["window_size"] = 8  # the blocks fit, the grid lattice of 7 does not
    with pytest.raises(PlanError, match=r"stages\.0\.blocks\.0\.token_mixer\.grid_size"):
        resolve(EncoderSpec.model_validate(data))
    data["img_size"] = 208  # 104 -> 52 -> 26 -> 13: stage 3's stride-2 MBConv meets an odd grid
    data["defaults"]["token_mixer"]["window_size"] = 1
    for stage in data["stages"]:
        stage["blocks"][0]["token_mixer"]["grid_size"] = 1
    with pytest.raises(PlanError, match=r"stages\.3\.downsample: .*height is 13 \(odd\)"):
        resolve(EncoderSpec.model_validate(data))
    data = hfactory.load_preset("maxvit_tiny_tf_224").model_dump(mode="json", exclude_none=True)
    data["stages"][1]["blocks"][1]["token_mixer"]["kernel_size"] = 4
    with pytest.raises(PlanError, match=r"stages\.1\.blocks\.1\.token_mixer\.kernel_size"):
        resolve(EncoderSpec.model_validate(data))


def test_state_dict_of_another_size_is_refused_naming_keys_and_shapes():
    ref = maxxvit.MaxxVit(small_cfg(), img_size=64, num_classes=10)
    other = hfactory.build_encoder(hfactory.convert.maxvit.spec_from_timm_maxvit(
        maxxvit.MaxxVit(small_cfg(embed_dim=(32, 48, 64, 128)), img_size=64, num_classes=10)))
    with pytest.raises(ValueError, match=r"maxvit state dict does not fit.*shape mismatch: "
                                         r"stages\.3\.downsample\.\S+: \(\d+, \d+, 1, 1\) vs model \(\d+"):
        from_timm_state_dict(ref.state_dict(), other)


def test_unsupported_timm_variant_is_refused():
    coat = maxxvit.MaxxVit(maxxvit.MaxxVitCfg(embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1),
                                              block_type=("C", "C", "T", "T"), stem_width=16), img_size=64)
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0: MbConvBlock is not a MaxViT block"):
        from_timm(coat)


def test_bias_einsum_lookup_is_swins_index_gather():
    from hfactory.layers.maxvit import PartitionAttention
    from hfactory.layers.swin import relative_position_index

    attn = PartitionAttention(dim=8, num_heads=2, dim_head=4, partition="grid", partition_size=[3, 2])
    index = relative_position_index((3, 2))
    expected = attn.relative_position_bias_table[index.reshape(-1)].reshape(6, 6, 2).permute(2, 0, 1)
    torch.testing.assert_close(attn.relative_position_bias(), expected, rtol=0, atol=0)


#: timm's other TF sizes from the tiny preset: widths x1.5 (small, base) or x2 (large) with the
#: head dimension kept at 32, base and large deepen stages 1-2 from 2 and 5 MaxViT blocks to 6 and
#: 14 (hfactory blocks 3d - 1: 5 -> 17 and 14 -> 41). The stem is not a stage width: it stays 64
#: in small and base, and large's 128 is an ordinary override of stage 0's downsampler.
TF_SIZES = {
    "maxvit_small_tf_224": ({"width_multiplier": 1.5}, None),
    "maxvit_base_tf_224": ({"width_multiplier": 1.5, "depth_multiplier": [1, 17 / 5, 41 / 14, 1]}, None),
    "maxvit_large_tf_224": ({"width_multiplier": 2, "depth_multiplier": [1, 17 / 5, 41 / 14, 1]}, 128),
}


@pytest.mark.parametrize("name", list(TF_SIZES))
def test_named_sizes_from_scaling_rule(name):
    from hfactory.spec.variants import scale

    rule, stem_width = TF_SIZES[name]
    spec = scale(hfactory.load_preset("maxvit_tiny_tf_224"), rule, name=name)
    if stem_width is not None:
        down = spec.model_dump(mode="json", exclude_none=True)["stages"][0]["downsample"]
        down["stem"]["width"] = stem_width
        spec = spec.with_changes({"stages.0.downsample": down})
    with torch.device("meta"):  # timm's own count, on the meta device
        ref = timm.create_model(name, pretrained=False)
        model = hfactory.build_encoder(spec)
    assert count(model) == count(ref), name
    assert [(s.depth, s.num_heads) for s in model.plan.stages] == [
        (3 * len(st.blocks) - 1, st.blocks[0].attn_block.attn.num_heads) for st in ref.stages]
