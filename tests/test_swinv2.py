"""Swin V2 (arXiv 2111.09883) from a spec: the preset reproduces timm's swinv2_tiny_window8_256
exactly (parameter count, logits, every stage map), and depth/width variants convert and match
timm at other image sizes (windows clipped to the grid, grids padded to the window as timm pads
them), with pretrained window sizes too."""

import json
import math

import pytest
import timm
import torch

from hfactory import PlanError, load_spec, resolve
from hfactory.convert import from_timm, from_timm_state_dict
from hfactory.convert.swinv2 import map_swinv2
from hfactory.encoder import build_encoder
from hfactory.layers.attention import attention_backend
from hfactory.layers.swinv2 import WindowAttentionV2
from hfactory.presets import load_preset
from reference_utils import assert_rel_close, randomize_

PRESET = "swinv2_tiny_window8_256"
# a small Swin V2 by timm kwargs: 4 stages, shifted blocks in each, fast on CPU
SMALL = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))


def timm_swinv2(seed=0, clamp_one=True, **kw):
    """timm's model with random weights; logit scales spread around log(10), with ``clamp_one``
    one above the clamp at log(100) (so the clamp matters)."""
    ref = randomize_(timm.create_model(PRESET, pretrained=False, **kw), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.5 * torch.randn(p.shape, generator=g))
        if clamp_one:
            ref.layers[0].blocks[1].attn.logit_scale[0] = 6.0  # > log(100): clamped
    return ref.eval()


def assert_matches(ours, ref, x, what):
    with torch.no_grad():
        ref_final, ref_maps = ref.forward_intermediates(x)  # NCHW maps, NHWC normed final
        our_final, our_maps = ours.forward_intermediates(x)
        assert_rel_close(ours.forward_head(our_final), ref.forward_head(ref_final), what=f"{what} logits")
    assert len(our_maps) == len(ref_maps) == 4
    for i, (o, r) in enumerate(zip(our_maps, ref_maps)):
        assert_rel_close(o, r, what=f"{what} stage {i}")
    assert_rel_close(our_final, ref_final.permute(0, 3, 1, 2), what=f"{what} final normed map")


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = timm_swinv2()
    return ref, from_timm(ref).eval()


def test_preset_has_timms_parameter_count_and_keys(tiny_pair):
    ref, ours = tiny_pair
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == 28_347_154  # timm's swinv2_tiny_window8_256
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert len(ours.state_dict()) == len(ref.state_dict()) == 221  # buffers are non-persistent in both
    assert ours.spec.name == PRESET
    assert ours.plan == resolve(load_preset(PRESET))  # spec_from_timm gives back the preset, number for number


def test_logits_and_every_stage_map_match_timm(tiny_pair):
    ref, ours = tiny_pair
    assert_matches(ours, ref, torch.randn(1, 3, 256, 256), "256")


@pytest.mark.parametrize("img_size,extra", [
    (224, {}),  # grids 56/28/14/7: stages 1-2 padded to 32/16 (shifted), stage 3 window clipped to 7
    (96, {"pretrained_window_sizes": (6, 6, 6, 4)}),  # 24/12/6/3: stage 1 padded to 16, stages 2-3 clipped
])
def test_variant_matches_timm_at_other_sizes(img_size, extra):
    ref = timm_swinv2(seed=1, **SMALL, img_size=img_size, num_classes=10, **extra)
    ours = from_timm(ref).eval()
    assert [s.depth for s in ours.plan.stages] == [2, 2, 2, 2]
    assert [s.out_chs for s in ours.plan.stages] == [32, 64, 128, 256]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    for stage, blk in zip(ours.plan.stages, ref.layers):  # the plan's geometry is timm's, block by block
        for b, tb in zip(stage.blocks, blk.blocks):
            assert tuple(b.token_mixer["window_size"]) == tuple(tb.window_size)
            assert tuple(b.token_mixer["shift_size"]) == tuple(tb.shift_size)
    assert_matches(ours, ref, torch.randn(1, 3, img_size, img_size), str(img_size))


def test_plan_shows_window_shift_and_padding_per_block():
    data = json.loads(resolve(load_preset(PRESET)).to_json())
    got = [[(b["token_mixer"]["window_size"], b["token_mixer"]["shift_size"], b["token_mixer"]["padded_grid"])
            for b in s["blocks"]] for s in data["stages"]]
    assert got[0] == [([8, 8], [0, 0], [64, 64]), ([8, 8], [4, 4], [64, 64])]
    assert got[2] == [([8, 8], [0, 0], [16, 16]), ([8, 8], [4, 4], [16, 16])] * 3
    assert got[3] == [([8, 8], [0, 0], [8, 8])] * 2  # the 8x8 grid is one window: no shift (timm)
    assert data["stages"][1]["downsample"]["norm"]["dim"] == 192  # V2 norms after the reduction
    at224 = resolve(load_preset(PRESET), (224, 224))
    assert at224.stages[1].blocks[1].token_mixer["padded_grid"] == [32, 32]
    assert at224.stages[3].blocks[1].token_mixer["window_size"] == [7, 7]
    assert at224.stages[3].blocks[1].token_mixer["shift_size"] == [0, 0]


def test_odd_grids_are_padded_by_the_merging_and_masks_refuse_shifts():
    # 200 / 4 = 50 -> 25 tokens, merged to 13 as timm does (pad, then 2x2)
    plan = resolve(load_preset(PRESET), (200, 200))
    assert [tuple(s.out_grid) for s in plan.stages] == [(50, 50), (25, 25), (13, 13), (7, 7)]
    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    with pytest.raises(PlanError, match="'window_attention_v2' works on grid tokens"):
        resolve(load_spec({**spec, "mask_unit_size": 8}))  # shifted windows cross mask units: no MAE
    with pytest.raises(Exception, match="pretrained_window_size must be 0"):
        load_spec({**spec, "defaults": {**spec["defaults"], "token_mixer": {"kind": "window_attention_v2",
                                                                            "pretrained_window_size": -1}}})


def test_converter_detects_v2_drops_buffers_and_maps_official_checkpoints(tiny_pair):
    ref = timm.create_model(PRESET, pretrained=False, **SMALL)
    sd = ref.state_dict()
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    sd["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1)
    sd["layers.0.blocks.0.attn.k_bias"] = torch.zeros(1)
    official = {}  # the official repo's layout: downsample at the end of the previous stage, classifier "head"
    for k, v in sd.items():
        for i in (1, 2, 3):
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        official[k.replace("head.fc.", "head.")] = v
    model = from_timm(ref)
    for state in (sd, official):
        mapped = from_timm_state_dict(state, model)  # detected as swinv2, not swin
        model.load_state_dict(mapped, strict=True)
        assert torch.equal(mapped["stages.1.downsample.reduction.weight"], sd["layers.1.downsample.reduction.weight"])
        assert torch.equal(mapped["stages.0.blocks.1.token_mixer.cpb_mlp.2.weight"],
                           sd["layers.0.blocks.1.attn.cpb_mlp.2.weight"])
    with pytest.raises(ValueError, match=r"swinv2 state dict does not fit.*missing: stages\.2\.blocks\.2\."):
        from_timm_state_dict(sd, tiny_pair[1])


def test_no_weight_decay_matches_timms(tiny_pair):
    ref, ours = tiny_pair
    got = ours.no_weight_decay()
    assert set(map_swinv2({k: None for k in ref.no_weight_decay()})) == got
    assert len(got) == 12 * 4  # logit_scale, cpb_mlp.0.weight/.bias, cpb_mlp.2.weight per block
    assert got <= {n for n, _ in ours.named_parameters()}


def test_module_at_another_grid_equals_one_planned_for_it():
    from hfactory.spec.components import StageContext
    from hfactory.spec.swinv2 import WindowAttentionV2Params

    params = WindowAttentionV2Params(window_size=4)
    ctx = dict(loc="m", dim=16, num_heads=2, dim_head=8, block_index=1)
    kw = params.resolve(StageContext(grid=(8, 12), **ctx))
    kw.pop("kind")
    mod = randomize_(WindowAttentionV2(**kw)).eval()
    for other in ((10, 13), (3, 9)):  # padded and shifted; clipped to 3 rows without a row shift
        kw2 = params.resolve(StageContext(grid=other, **ctx))
        kw2.pop("kind")
        planned = WindowAttentionV2(**kw2)
        planned.load_state_dict(mod.state_dict())
        y = torch.randn(2, *other, 16)
        with torch.no_grad():
            assert_rel_close(mod(y), planned.eval()(y), rel=1e-6, what=f"grid {other}")


def test_sdpa_and_math_backends_agree_and_backward_reaches_every_parameter():
    # no clamped scale (its gradient is zero) and no drop path (a dropped branch gets none)
    # 24x24 / 12x12 tokens: shifted windows, the second grid padded to 16x16; then clipped windows
    ref = timm_swinv2(seed=2, clamp_one=False, **SMALL, img_size=96, drop_path_rate=0.0)
    model = from_timm(ref).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        with attention_backend("math"):
            want = model(x)
        with attention_backend("sdpa"):
            got = model(x)
    assert_rel_close(got, want, what="sdpa vs math")
    model.train()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unshifted_windows_tiling_the_mask_unit_run_inside_units():
    # MAE: shift off and 4x4 windows tiling the 8x8 mask unit are unit-local; shifted ones are refused
    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    spec["defaults"]["token_mixer"].update(shift=False, window_size=4)
    spec.update(img_size=64, mask_unit_size=8, stages=spec["stages"][:2])
    plan = resolve(load_spec(spec))
    mixer = plan.stages[0].blocks[1].token_mixer
    assert mixer["per_unit"] and mixer["shift_size"] == [0, 0]
    assert "window_attention_v2 4x4 shift 0 in units" in str(plan)
    spec["defaults"]["token_mixer"].update(shift=True)
    with pytest.raises(PlanError, match="window_attention_v2"):
        resolve(load_spec(spec))


@pytest.mark.parametrize("name,rule", [
    ("swinv2_small_window8_256", {"depth_multiplier": [1, 1, 3, 1]}),
    ("swinv2_base_window8_256", {"depth_multiplier": [1, 1, 3, 1], "width_multiplier": 4 / 3}),
])
def test_named_sizes_from_scaling_rule(name, rule):
    """The other window-8 sizes are the tiny preset plus a scaling rule (timm's registrations:
    small deepens stage 3 to 18 blocks; base also widens 96 -> 128 with the head dimension kept
    at 32, so heads 4/8/16/32); parameter counts from timm's own model on the meta device."""
    from hfactory.spec.variants import scale

    spec = scale(load_preset(PRESET), rule, name=name)
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = build_encoder(spec)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), name
    assert [(s.depth, s.num_heads) for s in ours.plan.stages] == [
        (len(layer.blocks), layer.blocks[0].attn.num_heads) for layer in ref.layers]
