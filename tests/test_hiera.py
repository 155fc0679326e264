"""Hiera presets against their references: timm (hiera_tiny_224, hiera_small_abswin_256, depth /
width variants) and the official ``hiera`` package (hiera_tiny_224), after weight conversion.

Protocol (issue 4): references built with ``pretrained=False`` and randomised
(:func:`reference_utils.randomize_`), eval, fp32, batch 2; logits and every stage map agree to
``max|diff| <= 1e-4 * max|ref|``. Also: resolution flexibility (256x256 and 320x256, weights of
one resolution loading into a model built for another), the abs-win position embedding
(arXiv 2311.05613) on its own, and the plan's errors.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import yaml

import hfactory
from hfactory import PlanError, load_spec, resolve
from hfactory.convert import from_hiera_state_dict, from_timm, from_timm_state_dict
from hfactory.convert.hiera import spec_from_timm_hiera
from hfactory.layers.posembed import resize_pos_embed as resize_grid
from hfactory.encoder import load_checked
from hfactory.layers.posembed import resize_pos_embed
from hfactory.presets import create_model, load_preset, preset_path

from reference_utils import assert_rel_close, randomize_

NATIVE = {"hiera_tiny_224": (224, 224), "hiera_small_abswin_256": (256, 256)}
REL = 1e-4


def timm_hiera(name: str, **kwargs):
    """A timm Hiera built with ``pretrained=False``; its init is skipped (every weight is then
    randomised or loaded, and init is the slow part of building)."""
    return timm.create_model(name, pretrained=False, weight_init="skip", **kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(hw, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def timm_outputs(ref, x):
    """timm Hiera: (logits, stage maps NCHW) from one pass."""
    final, maps = ref.forward_intermediates(x)
    return ref.forward_head(final), maps


def our_outputs(model, x, output_fmt="NCHW"):
    final, maps = model.forward_intermediates(x, output_fmt=output_fmt)
    return model.forward_head(final), maps


def assert_same(ours, ref, what):
    """Logits and every stage map within REL; returns the worst ratio."""
    (logits, maps), (ref_logits, ref_maps) = ours, ref
    assert len(maps) == len(ref_maps)
    worst = assert_rel_close(logits, ref_logits, REL, f"{what} logits")
    for i, (m, r) in enumerate(zip(maps, ref_maps)):
        worst = max(worst, assert_rel_close(m, r, REL, f"{what} stage {i}"))
    return worst


@pytest.fixture(scope="module", params=list(NATIVE))
def pair(request):
    """(preset name, randomised timm reference, the preset built by hfactory with its weights)."""
    name = request.param
    torch.manual_seed(0)
    ref = randomize_(timm_hiera(name)).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(from_timm_state_dict(ref.state_dict(), ours), strict=True)
    return name, ref, ours


# ------------------------------------------------------------------------------------ exactness


def test_preset_matches_timm(pair):
    name, ref, ours = pair
    assert n_params(ours) == n_params(ref)
    x = images(NATIVE[name])
    with torch.no_grad():
        assert_same(our_outputs(ours, x), timm_outputs(ref, x), name)


def test_spec_from_timm_reproduces_the_preset(pair):
    name, ref, ours = pair
    # from_timm builds from this spec; read off the timm model, it plans exactly as the preset
    assert resolve(load_spec(spec_from_timm_hiera(ref))) == ours.plan


@pytest.mark.parametrize("name", list(NATIVE))
def test_width_depth_variant_converts_via_from_timm(name):
    ref = randomize_(timm_hiera(name, stages=(1, 1, 3, 1), embed_dim=64, num_heads=2)).eval()
    ours = from_timm(ref).eval()
    assert [s.out_chs for s in ours.plan.stages] == [64, 128, 256, 512]
    assert [s.num_heads for s in ours.plan.stages] == [2, 4, 8, 16]
    assert n_params(ours) == n_params(ref)
    x = images(NATIVE[name])
    with torch.no_grad():
        assert_same(our_outputs(ours, x), timm_outputs(ref, x), f"{name} 64-wide")


def test_yaml_edited_variant_converts_from_timm_state_dict():
    name = "hiera_small_abswin_256"
    spec = yaml.safe_load(preset_path(name).read_text())
    spec["stages"][2]["depth"] = 5
    ours = hfactory.build_encoder(spec).eval()
    ref = randomize_(timm_hiera(name, stages=(1, 2, 5, 2))).eval()
    ours.load_state_dict(from_timm_state_dict(ref.state_dict(), ours), strict=True)
    assert n_params(ours) == n_params(ref)
    x = images(NATIVE[name])
    with torch.no_grad():
        assert_same(our_outputs(ours, x), timm_outputs(ref, x), f"{name} depth 5")


def test_foreign_state_dicts_fail_naming_keys(pair):
    name, ref, ours = pair
    other = "hiera_small_abswin_256" if name == "hiera_tiny_224" else "hiera_tiny_224"
    with torch.device("meta"):  # shapes only: conversion checks keys and shapes before loading
        wrong_arch = create_model(other)
        small = timm_hiera(name, stages=(1, 1, 3, 1), embed_dim=64, num_heads=2)  # another size
    with pytest.raises(ValueError) as err:
        from_timm_state_dict(ref.state_dict(), wrong_arch)
    # one side has the window embedding and LayerScale, the other the expansion projections
    for key in ("stages.0.pos_embed.pos_embed_win", "stages.0.blocks.0.layer_scale1.scale",
                "stages.1.blocks.0.proj.weight"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match=r"missing: .*stages\.2\.blocks\.3.*shape mismatch: "
                                         r"stages\.0\.downsample\.conv\.weight"):
        from_timm_state_dict(small.state_dict(), ours)


# ------------------------------------------------------------------------------ backbone API


def test_no_weight_decay_lists_position_embeddings(pair):
    name, ref, ours = pair
    expected = {"stages.0.pos_embed.pos_embed"}
    if "abswin" in name:
        expected.add("stages.0.pos_embed.pos_embed_win")
    assert ours.no_weight_decay() == expected
    params = dict(ours.named_parameters())
    assert all(k in params for k in expected)
    # timm lists only "pos_embed" for abswin (timm 1.0.31 Hiera.no_weight_decay)
    assert {f"stages.0.pos_embed.{k}" for k in ref.no_weight_decay()} <= expected


def test_feature_info_modules_are_real_and_match_the_maps(pair):
    name, ref, ours = pair
    modules = dict(ours.named_modules())
    x = images(NATIVE[name], batch=1)
    with torch.no_grad():
        maps = ours.forward_intermediates(x, intermediates_only=True)
    for info, m, ref_info in zip(ours.feature_info, maps, ref.feature_info):
        assert info["module"] in modules
        assert m.shape[1] == info["num_chs"] == ref_info["num_chs"]
        assert x.shape[-1] // m.shape[-1] == info["reduction"] == ref_info["reduction"]


def test_backward_reaches_every_parameter(pair):
    name, _, ours = pair
    model = copy.deepcopy(ours).train()
    model(images((64, 64), batch=1)).logsumexp(-1).sum().backward()  # 16x16 tokens: 2x2 mask units
    dead = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead[:5]}"


# ------------------------------------------------------------------------- other resolutions


def _timm_at(name, ref, ours, hw):
    """timm's model built for ``hw`` with the same weights (its built model cannot change size);
    a learned pos_embed gets what our encoder interpolates at run time."""
    twin = timm_hiera(name, img_size=hw).eval()
    state = ref.state_dict()
    if "abswin" not in name:
        pe = resize_pos_embed(ours.stages[0].pos_embed.pos_embed.detach(), (hw[0] // 4, hw[1] // 4))
        state["pos_embed"] = pe.reshape(1, -1, pe.shape[-1])
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("hw", [(256, 256), (320, 256)], ids=["256x256", "320x256"])
def test_runs_at_other_sizes_with_the_plans_shapes(pair, hw):
    name, ref, ours = pair
    if hw == NATIVE[name]:
        pytest.skip("native size: test_preset_matches_timm")
    plan = resolve(ours.spec, img_size=hw)
    x = images(hw, batch=1)
    with torch.no_grad():
        out = our_outputs(ours, x)
        for m, s in zip(out[1], plan.stages):
            assert tuple(m.shape) == (1, s.out_chs, *s.out_grid)
        if hw == (320, 256):  # and the numbers of timm's model built for that size
            assert_same(out, timm_outputs(_timm_at(name, ref, ours, hw), x), f"{name} at {hw}")


def test_224_weights_load_into_a_model_built_for_256(pair):
    name, ref, ours = pair
    if name != "hiera_tiny_224":
        pytest.skip("abs-win embeddings have resolution-independent shapes")
    at256 = create_model(name, img_size=256).eval()
    # timm weights (pos_embed (1, 3136, 96)) -> resized to our 64x64 grid on conversion
    at256.load_state_dict(from_timm_state_dict(ref.state_dict(), at256), strict=True)
    pe = at256.stages[0].pos_embed.pos_embed
    assert tuple(pe.shape) == (1, 64, 64, 96)
    torch.testing.assert_close(pe, resize_grid(ours.stages[0].pos_embed.pos_embed, (64, 64)))
    # hfactory weights saved at 224 -> load_checked resizes on load, same result
    with torch.no_grad():
        pe.zero_()
    load_checked(at256, ours.state_dict())
    torch.testing.assert_close(at256.stages[0].pos_embed.pos_embed, resize_grid(ours.stages[0].pos_embed.pos_embed,
                                                                               (64, 64)))
    x = images((256, 256), batch=1)
    with torch.no_grad():  # the 224 model interpolates at run time: the same numbers
        assert_rel_close(at256(x), ours(x), 1e-5, "built for 256 vs run at 256")


def test_abs_win_weights_load_at_any_size(pair):
    name, _, ours = pair
    if "abswin" not in name:
        pytest.skip("abs-win only")
    other = create_model(name, img_size=(320, 256))
    other.load_state_dict(ours.state_dict(), strict=True)  # no resizing needed


def test_sizes_the_mask_units_do_not_tile_fail_in_the_plan(pair):
    name, _, ours = pair
    with pytest.raises(PlanError, match="mask unit 8x8 does not tile") as err:
        resolve(ours.spec, img_size=(240, 256))  # 60 tokens high
    assert err.value.loc == "mask_unit_size"
    with pytest.raises(PlanError):
        ours(torch.zeros(1, 3, 240, 256))


# ----------------------------------------------------------------------- the hiera package


@pytest.fixture(scope="module")
def package_pair():
    hiera = pytest.importorskip("hiera")
    torch.manual_seed(0)
    ref = randomize_(hiera.hiera_tiny_224(pretrained=False)).eval()
    ours = create_model("hiera_tiny_224").eval()
    ours.load_state_dict(from_hiera_state_dict({"model_state": ref.state_dict()}, ours), strict=True)
    return ref, ours


def test_hiera_package_tiny_matches(package_pair):
    ref, ours = package_pair
    assert n_params(ours) == n_params(ref)
    x = images((224, 224))
    # In eval the package's Head applies softmax (act_func); take its logits before that.
    act, ref.head.act_func = ref.head.act_func, (lambda t: t)
    try:
        with torch.no_grad():
            ref_logits, ref_maps = ref(x, return_intermediates=True)
            logits, maps = our_outputs(ours, x, output_fmt="NHWC")  # the package's maps are NHWC
    finally:
        ref.head.act_func = act
    assert_same((logits, maps), (ref_logits, ref_maps), "hiera package")
    torch.testing.assert_close(logits.softmax(-1), act(ref_logits), atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------- abs-win, plan and errors


def _grid_spec(**pos):
    return {"img_size": [64, 48], "num_classes": 0, "stages": [
        {"embedding": 32, "depth": 1, "patch_size": 4, "num_heads": 2,
         "pos_embed": {"kind": "abs_win", **pos}}]}


def test_abs_win_is_global_interpolated_plus_tiled_window():
    model = hfactory.build_encoder(_grid_spec(global_pos_size=[8, 6], window_size=[4, 3])).eval()
    pe = model.stages[0].pos_embed
    with torch.no_grad():
        emb = pe.embedding((16, 12))
        # 8x6 -> 16x12 is an exact 2x upsample; subtracting it leaves the tiled window
        glob = torch.nn.functional.interpolate(pe.pos_embed.permute(0, 3, 1, 2), size=(16, 12), mode="bicubic",
                                               antialias=True).permute(0, 2, 3, 1)
        win = emb - glob
    for i in range(16):
        for j in range(12):
            torch.testing.assert_close(win[0, i, j], pe.pos_embed_win[0, i % 4, j % 3])
    assert tuple(pe.pos_embed.shape) == (1, 8, 6, 32) and tuple(pe.pos_embed_win.shape) == (1, 4, 3, 32)
    # at the global size itself the interpolation is the identity
    same = hfactory.build_encoder(_grid_spec(global_pos_size=[16, 12], window_size=[4, 3])).stages[0].pos_embed
    with torch.no_grad():
        torch.testing.assert_close(same.embedding((16, 12)) - same.pos_embed_win.repeat(1, 4, 4, 1),
                                   same.pos_embed, atol=1e-6, rtol=0)


def test_abs_win_needs_a_window_that_tiles_the_grid():
    with pytest.raises(PlanError, match="no window size is known") as err:
        resolve(hfactory.load_spec(_grid_spec()))
    assert err.value.loc == "stages.0.pos_embed.window_size"
    with pytest.raises(PlanError, match="does not tile the token grid 16x12") as err:
        resolve(hfactory.load_spec(_grid_spec(window_size=5)))
    assert err.value.loc == "stages.0.pos_embed.window_size"
    plan = resolve(load_preset("hiera_small_abswin_256"))
    assert plan.stages[0].pos_embed["window_size"] == [8, 8]
    assert plan.stages[0].pos_embed["global_pos_size"] == [16, 16]


def test_max_avg_expansion_needs_double_width():
    spec = yaml.safe_load(preset_path("hiera_small_abswin_256").read_text())
    spec["stages"][1]["embedding"] = 256
    spec["stages"][1]["num_heads"] = 2
    with pytest.raises(PlanError, match="embedding must be 192") as err:
        hfactory.build_encoder(spec)
    assert err.value.loc == "stages.1.downsample.expand"


def test_anisotropic_q_stride_in_mask_units_runs_with_the_plans_shapes():
    # Regression: the units grid used to be rebuilt from one (height) reduction, so a q_stride of
    # (2, 1) crashed in forward although the plan accepted it.
    spec = hfactory.load_spec({
        "name": "aniso", "img_size": 32, "num_classes": 5, "mask_unit_size": [4, 4],
        "stages": [{"embedding": 8, "depth": 1, "token_mixer": "mask_unit_attention", "num_heads": 1,
                    "downsample": {"kind": "conv", "patch_size": 2}},
                   {"embedding": 16, "depth": 1, "token_mixer": "mask_unit_attention", "num_heads": 1,
                    "downsample": {"kind": "q_pool", "q_stride": [2, 1]}}]})
    plan = hfactory.resolve(spec)
    model = hfactory.build_encoder(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert model(x).shape == (2, 5)
    assert [tuple(m.shape) for m in maps] == [(2, s.out_chs, *s.out_grid) for s in plan.stages]
    assert plan.stages[1].out_grid == (8, 16)
