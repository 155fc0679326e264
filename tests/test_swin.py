"""Swin (arXiv 2103.14030) from a spec: the preset reproduces timm's swin_tiny_patch4_window7_224
exactly (parameter count, logits, every stage map), any depth/width variant converts, and what
timm cannot do (grids the window does not divide) works with the plan saying what changes."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from hfactory import PlanError, load_spec, resolve
from hfactory.convert import from_timm, from_timm_state_dict
from hfactory.convert.swin import map_swin
from hfactory.encoder import build_encoder
from hfactory.layers.attention import attention_backend
from hfactory.layers.swin import WindowAttention
from hfactory.presets import load_preset
from reference_utils import assert_rel_close, randomize_

PRESET = "swin_tiny_patch4_window7_224"
# a small Swin by timm kwargs: 4 stages, shifted blocks in each, fast on CPU
SMALL = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))


def timm_swin(**kw):
    return randomize_(timm.create_model(PRESET, pretrained=False, **kw)).eval()


def small_spec(**overrides):
    """The preset with SMALL's widths/depths/heads (what spec_from_timm gives for SMALL)."""
    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    for i, s in enumerate(spec["stages"]):
        s.update(embedding=32 * 2 ** i, depth=2, num_heads=2 ** i)
    return load_spec({**spec, **overrides})


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = timm_swin()
    return ref, from_timm(ref).eval()


def test_preset_has_timms_parameter_count_and_keys(tiny_pair):
    ref, ours = tiny_pair
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == 28_288_354  # timm's swin_tiny_patch4_window7_224
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert len(ours.state_dict()) == len(ref.state_dict()) == 173  # buffers are non-persistent in both
    assert ours.spec.name == PRESET
    assert ours.plan == resolve(load_preset(PRESET))  # spec_from_timm gives back the preset, number for number


def test_logits_and_every_stage_map_match_timm(tiny_pair):
    ref, ours = tiny_pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref_final, ref_maps = ref.forward_intermediates(x)  # NCHW maps, NHWC normed final
        our_final, our_maps = ours.forward_intermediates(x)
        assert_rel_close(ours.forward_head(our_final), ref.forward_head(ref_final), what="logits")
    assert len(our_maps) == len(ref_maps) == 4
    for i, (o, r) in enumerate(zip(our_maps, ref_maps)):
        assert_rel_close(o, r, what=f"stage {i}")
    assert_rel_close(our_final, ref_final.permute(0, 3, 1, 2), what="final normed map")


def test_depth_width_variant_converts_via_from_timm():
    torch.manual_seed(1)
    ref = timm_swin(**SMALL, num_classes=10)
    ours = from_timm(ref).eval()
    assert [s.depth for s in ours.plan.stages] == [2, 2, 2, 2]
    assert [s.out_chs for s in ours.plan.stages] == [32, 64, 128, 256]
    assert [s.num_heads for s in ours.plan.stages] == [1, 2, 4, 8]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_rel_close(ours(x), ref(x), what="variant logits")


def test_larger_unpadded_size_matches_timm_with_shifts_in_every_stage():
    # 448: grids 112/56/28/14, all multiples of 7, so the last stage shifts too (it does not at 224)
    torch.manual_seed(2)
    ref = timm_swin(**SMALL, img_size=448)
    ours = from_timm(ref).eval()
    assert ours.plan.stages[3].blocks[1].token_mixer["shift_size"] == [3, 3]
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        _, ref_maps = ref.forward_intermediates(x)
        _, our_maps = ours.forward_intermediates(x)
        assert_rel_close(ours(x), ref(x), what="logits at 448")
    for i, (o, r) in enumerate(zip(our_maps, ref_maps)):
        assert_rel_close(o, r, what=f"stage {i} at 448")


def test_state_dicts_of_other_sizes_or_architectures_are_refused_naming_keys(tiny_pair):
    _, ours = tiny_pair
    small = timm.create_model(PRESET, pretrained=False, **SMALL).state_dict()
    with pytest.raises(ValueError, match=r"swin state dict does not fit.*missing: stages\.2\.blocks\.2\.") as info:
        from_timm_state_dict(small, ours)
    assert "stages.0.downsample.conv.weight: (32, 3, 4, 4) vs model (96, 3, 4, 4)" in str(info.value)
    with pytest.raises(ValueError, match="no converter recognises this state dict"):
        from_timm_state_dict({"blocks.0.weight": torch.zeros(1)}, ours)


def test_converter_drops_buffers_and_maps_official_checkpoints():
    ref = timm.create_model(PRESET, pretrained=False, **SMALL)
    sd = ref.state_dict()
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(1)
    # the official repo's layout: downsample at the end of the previous stage, classifier "head"
    official = {}
    for k, v in sd.items():
        for i in (1, 2, 3):
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        official[k.replace("head.fc.", "head.")] = v
    model = build_encoder(small_spec())
    for state in (sd, official):
        mapped = from_timm_state_dict(state, model)
        model.load_state_dict(mapped, strict=True)
        assert torch.equal(mapped["stages.1.downsample.reduction.weight"], sd["layers.1.downsample.reduction.weight"])
        assert torch.equal(mapped["head.fc.weight"], sd["head.fc.weight"])


@pytest.fixture(scope="module")
def small_224():
    return build_encoder(small_spec()).eval()


@pytest.mark.parametrize("hw", [(256, 256), (320, 256)])
def test_runs_where_the_window_does_not_divide_the_grid(hw, small_224):
    model = build_encoder(small_spec(img_size=list(hw))).eval()
    plan = model.plan
    assert [tuple(s.out_grid) for s in plan.stages] == [(hw[0] // r, hw[1] // r) for r in (4, 8, 16, 32)]
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        logits = model.forward_head(final)
    assert [tuple(m.shape[2:]) for m in maps] == [tuple(s.out_grid) for s in plan.stages]
    assert torch.isfinite(logits).all()
    # the 224 model runs at these sizes too (timm's fixed-size model asserts on the input size)
    with torch.no_grad():
        assert small_224(x).shape == (1, 1000)


def test_plan_shows_window_shift_and_padding_per_block():
    plan = resolve(load_preset(PRESET), (256, 256))
    data = json.loads(plan.to_json())
    got = [[(b["token_mixer"]["window_size"], b["token_mixer"]["shift_size"], b["token_mixer"]["padded_grid"])
            for b in s["blocks"]] for s in data["stages"]]
    # 64/32/16/8 tokens: windows stay 7, odd blocks shift by 3, grids padded to multiples of 7
    assert got[0] == [([7, 7], [0, 0], [70, 70]), ([7, 7], [3, 3], [70, 70])]
    assert got[1] == [([7, 7], [0, 0], [35, 35]), ([7, 7], [3, 3], [35, 35])]
    assert got[2] == [([7, 7], [0, 0], [21, 21]), ([7, 7], [3, 3], [21, 21])] * 3
    assert got[3] == [([7, 7], [0, 0], [14, 14]), ([7, 7], [3, 3], [14, 14])]
    # at 224 the last stage's 7x7 grid is one window: no shift (timm's _calc_window_shift); at 160 the
    # window is clipped to the 5x5 grid
    at224 = resolve(load_preset(PRESET))
    assert [b.token_mixer["shift_size"] for b in at224.stages[3].blocks] == [[0, 0], [0, 0]]
    assert at224.stages[0].blocks[1].token_mixer["padded_grid"] == [56, 56]
    at160 = resolve(load_preset(PRESET), (160, 160))
    assert at160.stages[3].blocks[1].token_mixer["window_size"] == [5, 5]


def test_plan_errors_are_located():
    with pytest.raises(PlanError) as info:  # 232 / 4 = 58 -> 29 tokens: odd for the next merge
        resolve(load_preset(PRESET), (232, 232))
    assert info.value.loc == "stages.2.downsample" and "odd" in str(info.value)
    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    with pytest.raises(PlanError, match="'window_attention' works on grid tokens"):
        resolve(load_spec({**spec, "mask_unit_size": 8}))  # shifted windows cross mask units: no MAE
    with pytest.raises(Exception, match="window_size must be positive"):
        load_spec({**spec, "defaults": {**spec["defaults"], "token_mixer": {"kind": "window_attention",
                                                                            "window_size": 0}}})


def test_224_weights_load_into_other_sizes_and_windows():
    ref = timm_swin(**SMALL)
    sd = ref.state_dict()
    table = "stages.0.blocks.0.token_mixer.relative_position_bias_table"
    src = sd["layers.0.blocks.0.attn.relative_position_bias_table"]
    # img_size 256 keeps window 7 (grids padded): the tables keep their size and values
    m256 = build_encoder(small_spec(img_size=256))
    m256.load_state_dict(from_timm_state_dict(sd, m256), strict=True)
    assert torch.equal(m256.state_dict()[table], src)
    # window 8 (256 = 8 * 32: no padding): 13x13 tables are resized bicubically to 15x15
    spec = small_spec(img_size=256).model_dump(mode="json", exclude_none=True)
    spec["defaults"]["token_mixer"]["window_size"] = 8
    m8 = build_encoder(spec).eval()
    m8.load_state_dict(from_timm_state_dict(sd, m8), strict=True)
    got = m8.state_dict()[table]
    assert got.shape == (15 * 15, 1)
    want = F.interpolate(src.T.reshape(1, 1, 13, 13), size=(15, 15), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got, want.reshape(1, 225).T)
    with torch.no_grad():
        assert torch.isfinite(m8(torch.randn(1, 3, 256, 256))).all()


def test_no_weight_decay_lists_every_relative_position_table(tiny_pair):
    ref, ours = tiny_pair
    tables = {n for n, _ in ours.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 12 and tables <= ours.no_weight_decay()
    assert set(map_swin({k: None for k in ref.no_weight_decay()})) == tables


def test_backward_reaches_every_parameter_with_padding_and_shifts():
    spec = small_spec(img_size=[72, 88]).model_dump(mode="json", exclude_none=True)
    spec["stages"] = spec["stages"][:2]  # 18x22 and 9x11 tokens: padded to 21x28 and 14x14, shifted
    model = build_encoder(spec).train()
    model(torch.randn(2, 3, 72, 88)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sdpa_and_math_backends_agree_on_padded_shifted_windows():
    # 40x32 / 20x16 / 10x8 / 5x4 tokens: padded to 42x35 / 21x21 / 14x14, the last window clipped to 5x4
    model = randomize_(build_encoder(small_spec(img_size=[160, 128]))).eval()
    x = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        with attention_backend("math"):
            ref = model(x)
        with attention_backend("sdpa"):
            out = model(x)
    assert_rel_close(out, ref, what="sdpa vs math")


def _naive_window_attention(mod: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention of every real token over the real tokens of its (shifted, padded) window and
    region, written per token pair from the definition (no padding, rolling or partitioning)."""
    b, h, w, c = x.shape
    (wh, ww), (sh, sw), (hp, wp) = mod.window_size, mod.shift_size, mod.padded_grid
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, s = (i - sh) % hp, (j - sw) % wp  # position in the rolled, padded grid
    region_r = ((r >= hp - wh).long() + (r >= hp - sh).long()) if sh else torch.zeros_like(r)
    region_s = ((s >= wp - ww).long() + (s >= wp - sw).long()) if sw else torch.zeros_like(s)
    key = torch.stack([r // wh, s // ww, region_r, region_s]).flatten(1)  # same window and region
    allowed = (key[:, :, None] == key[:, None, :]).all(0)
    dy = (r % wh).flatten()[:, None] - (r % wh).flatten()[None, :]
    dx = (s % ww).flatten()[:, None] - (s % ww).flatten()[None, :]
    table = mod.relative_position_bias_table
    bias = table[(dy + wh - 1) * (2 * ww - 1) + dx + ww - 1].permute(2, 0, 1)  # (heads, N, N)
    bias = bias.masked_fill(~allowed, float("-inf"))
    q, k, v = mod.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4)
    o = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v
    return mod.proj(o.transpose(1, 2).reshape(b, h, w, -1))


@pytest.mark.parametrize("grid,window,shifted", [((9, 11), 4, True), ((9, 11), 4, False), ((8, 12), 4, True),
                                                 ((5, 9), 6, True)])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_window_attention_matches_its_definition(grid, window, shifted, backend):
    from hfactory.spec.swin import WindowAttentionParams
    from hfactory.spec.components import StageContext

    params = WindowAttentionParams(window_size=window)
    kw = params.resolve(StageContext(loc="m", dim=16, grid=grid, num_heads=2, dim_head=8, block_index=int(shifted)))
    kw.pop("kind")
    mod = randomize_(WindowAttention(**kw, backend=backend)).eval()
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        assert_rel_close(mod(x), _naive_window_attention(mod, x), rel=1e-5, what=str(kw))
        # the same module on another grid derives its geometry by the same rule
        other = (grid[0] + 3, grid[1] + 2)
        kw2 = params.resolve(StageContext(loc="m", dim=16, grid=other, num_heads=2, dim_head=8,
                                          block_index=int(shifted)))
        if kw2["window_size"] == kw["window_size"]:
            ref = WindowAttention(**{**kw, **{k: kw2[k] for k in ("grid", "shift_size", "padded_grid")}})
            ref.load_state_dict(mod.state_dict())
            y = torch.randn(2, *other, 16)
            assert_rel_close(mod(y), ref.eval()(y), rel=1e-6, what=f"other grid {other}")


def test_torch_compile_traces_without_graph_breaks():
    # the shift/padding masks are buffers from the plan, or built from Python ints at other sizes
    model = build_encoder(small_spec(img_size=[160, 128])).eval()
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, 160, 128))
    assert explained.graph_break_count == 0, explained.break_reasons
    mixer = model.stages[0].blocks[1].token_mixer  # shifted, 40x32 padded to 42x35
    for grid in ((40, 32), (44, 30)):
        explained = torch._dynamo.explain(mixer)(torch.randn(1, *grid, 32))
        assert explained.graph_break_count == 0, (grid, explained.break_reasons)


@pytest.mark.parametrize("hw", [(256, 256), (320, 256)])
def test_the_preset_itself_runs_at_other_sizes(hw):
    # timm's swin_tiny_patch4_window7_224 built for 224 refuses these inputs; ours pads its windows
    model = build_encoder(load_preset("swin_tiny_patch4_window7_224")).eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(torch.randn(1, 3, *hw))
        logits = model.forward_head(final)
    plan = resolve(model.spec, img_size=hw)
    assert [tuple(m.shape[1:]) for m in maps] == [(s.out_chs, *s.out_grid) for s in plan.stages]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
