"""HierarchicalEncoder: shapes equal the plan's, timm's backbone API with one behaviour,
save/load with the spec, determinism."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import hfactory
from hfactory import PlanError, load_spec, resolve
from hfactory.encoder import HierarchicalEncoder, feature_take_indices

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = {
    "img_size": 64, "num_classes": 7, "drop_path_rate": 0.1,
    "defaults": {"layer_scale": 1e-5},
    "stages": [
        {"embedding": 16, "depth": 1, "patch_size": 4, "token_mixer": "sepconv", "pos_embed": "learned"},
        {"embedding": 32, "depth": 2, "token_mixer": "pooling", "norm": "groupnorm", "res_scale": True,
         "residual_norm_style": "post"},
        {"embedding": 64, "depth": 1, "num_heads": 2},
    ],
}


@pytest.fixture
def small():
    return hfactory.build_encoder(SMALL).eval()


def example_specs():
    return sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.name)
@pytest.mark.parametrize("hw", [(224, 224), (224, 160)])
def test_examples_run_with_the_plans_stage_shapes(path, hw):
    spec = load_spec(path)
    model = hfactory.build_encoder(spec).eval()
    plan = resolve(spec, img_size=hw)
    x = torch.randn(2, spec.in_chans, *hw)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        logits = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, s.out_chs, *s.out_grid) for s in plan.stages]
    assert final.shape == maps[-1].shape
    assert logits.shape == (2, spec.num_classes)
    assert torch.isfinite(logits).all()


def test_forward_features_is_nchw_and_head_pre_logits(small):
    x = torch.randn(2, 3, 64, 64)
    feats = small.forward_features(x)
    assert feats.shape == (2, 64, 4, 4)
    assert small.forward_head(feats, pre_logits=True).shape == (2, 64)
    torch.testing.assert_close(small.forward_head(feats), small(x))


def test_backward_reaches_every_parameter():
    model = hfactory.build_encoder(SMALL).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_forward_intermediates_indices_formats_and_flags(small):
    x = torch.randn(1, 3, 64, 64)
    full = small.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1] for m in full] == [16, 32, 64]
    last2 = small.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [m.shape[1] for m in last2] == [32, 64]
    torch.testing.assert_close(last2[0], full[1])
    picked = small.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert [m.shape[1] for m in picked] == [16, 64]
    nhwc = small.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], full[0].permute(0, 2, 3, 1))
    final, early = small.forward_intermediates(x, indices=[0], stop_early=True)
    assert final.shape == (1, 16, 16, 16) and len(early) == 1
    normed = small.forward_intermediates(x, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[0], full[0])
    expected = small.norm(full[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(normed[-1], expected)
    assert not torch.allclose(normed[-1], full[-1])
    for bad in ([3], [-4], 0, 4):
        with pytest.raises(ValueError, match="range|1 <= n"):
            small.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        small.forward_intermediates(x, output_fmt="NLC")


def test_feature_take_indices_matches_timm():
    from timm.models._features import feature_take_indices as timm_take

    for idx in (None, 1, 3, [0, 2], [-1], [1, -1]):
        ours = feature_take_indices(4, idx)
        theirs = timm_take(4, idx)
        assert ours[0] == list(theirs[0]) and ours[1] == theirs[1]


def test_feature_info_modules_are_real(small):
    info = small.feature_info
    assert [(f["num_chs"], f["reduction"]) for f in info] == [(16, 4), (32, 8), (64, 16)]
    for f in info:
        small.get_submodule(f["module"])


def test_timm_feature_getter_wraps_the_encoder(small):
    # timm's forward_intermediates-based wrapper (features_only, feature_cls='getter')
    from timm.models._features import FeatureGetterNet

    x = torch.randn(1, 3, 64, 64)
    expected = small.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    getter = FeatureGetterNet(small, out_indices=(1, 2))
    got = getter(x)
    assert [tuple(t.shape) for t in got] == [(1, 32, 8, 8), (1, 64, 4, 4)]
    torch.testing.assert_close(got[0], expected[0])


def test_reset_classifier_updates_spec_and_head(small):
    x = torch.randn(2, 3, 64, 64)
    small.reset_classifier(0)
    assert small(x).shape == (2, 64) and small.spec.num_classes == 0
    small.reset_classifier(11, global_pool="max")
    assert small(x).shape == (2, 11) and small.spec.global_pool == "max"
    assert small.get_classifier().out_features == 11
    with pytest.raises(ValidationError, match="global_pool"):
        small.reset_classifier(3, global_pool="median")


def test_prune_intermediate_layers_then_save_and_reload(small, tmp_path):
    before = sum(p.numel() for p in small.parameters())
    assert small.prune_intermediate_layers([0, 1]) == [0, 1]
    x = torch.randn(1, 3, 64, 64)
    assert len(small.stages) == 2 and small.num_features == 32
    assert small(x).shape == (1, 32)
    assert sum(p.numel() for p in small.parameters()) < before
    assert small.forward_intermediates(x, intermediates_only=True)[-1].shape == (1, 32, 8, 8)
    small.save_pretrained(tmp_path)
    again = hfactory.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(x), small(x))


def test_no_weight_decay_is_complete_and_real(small):
    names = dict(small.named_parameters())
    nwd = small.no_weight_decay()
    assert nwd == {"stages.0.pos_embed.pos_embed"}
    assert nwd <= set(names)


def test_group_matcher_groups_every_parameter(small):
    from timm.models._manipulate import group_parameters

    for coarse in (True, False):
        groups = group_parameters(small, small.group_matcher(coarse=coarse))
        grouped = {n for names in groups.values() for n in names}
        assert grouped == {n for n, _ in small.named_parameters()}
        assert len(groups) >= 3


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = hfactory.build_encoder({**SMALL, "drop_path_rate": 0.0}).train()
    b = hfactory.build_encoder({**SMALL, "drop_path_rate": 0.0}).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    assert b.grad_checkpointing and not a.grad_checkpointing
    x = torch.randn(2, 3, 64, 64)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_save_and_load_round_trip(small, tmp_path):
    small.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "spec.yaml"]
    again = hfactory.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)
    assert again.spec == small.spec


def test_weights_of_another_spec_are_refused_naming_keys(small, tmp_path):
    from safetensors.torch import load_file, save_file

    small.save_pretrained(tmp_path)
    other = {**SMALL, "stages": [dict(SMALL["stages"][0], embedding=24)] + SMALL["stages"][1:]}
    (tmp_path / "spec.yaml").write_text(hfactory.dump_spec(load_spec(other)))
    with pytest.raises(ValueError, match="was saved for spec hash .* the spec was changed after saving"):
        hfactory.from_pretrained(tmp_path)
    # weights without the hash (saved by other tools) are checked key by key
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        hfactory.from_pretrained(tmp_path)
    assert "shape mismatch" in str(info.value) and "stages.0.downsample.conv.weight" in str(info.value)


def test_an_edited_spec_with_the_same_shapes_is_refused(small, tmp_path):
    # The dangerous case: another activation has the same parameters, so only the hash tells.
    small.save_pretrained(tmp_path)
    edited = small.spec.with_changes({"stages.*.feedforward.activation": "relu"})
    (tmp_path / "spec.yaml").write_text(hfactory.dump_spec(edited))
    with pytest.raises(ValueError, match="was saved for spec hash"):
        hfactory.from_pretrained(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="spec.yaml"):
        hfactory.from_pretrained(tmp_path)


def test_same_seed_same_weights_and_plan_text():
    torch.manual_seed(123)
    a = hfactory.build_encoder(SMALL)
    torch.manual_seed(123)
    b = hfactory.build_encoder(SMALL)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    from hfactory.plan import _resolve  # uncached: resolve() memoises on the spec's JSON

    assert str(a.plan) == str(_resolve(b.spec, b.spec.img_hw))


def test_other_input_sizes_follow_the_plan(small):
    out = small.forward_intermediates(torch.randn(1, 3, 96, 64), intermediates_only=True)
    assert [tuple(m.shape[2:]) for m in out] == [(24, 16), (12, 8), (6, 4)]
    with pytest.raises(PlanError, match="stride 4 does not divide"):
        small(torch.randn(1, 3, 66, 64))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        small(torch.randn(1, 1, 64, 64))


def test_position_embedding_is_interpolated_for_other_sizes(small):
    pe = small.stages[0].pos_embed
    x = torch.zeros(1, 24, 16, 16)
    out = pe(x)
    from timm.layers import resample_abs_pos_embed  # the reference behaviour (bicubic, antialias)

    flat = pe.pos_embed.reshape(1, 16 * 16, -1)
    ref = resample_abs_pos_embed(flat, new_size=(24, 16), old_size=(16, 16), num_prefix_tokens=0)
    ref = ref.reshape(1, 24, 16, -1)
    torch.testing.assert_close(out, ref)


def test_build_overrides_and_meta_device():
    model = hfactory.build_encoder(EXAMPLES / "poolformer_s12.yaml", num_classes=10, img_size=[224, 192])
    assert model.spec.num_classes == 10 and model.plan.img_size == (224, 192)
    with torch.device("meta"):
        meta = HierarchicalEncoder(load_spec(EXAMPLES / "poolformer_s12.yaml"))
    assert sum(p.numel() for p in meta.parameters()) == 11_915_176  # timm poolformer_s12's count
