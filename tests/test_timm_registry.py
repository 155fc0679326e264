"""hfactory.timm: presets and user specs as timm models (timm 1.0.31 ``_registry.py``,
``_builder.py``, ``_features.py``).

Expectations come from outside the code under test: the architectures' papers and timm's own
models (widths 64/128/320/512 at strides 4/8/16/32 for CAFormer-S18, HVT's 196 -> 97 tokens),
timm's pretrained configs of the twins, timm's documented behaviour (``TypeError`` on unknown
arguments, ``RuntimeError`` without weights), and hand-computed shapes. Models are built on the
meta device where only shapes matter.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import hfactory  # noqa: E402
import hfactory.timm  # noqa: E402
from hfactory.errors import UsageError  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _create(name, **kwargs):
    return timm.create_model(name, **kwargs)


# ----------------------------------------------------------------------------------- registry


def test_every_preset_is_a_timm_model_with_a_config():
    names = [f"hfactory_{p}" for p in hfactory.list_models()]
    assert len(names) >= 14
    assert sorted(timm.list_models("hfactory_*", name_matches_cfg=True)) == sorted(names)
    assert sorted(timm.list_models("hfactory_*", module="timm_models")) == sorted(names)
    assert all(timm.is_model(n) for n in names)


def test_entrypoints_look_like_decorated_functions():
    fn = timm.models.model_entrypoint("hfactory_caformer_s18")
    assert fn.__name__ == fn.__qualname__ == "hfactory_caformer_s18"
    assert fn.__module__ == "hfactory.timm_models"
    assert "hfactory_caformer_s18" in hfactory.timm_models.__all__  # register_model adds it


# ---------------------------------------------------------------------------- create_model kwargs


def test_num_classes_and_features_only_out_indices():
    model = _create("hfactory_caformer_s18", num_classes=10, device="meta")
    assert model.num_classes == 10
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 10)
    assert model.head.fc.fc2.out_features == 10  # CAFormer's MLP head ends in fc2

    feats = _create("hfactory_caformer_s18", num_classes=10, features_only=True, out_indices=(1, 3)).eval()
    assert isinstance(feats, FeatureGetterNet)
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 64))
    # CAFormer-S18 (arXiv 2210.13452): widths 64/128/320/512 at strides 4/8/16/32
    assert [tuple(o.shape) for o in out] == [(1, 128, 8, 8), (1, 512, 2, 2)]
    assert feats.feature_info.channels() == [128, 512]
    assert feats.feature_info.reduction() == [8, 32]


def test_features_only_defaults_to_every_stage():
    feats = _create("hfactory_swin_tiny_patch4_window7_224", features_only=True, device="meta")
    # Swin-T (arXiv 2103.14030): 96/192/384/768 channels at strides 4/8/16/32
    assert feats.feature_info.channels() == [96, 192, 384, 768]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    out = feats(torch.empty(1, 3, 224, 224, device="meta"))
    assert [tuple(o.shape[1:]) for o in out] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]


def test_features_only_refuses_other_feature_classes():
    with pytest.raises(UsageError, match="'getter'"):
        _create("hfactory_poolformer_s12", features_only=True, feature_cls="list", device="meta")


def test_in_chans_changes_the_first_conv():
    model = _create("hfactory_poolformer_s12", in_chans=1, device="meta")
    first = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 1
    assert model.in_chans == 1
    assert model.forward_features(torch.empty(1, 1, 224, 224, device="meta")).shape == (1, 512, 7, 7)


def test_drop_path_rate_reaches_the_blocks():
    model = _create("hfactory_hvt_s_0", drop_path_rate=0.3, device="meta")
    rates = [m.p for m in model.modules() if type(m).__name__ == "DropPath"]
    # 12 blocks, two residual branches each, linear from 0 to 0.3 (timm / DeiT schedule)
    assert len(rates) == 24
    expected = [0.3 * i / 11 for i in range(12) for _ in range(2)]
    assert rates == pytest.approx(expected)


def test_global_pool_max():
    model = _create("hfactory_hvt_s_0", global_pool="max", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)  # HVT norms the map before pooling (head_norm_first)
        pooled = model(x)
    assert feats.shape == (2, 384, 4, 4)  # patch 16 on 64 px
    torch.testing.assert_close(pooled, feats.amax(dim=(2, 3)))


def test_img_size_resizes_the_position_embedding():
    model = _create("hfactory_hvt_s_0", img_size=128, device="meta")
    # patch 16: a 128 px image is an 8x8 grid (14x14 at 224)
    assert model.get_parameter("stages.0.pos_embed.pos_embed").shape == (1, 8, 8, 384)
    assert model.forward_features(torch.empty(1, 3, 128, 128, device="meta")).shape == (1, 384, 8, 8)
    rect = _create("hfactory_poolformer_s12", img_size=(256, 192), device="meta")
    assert rect.plan.img_size == (256, 192)


def test_device_meta_and_dtype_bfloat16():
    model = _create("hfactory_caformer_s18", device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in tensors)
    cpu = _create("hfactory_hvt_ti_1", dtype=torch.bfloat16)
    assert {p.dtype for p in cpu.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}


def test_unknown_kwarg_is_a_type_error():
    with pytest.raises(TypeError, match="not_a_model_arg"):
        _create("hfactory_poolformer_s12", not_a_model_arg=1, device="meta")


@pytest.mark.parametrize("name,natural", [("hfactory_caformer_s18", 32), ("hfactory_hvt_s_0", 16)])
def test_output_stride(name, natural):
    with pytest.raises(UsageError, match=f"output_stride={natural}"):
        _create(name, output_stride=8, device="meta")
    model = _create(name, output_stride=natural, device="meta")
    assert model.feature_info[-1]["reduction"] == natural


def test_pretrained_without_weights_is_timms_runtime_error():
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        _create("hfactory_poolformer_s12", pretrained=True, device="meta")


# ------------------------------------------------------------------------------- pretrained cfgs


@pytest.mark.parametrize("preset", sorted(hfactory.timm.TIMM_TWINS))
def test_cfg_preprocessing_is_the_twins(preset):
    ours = timm.models.get_pretrained_cfg(f"hfactory_{preset}")
    twin = timm.models.get_pretrained_cfg(hfactory.timm.TIMM_TWINS[preset])
    for field in ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
        assert getattr(ours, field) == getattr(twin, field), field


def test_twins_are_the_presets_named_as_timm_models():
    twins = hfactory.timm.TIMM_TWINS
    for preset in ("caformer_s18", "convformer_s18", "poolformer_s12", "poolformerv2_s12", "hiera_tiny_224",
                   "hiera_small_abswin_256", "swin_tiny_patch4_window7_224"):
        assert twins[preset] == preset
    assert not any(p.startswith("hvt_") for p in twins)
    assert "mae_hiera_tiny_224" not in twins
    assert all(timm.is_model(t) for t in twins.values())


def test_cfg_values_by_hand():
    cfg = timm.models.get_pretrained_cfg
    # timm's published configs: CAFormer crop 1.0, Hiera and Swin crop 0.9, all bicubic
    assert cfg("hfactory_caformer_s18").crop_pct == 1.0
    assert cfg("hfactory_hiera_tiny_224").crop_pct == 0.9
    assert cfg("hfactory_swin_tiny_patch4_window7_224").crop_pct == 0.9
    hvt = cfg("hfactory_hvt_s_1")  # no twin: timm's ImageNet defaults
    assert (hvt.mean, hvt.std, hvt.crop_pct, hvt.interpolation) == (IMAGENET_MEAN, IMAGENET_STD, 0.875, "bicubic")
    assert hvt.input_size == (3, 224, 224) and hvt.num_classes == 1000
    # final grids: 224/32 = 7; HVT-S-1 pools 196 tokens once (k3 s2): 97, a (97, 1) map;
    # MAE Hiera-T keeps 14x14 (its last stage does not pool)
    assert cfg("hfactory_caformer_s18").pool_size == (7, 7)
    assert hvt.pool_size == (97, 1)
    assert cfg("hfactory_mae_hiera_tiny_224").pool_size == (14, 14)
    assert cfg("hfactory_hiera_small_abswin_256").input_size == (3, 256, 256)
    assert cfg("hfactory_hiera_small_abswin_256").pool_size == (8, 8)
    assert cfg("hfactory_caformer_s18").classifier == "head.fc.fc2"
    assert cfg("hfactory_swin_tiny_patch4_window7_224").classifier == "head.fc"
    # only MaxViT's 7x7 windows and grids tile no size next to 224 (timm marks its twin fixed too)
    fixed = {p for p in hfactory.list_models() if cfg(f"hfactory_{p}").fixed_input_size}
    assert fixed == ({"maxvit_tiny_tf_224"} & set(hfactory.list_models()))
    assert not any(cfg(f"hfactory_{p}").has_weights for p in hfactory.list_models())


@pytest.mark.parametrize("preset", hfactory.list_models())
def test_cfg_names_real_parameters_and_the_final_grid(preset):
    name = f"hfactory_{preset}"
    cfg = timm.models.get_pretrained_cfg(name)
    model = _create(name, num_classes=5, device="meta")  # num_classes > 0: the classifier exists
    keys = model.state_dict().keys()
    assert f"{cfg.first_conv}.weight" in keys
    assert f"{cfg.classifier}.weight" in keys and model.get_submodule(cfg.classifier).out_features == 5
    assert model.get_submodule(cfg.first_conv).weight.shape[1] == cfg.input_size[0]
    out = model.forward_features(torch.empty(1, *cfg.input_size, device="meta"))
    assert tuple(out.shape[2:]) == cfg.pool_size


# ------------------------------------------------------------------------------------- register()


def test_register_a_yaml_spec(tmp_path):
    fn = hfactory.timm.register("hfx_test_digits_hybrid", EXAMPLES / "digits_hybrid.yaml")
    assert fn.__name__ == "hfx_test_digits_hybrid"
    assert "hfx_test_digits_hybrid" in timm.list_models(name_matches_cfg=True)
    cfg = timm.models.get_pretrained_cfg("hfx_test_digits_hybrid")
    # the example: 1 channel, 32x32 px, 10 classes; strides 2, 2, 2 leave a 4x4 grid
    assert (cfg.input_size, cfg.num_classes, cfg.pool_size) == ((1, 32, 32), 10, (4, 4))
    model = _create("hfx_test_digits_hybrid").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    feats = _create("hfx_test_digits_hybrid", features_only=True)
    assert feats.feature_info.channels() == [32, 64, 128]


def test_register_a_dict_and_load_weights_through_timm(tmp_path):
    from safetensors.torch import save_file

    spec = {"name": "tiny", "img_size": 32, "num_classes": 3,
            "stages": [{"embedding": 8, "depth": 1, "token_mixer": "pooling", "patch_size": 4, "stride": 4},
                       {"embedding": 16, "depth": 1, "token_mixer": "attention", "num_heads": 2}]}
    hfactory.timm.register("hfx_test_tiny_dict", spec)
    source = _create("hfx_test_tiny_dict").eval()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = _create("hfx_test_tiny_dict", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    assert timm.models.get_pretrained_cfg("hfx_test_tiny_dict").pool_size == (4, 4)  # 32 / (4 * 2)


def test_register_a_fixed_size_spec():
    spec = hfactory.load_spec(EXAMPLES / "caformer_s18_downsamplers.yaml").with_changes(
        {"defaults.downsample": {"kind": "sp_lin"}})  # token-axis Linear: weights sized for the grid
    hfactory.timm.register("hfx_test_sp_lin", spec)
    cfg = timm.models.get_pretrained_cfg("hfx_test_sp_lin")
    assert cfg.fixed_input_size is True
    model = _create("hfx_test_sp_lin", device="meta")  # timm passes img_size for fixed models
    assert model.plan.img_size == (224, 224)


@pytest.mark.parametrize("name,bad", [("my.model", "'.'"), ("org/model", "'/'"), ("hf-hub:model", "':'"),
                                      ("a\\b", repr("\\")), ("", "is not a model name")])
def test_register_refuses_names_timm_cannot_hold(name, bad):
    with pytest.raises(UsageError, match=re.escape(bad)):
        hfactory.timm.register(name, EXAMPLES / "digits_hybrid.yaml")


def test_register_refuses_taken_names():
    with pytest.raises(UsageError, match="already a timm model"):
        hfactory.timm.register("resnet18", EXAMPLES / "digits_hybrid.yaml")
    with pytest.raises(UsageError, match="preset"):
        hfactory.timm.register("hfactory_caformer_s18", EXAMPLES / "digits_hybrid.yaml")


# --------------------------------------------------------------------------------- reset_classifier


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = _create("hfactory_caformer_s18", device="meta").eval()
    model.to(dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(4)
    params = list(model.get_classifier().parameters())
    assert params and all(p.device.type == "meta" and p.dtype == torch.float64 for p in params)
    assert not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in params)  # a new classifier trains
    assert model.num_classes == 4 and model.head.fc.fc2.out_features == 4


def test_reset_classifier_leaves_a_frozen_backbone_frozen():
    model = _create("hfactory_swin_tiny_patch4_window7_224", device="meta")
    model.requires_grad_(False)
    model.reset_classifier(0)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    model.reset_classifier(7)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}
    assert model.head.fc.weight.shape[0] == 7
