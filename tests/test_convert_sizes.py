"""Converting weights into models built for other sizes: Swin's relative-position tables resized
to non-square windows, position embeddings of non-square or foreign source grids refused with a
ValueError naming the keys and shapes (no raw reshape RuntimeError)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import hfactory
from hfactory.convert import from_hiera_mae_state_dict, from_timm, from_timm_state_dict
from hfactory.convert.resize import resize_rel_pos_table, resize_to_model
from hfactory.layers.posembed import resize_pos_embed
from hfactory.mae import MaskedAutoencoder
from hfactory.presets import load_preset
from reference_utils import randomize_

SWIN = "swin_tiny_patch4_window7_224"
TABLE3 = "stages.3.blocks.0.token_mixer.relative_position_bias_table"


@pytest.fixture(scope="module")
def timm_swin():
    torch.manual_seed(0)
    return randomize_(timm.create_model(SWIN, pretrained=False)).eval()


def _bicubic(table: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    heads = table.shape[1]
    grid = F.interpolate(table.T.reshape(1, heads, *src), size=dst, mode="bicubic", align_corners=False)
    return grid.reshape(heads, -1).T


def test_swin_weights_load_into_a_model_with_non_square_windows(timm_swin):
    ours = hfactory.create_model(SWIN, img_size=[192, 160]).eval()
    assert ours.stages[3].blocks[0].token_mixer.window_size == (6, 5)  # the plan clamps 7x7 to the 6x5 grid
    state = from_timm_state_dict(timm_swin.state_dict(), ours)
    ours.load_state_dict(state, strict=True)
    src = timm_swin.state_dict()["layers.3.blocks.0.attn.relative_position_bias_table"]
    assert tuple(state[TABLE3].shape) == (11 * 9, 24)
    torch.testing.assert_close(state[TABLE3], _bicubic(src, (13, 13), (11, 9)))  # bicubic per axis
    # stages 0-2 keep their 7x7 windows: tables unchanged
    torch.testing.assert_close(state["stages.2.blocks.0.token_mixer.relative_position_bias_table"],
                               timm_swin.state_dict()["layers.2.blocks.0.attn.relative_position_bias_table"])
    x = torch.randn(1, 3, 192, 160)
    with torch.no_grad():
        assert torch.isfinite(ours(x)).all()


def test_a_non_square_resized_table_is_laid_out_as_timms():
    """A small Swin with 8x8 windows trained at 256 loads into the model built for 256x128 (stage 3's
    8x4 grid clamps its window to 8x4; no grid is padded, where timm differs); given the same resized
    tables, timm's model built for 256x128 computes the same logits (rows of the table are offsets
    along H, as timm's index)."""
    kw = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8), window_size=8)
    torch.manual_seed(0)
    src = randomize_(timm.create_model(SWIN, pretrained=False, img_size=256, **kw)).eval()
    ref = timm.create_model(SWIN, pretrained=False, img_size=(256, 128), **kw).eval()
    ours = from_timm(ref).eval()
    assert ours.stages[3].blocks[0].token_mixer.window_size == (8, 4)
    state = from_timm_state_dict(src.state_dict(), ours)
    ours.load_state_dict(state, strict=True)
    torch.testing.assert_close(state[TABLE3], _bicubic(src.layers[3].blocks[0].attn.relative_position_bias_table
                                                       .detach(), (15, 15), (15, 7)))
    ref_state = {k: v for k, v in src.state_dict().items() if k in ref.state_dict()}
    for i, layer in enumerate(ref.layers):
        for j, _ in enumerate(layer.blocks):
            ref_state[f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"] = \
                state[f"stages.{i}.blocks.{j}.token_mixer.relative_position_bias_table"]
    ref.load_state_dict(ref_state, strict=True)
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_square_table_resize_is_unchanged_and_needs_no_model(timm_swin):
    """224 -> 160: stage 3's window is clamped to 5x5; its table is the 13x13 one resized bicubically to 9x9,
    as before non-square windows were supported, with or without the model at hand."""
    ours = hfactory.create_model(SWIN, img_size=160)
    state = from_timm_state_dict(timm_swin.state_dict(), ours)
    src = timm_swin.state_dict()["layers.3.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(state[TABLE3], _bicubic(src, (13, 13), (9, 9)))
    without_model = resize_to_model({TABLE3: src}, ours.state_dict())
    assert torch.equal(without_model[TABLE3], state[TABLE3])
    # a non-square target needs the model (its window): without it the table is left for the mismatch report
    at_192x160 = hfactory.create_model(SWIN, img_size=[192, 160])
    assert resize_to_model({TABLE3: src}, at_192x160.state_dict())[TABLE3] is src
    assert resize_to_model({TABLE3: src}, at_192x160.state_dict(), at_192x160)[TABLE3].shape == (99, 24)


def test_resize_rel_pos_table_source_window():
    table = torch.randn(11 * 9, 3)
    assert resize_rel_pos_table(table, (6, 5)) is table  # the target's own size: same window
    torch.testing.assert_close(resize_rel_pos_table(table, (7, 7), source_window=(6, 5)),
                               _bicubic(table, (11, 9), (13, 13)))
    with pytest.raises(ValueError, match=r"relative_position_bias_table \(99, 3\).*pass source_window"):
        resize_rel_pos_table(table, (7, 7))


@pytest.fixture(scope="module")
def hiera_tiny():
    with torch.device("meta"):
        return hfactory.create_model("hiera_tiny_224")


def _timm_hiera_state(**kw) -> dict:
    torch.manual_seed(0)
    return timm.create_model("hiera_tiny_224", pretrained=False, **kw).state_dict()


def test_hiera_pos_embed_of_a_non_square_grid_is_refused_naming_it(hiera_tiny):
    state = _timm_hiera_state(img_size=(320, 256))
    pe = state["pos_embed"]
    assert tuple(pe.shape) == (1, 5120, 96)  # 80x64 tokens
    with pytest.raises(ValueError, match=r"pos_embed: source \(1, 5120, 96\) vs model \(1, 56, 56, 96\).*"
                                         r"cannot be inferred.*\(1, C, H, W\)"):
        from_timm_state_dict(state, hiera_tiny)
    # ... and loads once the grid is given, channels-first
    state["pos_embed"] = pe.reshape(1, 80, 64, 96).permute(0, 3, 1, 2)
    got = from_timm_state_dict(state, hiera_tiny)
    torch.testing.assert_close(got["stages.0.pos_embed.pos_embed"], resize_pos_embed(pe.reshape(1, 80, 64, 96),
                                                                                      (56, 56)))
    # a model built for that size takes it as it is
    with torch.device("meta"):
        at_320x256 = hfactory.create_model("hiera_tiny_224", img_size=[320, 256])
    state["pos_embed"] = pe
    assert torch.equal(from_timm_state_dict(state, at_320x256)["stages.0.pos_embed.pos_embed"],
                       pe.reshape(1, 80, 64, 96))


@pytest.mark.parametrize("preset", ["hvt_s_0", "hiera_tiny_224"])
def test_a_vit_state_dict_is_refused_naming_the_mismatching_keys_and_shapes(preset):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    with torch.device("meta"):
        model = hfactory.create_model(preset)
    width = model.state_dict()["stages.0.pos_embed.pos_embed"].shape[-1]
    grid = 14 if preset == "hvt_s_0" else 56
    with pytest.raises(ValueError, match=r"does not fit this model.*unexpected: cls_token") as info:
        from_timm_state_dict(vit, model)
    assert (f"stages.0.pos_embed.pos_embed: (1, 197, 192) vs model (1, {grid}, {grid}, {width})"
            in str(info.value))


def test_hiera_mae_decoder_pos_embed_of_a_non_square_grid_is_refused_naming_it():
    hiera = pytest.importorskip("hiera")
    torch.manual_seed(0)
    state = hiera.mae_hiera_tiny_224(pretrained=False).state_dict()
    with torch.device("meta"):
        ours = MaskedAutoencoder(load_preset("mae_hiera_tiny_224"))
    h, w, d = ours.decoder_pos_embed.shape[1:]  # (14, 14, 512); the package's is (1, 196, 512)
    assert tuple(state["decoder_pos_embed"].shape) == (1, h * w, d)
    n = 8 * 6
    state["decoder_pos_embed"] = torch.randn(1, n, d)
    with pytest.raises(ValueError, match=rf"decoder_pos_embed: source \(1, {n}, {d}\) vs model \(1, {h}, {w}, {d}\)"
                                         r".*cannot be inferred"):
        from_hiera_mae_state_dict(state, ours)
    # given channels-last with its grid, it is resized
    state["decoder_pos_embed"] = state["decoder_pos_embed"].reshape(1, 8, 6, d)
    got = from_hiera_mae_state_dict(state, ours)
    torch.testing.assert_close(got["decoder_pos_embed"], resize_pos_embed(state["decoder_pos_embed"], (h, w)))
    # a state dict that does not fit otherwise gets the whole report, naming decoder_pos_embed too
    del state["decoder_blocks.0.mlp.fc2.bias"]
    state["decoder_pos_embed"] = torch.randn(1, n, d)
    with pytest.raises(ValueError, match=r"missing: decoder_blocks\.0\.mlp\.fc2\.bias.*decoder_pos_embed: "
                                         rf"\(1, {n}, {d}\) vs model \(1, {h}, {w}, {d}\)"):
        from_hiera_mae_state_dict(state, ours)


def test_hvt_weights_load_into_a_model_built_for_another_resolution():
    """HVT's 1-D position embeddings of the pooled stages are resized (linearly) on load, so a
    224 model's weights load into one built for 256 (pooled lengths 97, 48 -> 127, 63)."""
    from hfactory.convert.resize import resize_seq_pos_embed
    from hfactory.encoder import load_checked

    small = hfactory.create_model("hvt_s_2")
    big = hfactory.create_model("hvt_s_2", img_size=256)
    load_checked(big, small.state_dict())
    for i in (1, 2):
        got = big.stages[i].pos_embed.pos_embed
        src = small.stages[i].pos_embed.pos_embed
        assert got.shape[1] == big.plan.stages[i].seq_len
        # linear interpolation, align_corners=False, written out for the first and last rows
        n, m = src.shape[1], got.shape[1]
        for j in (0, m - 1):
            pos = min(max((j + 0.5) * n / m - 0.5, 0.0), n - 1.0)
            lo = int(pos)
            hi = min(lo + 1, n - 1)
            expect = src[0, lo] * (1 - (pos - lo)) + src[0, hi] * (pos - lo)
            torch.testing.assert_close(got[0, j], expect)
    assert torch.equal(resize_seq_pos_embed(src, n), src)
    assert big(torch.randn(1, 3, 256, 256)).isfinite().all()


def test_hfactory_swin_weights_load_checked_into_non_square_windows():
    """load_checked (from_pretrained, --init-from, checkpoints) resizes tables to the owning
    module's window too, not only the timm converter."""
    from hfactory.encoder import load_checked

    src = hfactory.create_model("swin_tiny_patch4_window7_224")
    dst = hfactory.create_model("swin_tiny_patch4_window7_224", img_size=[192, 160])
    load_checked(dst, src.state_dict())
    key = "stages.3.blocks.0.token_mixer.relative_position_bias_table"
    torch.testing.assert_close(dict(dst.named_parameters())[key],
                               _bicubic(dict(src.named_parameters())[key].detach(), (13, 13), (11, 9)))
