"""Sparse MAE: the plan's compatibility verdict, the masked (sparse) forward, the autoencoder
against the official ``hiera`` package's ``mae_hiera_tiny_224``, bad input, and ``hfactory pretrain``.

Independent references: the official package (loss, predictions and labels after weight
conversion, the same mask; randomised weights, tests/reference_utils), the dense encoder (a
sparse forward of a spec whose components all stay inside units must equal the dense forward of
the image with masked pixels zeroed, restricted to the kept units), the grid execution of the
same components (per-unit execution must not change outputs), and FLOP counts (cost follows the
kept fraction).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hfactory import PlanError, build_encoder, dump_spec, load_preset, load_spec, resolve
from hfactory.convert import from_hiera_mae_state_dict
from hfactory.layers.layout import units_to_grid
from hfactory.mae import MaskedAutoencoder, mae_spec_of, patchify, random_mask
from hfactory.spec.mae import MAESpec

from reference_utils import TINY_MAE, assert_rel_close, randomize_, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# 16x16 tokens in 4x4 units (16 units), every component unit-local: stem conv (overlapping, so
# masked pixels must be zeroed), mask-unit attention, q-pooling, non-overlapping conv downsampling.
UNIT_LOCAL = {
    "name": "unit_local", "img_size": 64, "num_classes": 0, "mask_unit_size": 4,
    "defaults": {"dim_head": 8, "feedforward": {"kind": "mlp", "hidden_layer_multiplier": 2}},
    "stages": [
        {"embedding": 16, "depth": 1, "token_mixer": "mask_unit_attention", "pos_embed": "learned",
         "downsample": {"kind": "conv", "patch_size": 7, "stride": 4, "padding": 3}},
        {"embedding": 32, "depth": 2, "token_mixer": "mask_unit_attention", "downsample": {"kind": "q_pool"}},
        {"embedding": 48, "depth": 1, "token_mixer": "mask_unit_attention",
         "downsample": {"kind": "conv", "patch_size": 2, "stride": 2}},
    ],
}


def spec_with(base: dict, **changes) -> dict:
    return {**base, **changes}


def images(b, hw, chans=3, seed=1):
    return torch.randn(b, chans, *hw, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- verdict


@pytest.mark.parametrize("name,compatible,loc,words", [
    ("hiera_tiny_224", True, None, None),
    ("hiera_small_abswin_256", True, None, None),
    ("mae_hiera_tiny_224", True, None, None),
    ("swin_tiny_patch4_window7_224", False, "stages.0.token_mixer", "(block 1) window_attention -- shifted windows"),
    ("convformer_s18", False, "stages.0.token_mixer", "(block 0) sepconv"),
    ("poolformer_s12", False, "stages.0.norm", "groupnorm"),
])
def test_presets_verdict_names_the_first_offending_component(name, compatible, loc, words):
    plan = resolve(load_preset(name))
    assert plan.mae_compatible is compatible
    if not compatible:
        assert plan.mae_incompatibility.startswith(loc + ":"), plan.mae_incompatibility
        assert words in plan.mae_incompatibility


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("mae_*.yaml")), ids=lambda p: p.name)
def test_mae_examples_are_compatible(path):
    assert resolve(load_spec(path)).mae_compatible


def test_global_attention_is_compatible_at_any_stage_but_rotary_is_not():
    spec = spec_with(UNIT_LOCAL, stages=[{**s, "token_mixer": "attention"} for s in UNIT_LOCAL["stages"]])
    assert resolve(load_spec(spec)).mae_compatible  # a set operation over the kept tokens (ViT-MAE)
    stages = [dict(s) for s in spec["stages"]]
    stages[1]["token_mixer"] = {"kind": "attention", "rotary": True}
    verdict = resolve(load_spec(spec_with(spec, stages=stages))).mae_incompatibility
    # block 0 pools queries with the lagged stage-0 mixer; block 1 is the first rotary one
    assert verdict.startswith("stages.1.token_mixer: (block 1) attention") and "rotary" in verdict


def test_spec_without_mask_units_is_incompatible():
    spec = spec_with(UNIT_LOCAL, mask_unit_size=None)
    spec["stages"] = [{**s, "token_mixer": "attention"} for s in spec["stages"]]
    verdict = resolve(load_spec(spec)).mae_incompatibility
    assert verdict.startswith("mask_unit_size:") and "not set" in verdict


@pytest.mark.parametrize("stage1,loc,words", [
    ({"downsample": {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1}}, "stages.1.downsample",
     "conv 3x3/s2/p1 reads neighbouring tokens across mask-unit borders"),
    ({"token_mixer": {"kind": "window_attention", "window_size": 2}, "depth": 2}, "stages.1.token_mixer",
     "shifted windows"),
    ({"token_mixer": {"kind": "window_attention", "window_size": 4, "shift": False}}, "stages.1.token_mixer",
     "do not tile the 2x2 mask unit"),
    ({"token_mixer": {"kind": "pooling"}}, "stages.1.token_mixer", "3x3 average pooling"),
    ({"norm": {"kind": "groupnorm"}}, "stages.1.norm", "groupnorm"),
    ({"pos_embed": "learned"}, "stages.1.pos_embed", "position embedding after stage 0"),
    ({"downsample": {"kind": "q_pool", "q_stride": 8}}, "stages.1.downsample", "does not divide the mask unit"),
    ({"downsample": {"kind": "max", "kernel_size": 3, "stride": 2, "padding": 1}}, "stages.1.downsample",
     "max 3x3/s2/p1 reads neighbouring tokens across mask-unit borders"),
    ({"downsample": {"kind": "avg", "kernel_size": 2, "stride": 2, "padding": 0, "norm": "groupnorm"}},
     "stages.1.downsample", "its norm: groupnorm normalises over the whole map"),
])
def test_components_that_cross_units_fail_in_the_plan(stage1, loc, words):
    """In the units layout, a grid component runs inside each unit only if it stays there; the
    plan refuses the others, naming the stage, the component and why."""
    spec = spec_with(UNIT_LOCAL)
    spec["stages"] = [spec["stages"][0], {**spec["stages"][1], **stage1}, spec["stages"][2]]
    with pytest.raises(PlanError) as err:
        resolve(load_spec(spec))
    assert err.value.loc == loc and words in str(err.value), str(err.value)


@pytest.mark.parametrize("downsample", [
    None,  # the example's patch merging
    {"kind": "avg", "kernel_size": 2, "stride": 2, "padding": 0},
    {"kind": "max", "kernel_size": 2, "stride": 2, "padding": 0},
    {"kind": "rand_conv", "kernel_size": 2, "stride": 2, "padding": 0},
])
def test_unit_local_grid_components_run_inside_units_exactly(downsample):
    """Unshifted windows tiling the unit, non-overlapping convs and poolings and patch merging run
    per unit (plan entries marked per_unit); the outputs equal the same weights on the whole grid."""
    spec = load_spec(EXAMPLES / "mae_swin_like.yaml").model_dump(mode="json", exclude_none=True)
    spec.update(img_size=64, num_classes=5, mae=None)
    spec["defaults"]["dim_head"] = 8
    if downsample is not None:
        spec["defaults"]["downsample"] = downsample
    spec["stages"] = [{**s, "embedding": 16 * 2 ** i, "depth": 2 if i < 2 else 1} for i, s in enumerate(spec["stages"])]
    units = build_encoder(spec).eval()
    plan = units.plan
    assert plan.stages[0].token_mixer["per_unit"] and plan.stages[1].downsample["per_unit"]
    grid = build_encoder({**spec, "mask_unit_size": None}).eval()
    assert "per_unit" not in grid.plan.stages[0].token_mixer
    grid.load_state_dict({k.replace(".inner.", "."): v for k, v in randomize_(units).state_dict().items()})
    x = images(2, (64, 64))
    with torch.no_grad():
        (final_a, maps_a), (final_b, maps_b) = units.forward_intermediates(x), grid.forward_intermediates(x)
    for i, (m, n) in enumerate(zip(maps_a, maps_b)):
        assert_rel_close(m, n, rel=1e-5, what=f"stage {i}")
    assert_rel_close(final_a, final_b, rel=1e-5, what="final map")
    assert_rel_close(units(x), grid(x), rel=1e-5, what="logits")


# ---------------------------------------------------------------------------- sparse forward


def test_sparse_forward_of_unit_local_spec_equals_dense_forward_of_the_visible_image():
    model = randomize_(build_encoder(UNIT_LOCAL)).eval()
    x = images(3, (64, 64))
    keep = random_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.sum(1).tolist() == [4, 4, 4]
    zeroed = x * keep.view(3, 1, 4, 1, 4, 1).expand(3, 1, 4, 16, 4, 16).reshape(3, 1, 64, 64)
    with torch.no_grad():
        sparse, maps = model.forward_intermediates(x, mask=keep)
        _, dense = model.forward_intermediates(zeroed, output_fmt="NHWC")
    assert sparse.shape == (3, 4, 1, 1, 48)
    for i, (s, d) in enumerate(zip(maps, dense)):
        unit = model.plan.stages[i].unit_size
        d_units = d.reshape(3, 4, unit[0], 4, unit[1], -1).permute(0, 1, 3, 2, 4, 5).reshape(3, 16, *unit, -1)
        assert_rel_close(s, d_units[keep].reshape(s.shape), rel=1e-5, what=f"stage {i}")
    torch.testing.assert_close(model.forward_features(x, mask=keep), sparse)


def test_keeping_every_unit_is_the_dense_forward():
    last = {**UNIT_LOCAL["stages"][2], "token_mixer": "attention"}
    spec = spec_with(UNIT_LOCAL, stages=[*UNIT_LOCAL["stages"][:2], last])
    model = randomize_(build_encoder(spec)).eval()
    x = images(2, (64, 64))
    with torch.no_grad():
        dense = model.forward_features(x)
        sparse = model.forward_features(x, mask=torch.ones(2, 16, dtype=torch.bool))
    assert sparse.shape == (2, 16, 1, 1, 48)
    torch.testing.assert_close(units_to_grid(sparse, (4, 4)).permute(0, 3, 1, 2), dense, rtol=0, atol=0)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_sparse_cost_follows_the_kept_fraction():
    """FLOPs after the stem scale with the kept units (they are deleted, not zeroed)."""
    model = build_encoder(spec_with(UNIT_LOCAL, img_size=128)).eval()  # 64 units
    x = images(1, (128, 128))
    stem = model.stages[0].downsample
    stem_flops = _flops(lambda: stem(x.permute(0, 2, 3, 1)))
    full = _flops(lambda: model.forward_features(x, mask=torch.ones(1, 64, dtype=torch.bool))) - stem_flops
    for kept in (16, 32):
        keep = torch.zeros(1, 64, dtype=torch.bool)
        keep[0, torch.randperm(64)[:kept]] = True
        part = _flops(lambda: model.forward_features(x, mask=keep)) - stem_flops
        assert part == pytest.approx(full * kept / 64, rel=1e-6)


def test_bad_masks_fail_with_clear_messages():
    model = build_encoder(UNIT_LOCAL)
    x = images(2, (64, 64))
    good = random_mask(2, 16, 0.5)
    with pytest.raises(ValueError, match=r"bool tensor .* got dtype torch.float32"):
        model.forward_features(x, mask=good.float())
    with pytest.raises(ValueError, match=r"shape \(batch, mask units\) = \(2, 16\) for 64x64 images, got \(2, 15\)"):
        model.forward_features(x, mask=good[:, :15])
    with pytest.raises(ValueError, match=r"shape .* got \(1, 16\)"):
        model.forward_features(x, mask=good[:1])
    uneven = good.clone()
    uneven[0] = True
    with pytest.raises(ValueError, match=r"same number .* keeps \[16, 8\]"):
        model.forward_features(x, mask=uneven)
    with pytest.raises(ValueError, match=r"same number \(>= 1\)"):
        model.forward_features(x, mask=torch.zeros(2, 16, dtype=torch.bool))
    no_units = spec_with(UNIT_LOCAL, mask_unit_size=None,
                         stages=[{**s, "token_mixer": "attention"} for s in UNIT_LOCAL["stages"]])
    with pytest.raises(ValueError, match=r"not MAE-compatible: mask_unit_size: not set"):
        build_encoder(no_units).forward_features(x, mask=good)


# ------------------------------------------------------------------------------ autoencoder


def test_mae_refuses_incompatible_specs_naming_the_component():
    with pytest.raises(PlanError) as err:
        MaskedAutoencoder(load_preset("swin_tiny_patch4_window7_224"))
    assert err.value.loc == "stages.0.token_mixer" and "(block 1)" in str(err.value)
    assert "shifted windows" in str(err.value)


def test_mask_ratio_out_of_range_and_too_high():
    model = MaskedAutoencoder(TINY_MAE)
    x = images(2, (16, 16), chans=1)
    for bad in (-0.1, 0.0, 1.0, 1.5, True, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\)"):
            model(x, mask_ratio=bad)
    with pytest.raises(ValueError, match=r"keeps none of the 16 mask units; use a ratio in \(0, 0.9375\]"):
        model(x, mask_ratio=0.99)
    with pytest.raises(ValueError, match=r"masks none \(the loss is over masked units only\) of the 16 mask units"):
        model(x, mask_ratio=1e-17)  # 1 - 1e-17 rounds to 1.0: all 16 kept
    with pytest.raises(ValueError, match=r"keeps all 16 mask units of a sample"):
        model(x, mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"batch is empty"):
        model(x[:0])
    import numpy as np

    assert model(x, mask_ratio=np.float32(0.5))[3].sum(1).tolist() == [8, 8]  # numpy numbers are numbers
    with pytest.raises(ValueError, match=r"at least 2 mask units per image .* gives 1"):
        random_mask(2, 1, 0.5)
    with pytest.raises(ValueError, match=r"patchify needs images \(B, C, H, W\) with H and W multiples of 4"):
        patchify(torch.zeros(1, 3, 10, 10), 4)
    with pytest.raises(Exception, match="less than 1"):
        MAESpec(mask_ratio=1.0)
    with pytest.raises(Exception, match="greater than 0"):
        MAESpec(mask_ratio=0.0)
    with pytest.raises(Exception, match="decoder_num_heads 3 does not divide decoder_embedding 16"):
        MAESpec(decoder_embedding=16, decoder_num_heads=3)
    with pytest.raises(Exception, match="unknown key 'decoder_width'"):
        load_spec({**load_spec(TINY_MAE).model_dump(mode="json", exclude_none=True), "mae": {"decoder_width": 8}})


def test_random_mask_keeps_the_reference_count_and_defaults_come_from_the_spec():
    model = MaskedAutoencoder(TINY_MAE)
    assert model.mae_spec.mask_ratio == 0.5 and model.num_mask_units() == 16
    loss, pred, label, mask = model(images(4, (16, 16), chans=1))
    assert mask.dtype == torch.bool and mask.shape == (4, 16) and mask.sum(1).tolist() == [8] * 4
    assert pred.shape == label.shape == (4 * 8, 4 * 4)  # 8 masked 1-token units, 4x4-pixel patches
    m = random_mask(1000, 49, 0.6)
    assert (m.sum(1) == 19).all() and 0.3 < m.float().mean(0).min() and m.float().mean(0).max() < 0.5
    # the decoder settings are part of the spec; an explicit decoder overrides them
    assert mae_spec_of(load_preset("hiera_tiny_224")).mae == MAESpec()
    assert MaskedAutoencoder(TINY_MAE, decoder={"decoder_embedding": 8, "decoder_num_heads": 2,
                                                "decoder_depth": 1}).decoder_embed.out_features == 8


def test_loss_is_on_masked_units_against_normalised_patches():
    model = MaskedAutoencoder(TINY_MAE).eval()
    x = images(2, (16, 16), chans=1)
    keep = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    loss, pred, label, mask = model(x, mask=keep)
    # final tokens are 1 per unit (4x4 grid), each predicting its 4x4-pixel patch
    patches = patchify(x, 4)[~keep]
    norm = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(label, norm)
    torch.testing.assert_close(loss, ((pred - label) ** 2).mean())
    assert patchify(torch.arange(2 * 3 * 4 * 4.).reshape(2, 3, 4, 4), 2)[0, 1].tolist() == \
        [2., 3., 6., 7., 18., 19., 22., 23., 34., 35., 38., 39.]  # (C, py, px) order of the reference


@contextlib.contextmanager
def skipped_init():
    """Build without running weight init (every weight is randomised or loaded after; init of 55M
    parameters is the slow part of building)."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("trunc_normal_", "xavier_uniform_", "constant_", "normal_", "kaiming_uniform_", "uniform_",
                     "zeros_", "ones_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda t, *a, **k: t))
        yield


def test_matches_official_mae_hiera_tiny_224():
    """Loss, predictions, labels and every parameter's gradient agree with the official package's
    MaskedAutoencoderHiera (converted weights, randomised, the same mask) to 1e-4 relative;
    224x224, batch 2, training mode (no drop path in either)."""
    hiera = pytest.importorskip("hiera")
    with skipped_init():
        ref = randomize_(hiera.mae_hiera_tiny_224(pretrained=False))
    with torch.device("meta"):
        ours = MaskedAutoencoder(load_preset("mae_hiera_tiny_224"))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    state = ref.state_dict()
    ours.load_state_dict(from_hiera_mae_state_dict({"model_state": state}, ours), strict=True, assign=True)
    x = images(2, (224, 224))
    mask = ref.get_random_mask(x, 0.6)
    got, want = ours(x, mask=mask), ref(x, mask=mask)
    for name, a, b in zip(("loss", "pred", "label"), got[:3], want[:3]):
        assert_rel_close(a.detach(), b.detach(), rel=1e-4, what=name)
    assert torch.equal(got[3], want[3]) and got[3].sum(1).tolist() == [19, 19]
    got[0].backward()
    want[0].backward()
    ref_grads = from_hiera_mae_state_dict({k: p.grad for k, p in ref.named_parameters()}, ours)
    for name, p in ours.named_parameters():  # gradients are small: compare to their own scale
        scale = ref_grads[name].abs().max()
        assert scale > 0 and (p.grad - ref_grads[name]).abs().max() <= 1e-4 * scale, f"grad of {name}"
    # a state dict that does not fit is refused, naming the keys
    del state["decoder_blocks.7.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing: decoder_blocks\.7\.mlp\.fc2\.bias"):
        from_hiera_mae_state_dict(state, ours)


def test_save_and_reload_and_backward_reaches_every_parameter(tmp_path):
    model = MaskedAutoencoder(TINY_MAE)
    loss = model(images(2, (16, 16), chans=1))[0]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert {"mask_token", "decoder_pos_embed", "encoder.stages.0.pos_embed.pos_embed"} <= model.no_weight_decay()
    again = MaskedAutoencoder.from_pretrained(model.save_pretrained(tmp_path / "mae"))
    keep = random_mask(2, 16, 0.5)
    x = images(2, (16, 16), chans=1)
    torch.testing.assert_close(again.eval()(x, mask=keep)[0], model.eval()(x, mask=keep)[0])
    # the weights are checked against the spec they were saved with (same shapes, another loss)
    edited = model.spec.with_changes({"mae.norm_pix_loss": False})
    (tmp_path / "mae" / "spec.yaml").write_text(dump_spec(edited), encoding="utf-8")
    with pytest.raises(ValueError, match="was saved for spec hash"):
        MaskedAutoencoder.from_pretrained(tmp_path / "mae")


def test_the_non_hiera_example_pretrains_sparsely():
    # examples/mae_swin_like.yaml: Swin-T widths made MAE-compatible (unshifted windows = units)
    torch.manual_seed(0)
    model = MaskedAutoencoder(EXAMPLES / "mae_swin_like.yaml").train()
    x = images(1, (224, 224))
    loss, pred, label, mask = model(x, mask_ratio=0.6)
    units = model.encoder.num_mask_units()
    kept = int(units * (1 - 0.6))
    assert mask.shape == (1, units) and int(mask.sum()) == kept  # True = kept, as the reference
    assert pred.shape == label.shape and pred.shape[0] == units - kept  # loss on the masked units only
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------- pretrain

FAST = ["--batch-size", "128", "--lr", "3e-3", "--no-progress", "--epochs", "2", "--warmup-epochs", "0.5",
        "--threads", "1"]
STEPS = 12  # ceil(1437 / 128) per epoch


@pytest.fixture(scope="module")
def tiny_mae_spec(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    path = tmp_path_factory.mktemp("spec") / "tiny_mae.yaml"
    path.write_text(TINY_MAE, encoding="utf-8")
    return path


def test_pretrain_resumes_exactly_and_finetunes_from_the_run(tiny_mae_spec, tmp_path, capsys):
    from safetensors.torch import load_file

    from hfactory.cli import main

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(full), *FAST]) == 0
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(split), "--stop-at-step", str(STEPS + 5), *FAST]) == 0
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(split), "--resume", "--no-progress"]) == 0
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (full, split))
    for k in a:
        if k.endswith("qkv.bias"):
            # The key bias has a gradient of exactly zero in theory (softmax ignores a shift shared
            # by all keys), so float noise of ~1e-10 is all AdamW sees there and it normalises that
            # to lr-sized steps: not comparable. The query and value biases are.
            n = a[k].shape[0] // 3
            a[k], b[k] = torch.cat([a[k][:n], a[k][2 * n:]]), torch.cat([b[k][:n], b[k][2 * n:]])
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((split / "metrics.json").read_text())["test_loss"] == pytest.approx(
        json.loads((full / "metrics.json").read_text())["test_loss"], rel=1e-6)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["steps"] == 2 * STEPS and metrics["mask_ratio"] == 0.5
    lines = [json.loads(m) for m in (full / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["test_loss"] < lines[0]["test_loss"] and lines[1]["test_loss"] < 1.0  # it learns
    assert (full / "encoder" / "model.safetensors").is_file()
    capsys.readouterr()
    # fine-tuning starts from the pretrained encoder (one flag); the classifier is new
    ft = tmp_path / "ft"
    assert main(["train", str(tiny_mae_spec), "--out", str(ft), "--init-from", str(full), "--epochs", "1",
                 "--stop-at-step", "1", "--lr", "1e-9", "--no-progress"]) == 0
    assert "initialised" in capsys.readouterr().out
    tuned = load_file(str(ft / "checkpoint" / "model.safetensors"))
    pre = load_file(str(full / "encoder" / "model.safetensors"))
    torch.testing.assert_close(tuned["stages.0.downsample.conv.weight"], pre["stages.0.downsample.conv.weight"],
                               rtol=0, atol=1e-6)
    # the pretraining run directory is not a training run, and vice versa
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(ft), *FAST]) == 2
    assert "holds a training run" in capsys.readouterr().err


def test_pretrain_refuses_bad_input(tiny_mae_spec, tmp_path, capsys):
    from hfactory.cli import main

    assert main(["pretrain", "swin_tiny_patch4_window7_224", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "stages.0.token_mixer: " in err and "(block 1)" in err and "shifted windows" in err
    for bad in ("1.0", "0.0"):
        assert main(["pretrain", str(tiny_mae_spec), "--out", str(tmp_path / "r"), "--mask-ratio", bad]) == 2
        assert f"--mask-ratio {bad} is out of range; it must be in (0, 1)" in capsys.readouterr().err
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(tmp_path / "r"), "--mask-ratio", "0.99"]) == 2
    assert "keeps none of the 16 mask units; use a ratio in (0, 0.9375]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()
    assert main(["train", str(tiny_mae_spec), "--out", str(tmp_path / "t"), "--init-from", str(tmp_path / "none"),
                 "--no-progress"]) == 2
    assert "no weights found" in capsys.readouterr().err


def test_pretrain_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mae_spec, tmp_path, monkeypatch,
                                                                          capsys):
    from safetensors.torch import load_file

    from hfactory.cli import main
    from hfactory.train.checkpoint import find_checkpoint

    calls = {"n": 0}
    real = MaskedAutoencoder.forward_loss

    def nan_after_one_epoch(self, *args):
        loss, pred, label = real(self, *args)
        if self.training:
            calls["n"] += 1
            if calls["n"] > STEPS + 3:
                loss = loss * float("nan")
        return loss, pred, label

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", nan_after_one_epoch)
    out = tmp_path / "nan"
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "checkpoint" in err
    state = torch.load(find_checkpoint(out) / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, STEPS)
    assert all(torch.isfinite(t).all() for t in load_file(str(find_checkpoint(out) / "model.safetensors")).values())
    assert not (out / "model").exists()


def test_pretrain_with_bf16_autocast(tiny_mae_spec, tmp_path):
    from safetensors.torch import load_file

    from hfactory.cli import main
    from hfactory.train.checkpoint import find_checkpoint

    out = tmp_path / "amp"
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(out), "--amp", "--stop-at-step", "2", *FAST]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["amp"] is True
    assert all(torch.isfinite(t).all() for t in load_file(str(find_checkpoint(out) / "model.safetensors")).values())


def test_pretrain_takes_set_and_the_checkpoint_records_the_lineage(tiny_mae_spec, tmp_path, capsys):
    from hfactory.cli import main

    out = tmp_path / "set"
    sets = ["--set", "mae.decoder_depth=1", "--set", "drop_path_rate=0.05"]
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(out), *sets, "--stop-at-step", "1", *FAST]) == 0
    saved = load_spec(out / "checkpoint" / "spec.yaml")
    assert saved.mae.decoder_depth == 1 and saved.drop_path_rate == 0.05
    assert [s.changes for s in saved.lineage.steps] == [{"mae.decoder_depth": 1, "drop_path_rate": 0.05}]
    # resuming needs the same spec: with the same --set it continues, without it is refused
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(out), *sets, "--resume", "--stop-at-step", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["pretrain", str(tiny_mae_spec), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "spec" in capsys.readouterr().err


def test_pretrain_reads_an_image_folder_with_a_progress_bar(tiny_mae_spec, tmp_path, capsys):
    # The same data machinery as `hfactory train`: ImageFolder train/ and val/ (labels ignored).
    from hfactory.cli import main

    write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["pretrain", str(tiny_mae_spec), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 12 and metrics["steps"] == 3 and metrics["data"] == str(tmp_path / "data")
    assert (out / "encoder" / "model.safetensors").is_file()
    assert "img" in capsys.readouterr().err  # tqdm's bar counts images (stderr)
