"""SAM2's image-encoder trunk (HieraDet, arXiv 2408.00714) against timm ``sam2_hiera_tiny``
(timm ``models/hieradet_sam2.py``, which matches facebookresearch/sam2's ``Hiera`` exactly:
/work/shared/reference/sam2_hieradet.md section 5), after weight conversion.

Protocol (issue 4): the reference built with ``pretrained=False`` and randomised
(:func:`reference_utils.randomize_`: norms near 1, every bias and embedding non-zero), eval, fp32;
the final map, the pooled + normed head output and every stage map agree to
``max|diff| <= 1e-4 * max|ref|``, at 224 (no window padding) and 256 (stage 2's 14-windows pad
16 -> 28 and stage 3's 7-windows 8 -> 14, unmasked; the stage-3 q-pooling block pads 16 -> 28 in
14-windows, pools to 7 and crops to 8). SAM2-layout keys (``image_encoder.trunk.`` prefix,
``mlp.layers.0/1``, no ``head.norm``) are made from the timm reference's weights by the renaming
the reference file states (sections 1, 5 and 7.10).

The preset also equals the ``sam2`` package's own trunk (PyPI ``sam2==1.1.0``, the sdist matching
facebookresearch/sam2, reference file section 0), built from its ``sam2.1_hiera_t.yaml`` by hydra:
the sdist is fetched at test time into ``~/.cache/hfactory-tests`` and installed there (never in
the repository) with ``SAM2_BUILD_CUDA=0``; without network those tests skip, saying so. The other
named sizes (s, b+, l) are the preset plus a scaling rule and overrides, checked against timm's
parameter counts and against the package's configs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import hfactory
from hfactory import PlanError
from hfactory.convert import from_sam2_state_dict, from_timm, from_timm_state_dict
from hfactory.convert.sam2 import spec_from_timm_sam2
from hfactory.layers.sam2 import Sam2WindowAttention
from hfactory.presets import create_model
from hfactory.spec.variants import scale

from reference_utils import assert_rel_close, randomize_

NAME = "sam2_hiera_tiny"
REL = 1e-4


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(hw, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    """(randomised timm reference, the preset built by hfactory with its weights)."""
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(NAME, pretrained=False, weight_init="skip")).eval()
    ours = create_model(NAME).eval()
    ours.load_state_dict(from_timm_state_dict(ref.state_dict(), ours), strict=True)
    return ref, ours


def assert_same(ref, ours, x, what):
    with torch.no_grad():
        final, maps = ref.forward_intermediates(x)  # final NHWC, maps NCHW at strides 4..32
        our_final, our_maps = ours.forward_intermediates(x, output_fmt="NCHW")
        worst = assert_rel_close(our_final, final.permute(0, 3, 1, 2), REL, f"{what} final map")
        worst = max(worst, assert_rel_close(ours.forward_head(our_final), ref.forward_head(final), REL,
                                            f"{what} head"))
    assert len(our_maps) == len(maps) == 4
    for i, (m, r) in enumerate(zip(our_maps, maps)):
        worst = max(worst, assert_rel_close(m, r, REL, f"{what} stage {i}"))
    return worst


@pytest.mark.parametrize("hw", [(224, 224), (256, 256)])
def test_preset_matches_timm(pair, hw):
    ref, ours = pair
    assert n_params(ours) == n_params(ref) == 26_851_008
    # SAM2's trunk: timm's minus its head.norm (reference file, section 4)
    assert n_params(ours) - ours.norm.weight.numel() * 2 == 26_849_472
    x = images(hw, batch=2 if hw == (224, 224) else 1)
    worst = assert_same(ref, ours, x, f"{NAME} at {hw}")
    maps = ours.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(96 * 2 ** i, hw[0] // 2 ** (i + 2), hw[1] // 2 ** (i + 2))
                                                   for i in range(4)]
    assert worst < REL


def test_from_sam2_state_dict_with_trunk_prefix(pair):
    ref, ours = pair
    sam2 = {"image_encoder.trunk." + k.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1"): v
            for k, v in ref.state_dict().items() if not k.startswith("head.")}
    sam2["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(256, 768, 1, 1)  # other SAM2 parts: ignored
    assert any(".mlp.layers.0." in k for k in sam2)
    model = create_model(NAME).eval()
    model.load_state_dict(from_sam2_state_dict({"model": sam2}, model), strict=True)
    assert torch.equal(model.norm.weight, torch.ones(768)) and torch.equal(model.norm.bias, torch.zeros(768))
    x = images((224, 224), batch=1)
    with torch.no_grad():
        ours_maps = model.forward_intermediates(x, intermediates_only=True)
        maps = ref.forward_intermediates(x, intermediates_only=True)
    for i, (m, r) in enumerate(zip(ours_maps, maps)):
        assert_rel_close(m, r, REL, f"SAM2 keys, stage {i}")
    # unprefixed trunk keys (sam2.modeling.backbones.hieradet.Hiera's own state dict) load the same way
    trunk = {k[len("image_encoder.trunk."):]: v for k, v in sam2.items() if k.startswith("image_encoder.trunk.")}
    assert all(torch.equal(a, b) for a, b in zip(from_sam2_state_dict(trunk, model).values(),
                                                 from_sam2_state_dict(sam2, model).values()))
    with pytest.raises(ValueError, match=r"missing: .*stages\.0\.pos_embed\.pos_embed_win"):
        from_sam2_state_dict({k: v for k, v in trunk.items() if k != "pos_embed_window"}, model)


def test_spec_from_timm_reproduces_the_preset(pair):
    ref, ours = pair
    assert hfactory.resolve(hfactory.load_spec(spec_from_timm_sam2(ref))) == ours.plan


def test_depth_variant_converts_via_from_timm():
    ref = randomize_(timm.create_model(NAME, pretrained=False, weight_init="skip", stages=(1, 1, 3, 1),
                                       global_att_blocks=(3,), embed_dim=32, num_heads=1)).eval()
    ours = from_timm(ref).eval()
    assert n_params(ours) == n_params(ref)
    assert assert_same(ref, ours, images((256, 256), batch=1), "32-wide") < REL


def test_plan_shows_the_lag_and_the_global_blocks(pair):
    _, ours = pair
    s1, s2, s3 = ours.plan.stages[1:]
    # stage transitions keep the previous stage's window (8 -> 4 queries, 4 -> 2, 14 -> 7)
    assert [(s.blocks[0].token_mixer["window_size"], s.blocks[0].q_stride) for s in (s1, s2, s3)] == [
        ([8, 8], (2, 2)), ([4, 4], (2, 2)), ([14, 14], (2, 2))]
    assert [b.token_mixer["kind"] for b in s2.blocks] == ["sam2_window_attention", "sam2_window_attention",
                                                          "attention", "sam2_window_attention", "attention",
                                                          "sam2_window_attention", "attention"]
    assert hfactory.resolve(ours.spec, (256, 256)).stages[2].token_mixer["padded_grid"] == [28, 28]


def test_q_stride_must_divide_the_window():
    spec = hfactory.load_preset(NAME).model_dump(mode="json", exclude_none=True)
    spec["stages"][2]["token_mixer"]["window_size"] = 7  # the stage-3 transition lags with window 7
    with pytest.raises(PlanError) as err:
        hfactory.resolve(hfactory.load_spec(spec))
    assert err.value.loc == "stages.2.token_mixer.window_size" and "multiple of 2" in str(err.value)


def test_padding_is_not_masked():
    """Hand-computed reference: SAM2's pad / partition / SDPA / unpartition with zero padding
    (no mask), on a 5x6 grid in 4x4 windows; a masked (Swin-style) version differs."""
    torch.manual_seed(0)
    attn = Sam2WindowAttention(dim=8, num_heads=2, dim_head=4, window_size=[4, 4], grid=[5, 6],
                               padded_grid=[8, 8]).eval()
    x = torch.randn(2, 5, 6, 8)
    xp = F.pad(x, (0, 0, 0, 2, 0, 3))  # (2, 8, 8, 8)
    win = xp.reshape(2, 2, 4, 2, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(8, 16, 8)
    q, k, v = attn.qkv(win).reshape(8, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
    o = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(8, 16, 8))
    expected = o.reshape(2, 2, 2, 4, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 8)[:, :5, :6]
    with torch.no_grad():
        got = attn(x)
        assert torch.allclose(got, expected, atol=1e-6)
        real = torch.zeros(8, 8, dtype=torch.bool)
        real[:5, :6] = True
        keep = real.reshape(2, 4, 2, 4).permute(0, 2, 1, 3).reshape(4, 16).repeat(2, 1)  # (8 windows, 16 keys)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        masked = attn.proj(masked.transpose(1, 2).reshape(8, 16, 8))
        masked = masked.reshape(2, 2, 2, 4, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 8)[:, :5, :6]
        assert (masked - got).abs().max() > 1e-3


# ------------------------------------------------------------------------------- SAM2's FPN neck


def test_sine_position_encoding_by_its_formula():
    """SAM2's PositionEmbeddingSine (normalize, scale 2*pi, temperature 1e4), element by element:
    channel k < d/2 encodes the row, k >= d/2 the column, sin at even k, cos at odd k."""
    from hfactory.necks import SinePositionEncoding

    d, h, w = 8, 3, 5
    pos = SinePositionEncoding(d)(torch.zeros(2, 1, h, w))
    assert pos.shape == (2, d, h, w)
    half = d // 2
    for c in range(d):
        k = c % half
        for y in range(h):
            for x in range(w):
                p, n = (y + 1, h) if c < half else (x + 1, w)
                angle = p / (n + 1e-6) * 2 * torch.pi / 10000 ** (2 * (k // 2) / half)
                want = torch.sin(torch.tensor(angle)) if k % 2 == 0 else torch.cos(torch.tensor(angle))
                assert abs(pos[1, c, y, x].item() - want.item()) < 1e-6, (c, y, x)


def test_fpn_neck_on_the_sam2_trunk_matches_the_reference_formula(pair):
    """SAM2.1's neck (d_model 256, top-down on levels 2 and 3, nearest, sum): parameter count of
    the reference file (369,664) and outputs by the formula: level 3 and levels 0-1 lateral only,
    level 2 = lateral + level 3 repeated 2x2."""
    from hfactory.necks import FpnNeck

    _, ours = pair
    neck = FpnNeck.from_encoder(ours)
    assert n_params(neck) == 369_664
    torch.manual_seed(0)
    for p in neck.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        maps = ours.forward_intermediates(images((224, 224), batch=1), intermediates_only=True)
        feats, pos = neck(maps)

        def lateral(i):  # convs[0] goes with the stride-32 map (SAM2's order)
            conv = neck.convs[3 - i].conv
            return torch.einsum("bchw,oc->bohw", maps[i], conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]

        level3 = lateral(3)
        want = [lateral(0), lateral(1), lateral(2) + level3.repeat_interleave(2, 2).repeat_interleave(2, 3), level3]
    for i in range(4):
        assert feats[i].shape == (1, 256, 56 >> i, 56 >> i)
        assert torch.allclose(feats[i], want[i], atol=1e-4), i
        assert torch.equal(pos[i], neck.position_encoding(feats[i]))
    with pytest.raises(ValueError, match="top_down_levels"):
        FpnNeck([96, 192], top_down_levels=[2])


# ------------------------------------------------------------- the other named sizes, by scaling


#: timm's (and SAM2.1's) other trunks from the tiny preset: a scaling rule (depths; b+ and l widen
#: with the head count kept and doubled, head dim 96 -> 56 / 72) plus ordinary overrides for what a
#: depth/width rule cannot know: the global-attention blocks (stage-3 indices of timm's
#: ``global_att_blocks``, no pattern shared by the sizes: t 2/4/6, s 4/7/10, b+ 7/11/15,
#: l 15/25/35 of 7/11/16/36 blocks, so the tiny preset's ``at: [2, 4, 6]`` is not scaled),
#: b+'s 14x14 background position embedding and l's windows 16/8 in stages 3-4.
SIZES = {
    "sam2_hiera_small": ("sam2.1_hiera_s", {"depth_multiplier": [1, 1, 11 / 7, 1]}, [4, 7, 10], {}),
    "sam2_hiera_base_plus": ("sam2.1_hiera_b+", {"depth_multiplier": [2, 1.5, 16 / 7, 1.5], "width_multiplier": 7 / 6,
                                                 "heads": "keep_num_heads", "head_multiplier": 2},
                             [7, 11, 15], {"stages.0.pos_embed.global_pos_size": 14}),
    "sam2_hiera_large": ("sam2.1_hiera_l", {"depth_multiplier": [2, 3, 36 / 7, 2], "width_multiplier": 1.5,
                                            "heads": "keep_num_heads", "head_multiplier": 2},
                         [15, 25, 35], {"stages.2.token_mixer.window_size": 16, "stages.3.token_mixer.window_size": 8}),
}


def scaled_spec(name):
    _, rule, global_blocks, changes = SIZES[name]
    spec = scale(hfactory.load_preset(NAME), rule, name=name)
    return spec.with_changes({**changes, "stages.2.blocks.0.at": global_blocks})


def block_layout(blocks):
    """(window, heads, dim_out, q-pooled) per block of a timm ``HieraDet`` or a sam2 ``Hiera``;
    window 0 = global attention."""
    def side(w):
        return w[0] if isinstance(w, (tuple, list)) else w
    return [(side(b.window_size), b.attn.num_heads, b.dim_out, bool(b.q_stride)) for b in blocks]


def planned_layout(plan):
    return [(b.token_mixer["window_size"][0] if b.token_mixer["kind"] == "sam2_window_attention" else 0,
             b.token_mixer["num_heads"], b.token_mixer["dim"], b.q_stride is not None)
            for stage in plan.stages for b in stage.blocks]


@pytest.mark.parametrize("name", list(SIZES))
def test_named_sizes_from_scaling_rule(name):
    """Parameter count from timm's own model (meta device), and the per-block layout the count
    cannot see (global blocks, windows with the q-pooling lag, head counts)."""
    spec = scaled_spec(name)
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = hfactory.build_encoder(spec)
    assert n_params(ours) == n_params(ref), name
    assert planned_layout(ours.plan) == block_layout(ref.blocks), name
    assert ours.plan.stages[0].pos_embed["global_pos_size"] == list(ref.global_pos_size)


# ---------------------------------------------- the sam2 package's own trunk (PyPI sam2==1.1.0)

SAM2_VERSION = "1.1.0"
#: sam2's pure-Python runtime needs for ``sam2/__init__.py`` (hydra) and ``hieradet.py`` (iopath),
#: pinned; torch, numpy, tqdm and pillow come from the test environment.
SAM2_DEPS = ("hydra-core==1.3.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "iopath==0.1.10",
             "portalocker==4.4.2")


def _cache_dir() -> Path:
    if os.environ.get("HFACTORY_TEST_CACHE"):
        return Path(os.environ["HFACTORY_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfactory-tests"


def _pip(args, what):
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    env = dict(os.environ, SAM2_BUILD_CUDA="0", SAM2_BUILD_ALLOW_ERRORS="0")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{what} timed out (no network?)")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = " ".join(([ln.strip() for ln in lines if "ERROR" in ln] or lines)[-2:])
        pytest.skip(f"{what} failed (no network?): {tail}")


def _sam2_site(scratch: Path) -> Path:
    """A ``--target`` folder with the sam2 sdist installed as its setup.py builds it with
    ``SAM2_BUILD_CUDA=0`` (pure Python, against the test environment's torch: no build isolation,
    so no second torch is fetched) and its small pure-Python dependencies; cached in
    ``~/.cache/hfactory-tests`` (``$HFACTORY_TEST_CACHE``), never in the repository."""
    site = _cache_dir() / f"sam2-{SAM2_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    if (site / "sam2" / "modeling" / "backbones" / "hieradet.py").is_file():
        return site
    sdist = _cache_dir() / f"sam2-{SAM2_VERSION}.tar.gz"
    if not sdist.is_file():
        # no build isolation: the metadata step would otherwise fetch a whole torch to build in
        _pip(["download", f"sam2=={SAM2_VERSION}", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
              "-d", str(scratch)],
             f"pip download of the sam2 {SAM2_VERSION} sdist")
        found = sorted(scratch.glob("sam2-*.tar.gz"))
        if not found:
            pytest.skip(f"pip download gave no sam2 {SAM2_VERSION} sdist")
        sdist.parent.mkdir(parents=True, exist_ok=True)
        partial = sdist.with_name(f"{sdist.name}.{os.getpid()}.partial")
        shutil.copyfile(found[0], partial)
        os.replace(partial, sdist)  # atomic: a concurrent run sees the whole file or none
    target = site.with_name(f"{site.name}.{os.getpid()}.partial")
    shutil.rmtree(target, ignore_errors=True)
    _pip(["install", "--no-deps", "--no-build-isolation", "--no-compile", "--target", str(target), str(sdist),
          *SAM2_DEPS], f"installing the sam2 {SAM2_VERSION} sdist and {', '.join(SAM2_DEPS)}")
    try:
        os.replace(target, site)
    except OSError:  # a concurrent run finished first
        shutil.rmtree(target, ignore_errors=True)
    return site


@pytest.fixture(scope="module")
def sam2_pkg(tmp_path_factory):
    """``(Hiera, build)``: the sam2 package's trunk class and ``build(config)``, which instantiates
    ``model.image_encoder.trunk`` of ``sam2/configs/sam2.1/<config>.yaml`` with hydra, as SAM2's
    ``build_sam2`` does; the package's code runs unmodified (``import sam2`` initialises hydra)."""
    site = _sam2_site(tmp_path_factory.mktemp("sam2-sdist"))
    sys.path.insert(0, str(site))
    try:
        import sam2  # noqa: F401  (its __init__: hydra's initialize_config_module("sam2"))
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from sam2.modeling.backbones.hieradet import Hiera

        assert Path(sam2.__file__).resolve().is_relative_to(site.resolve()), sam2.__file__

        def build(config: str):
            cfg = OmegaConf.load(site / "sam2" / "configs" / "sam2.1" / f"{config}.yaml")
            trunk = instantiate(cfg.model.image_encoder.trunk)
            assert type(trunk) is Hiera
            return trunk

        yield Hiera, build
    finally:
        sys.path.remove(str(site))


def test_preset_equals_the_sam2_package_trunk(sam2_pkg):
    """``sam2_hiera_tiny`` against SAM2.1's own tiny trunk (sam2.1_hiera_t.yaml: embed 96, heads 1,
    stages 1/2/7/2, global blocks 5/7/9, background position 7x7, windows 8/4/14/7), randomised and
    converted with :func:`from_sam2_state_dict`: the 4 stage maps (NCHW, strides 4-32) within
    1e-4 x max|ref| at 224 (no padding) and 256 (padded windows in stages 3-4), the parameter count,
    and a full-model state dict (``image_encoder.trunk.``, ``{"model": ...}``) converting the same."""
    _, build = sam2_pkg
    trunk = randomize_(build("sam2.1_hiera_t"), seed=3).eval()
    ours = create_model(NAME).eval()
    # SAM2's trunk has no final norm; the preset's (timm's head.norm, pooled vector only) has 2 x 768
    assert n_params(trunk) == n_params(ours) - 2 * 768 == 26_849_472
    ours.load_state_dict(from_sam2_state_dict(trunk.state_dict(), ours), strict=True)
    worst = 0.0
    for hw, batch in (((224, 224), 1), ((256, 256), 1)):
        x = images(hw, batch=batch, seed=5)
        with torch.no_grad():
            maps = trunk(x)  # list of 4 NCHW maps, high to low resolution
            our_maps = ours.forward_intermediates(x, intermediates_only=True)
        assert len(maps) == len(our_maps) == 4
        for i, (m, r) in enumerate(zip(our_maps, maps)):
            worst = max(worst, assert_rel_close(m, r, REL, f"sam2 package trunk at {hw}, stage {i}"))
    print(f"sam2 package trunk vs sam2_hiera_tiny: worst max|diff| / max|ref| = {worst:.2e}")
    assert worst < REL
    full = {"model": {"image_encoder.trunk." + k: v for k, v in trunk.state_dict().items()}}
    full["model"]["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(256, 768, 1, 1)
    converted, loaded = from_sam2_state_dict(full, ours), ours.state_dict()
    assert set(converted) == set(loaded)
    assert all(torch.equal(converted[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("name", list(SIZES))
def test_named_sizes_equal_the_sam2_package_configs(sam2_pkg, name):
    """The scaled specs against SAM2.1's own s/b+/l trunk configs: parameter count (the preset's
    final norm aside) and the per-block layout. sam2's trunk is built on the CPU (its constructor
    calls ``.item()`` on the drop-path schedule, which the meta device refuses; large: ~2 s)."""
    _, build = sam2_pkg
    trunk = build(SIZES[name][0])
    with torch.device("meta"):
        ours = hfactory.build_encoder(scaled_spec(name))
    assert n_params(trunk) == n_params(ours) - ours.norm.weight.numel() * 2, name
    assert planned_layout(ours.plan) == block_layout(trunk.blocks), name
