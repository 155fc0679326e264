"""MetaFormer presets reproduce timm exactly (issue 4): PoolFormer v1/v2, ConvFormer, CAFormer."""

import pytest
import torch

import hfactory
from hfactory import resolve
from hfactory.convert import from_timm, from_timm_state_dict
from reference_utils import assert_rel_close, randomize_

timm = pytest.importorskip("timm")

PRESETS = ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"]


def count(model):
    return sum(p.numel() for p in model.parameters())


def timm_metaformer(family: str, **kwargs):
    """A timm MetaFormer of ``family``'s configuration with other depths/dims (timm's registered
    constructors fix depths and dims, so build the class with their arguments)."""
    from timm.layers import GroupNorm1
    from timm.models.metaformer import (Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv)

    base = {
        "poolformer": dict(downsample_norm=None, mlp_act=torch.nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
                           layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False),
        "convformer": dict(token_mixers=SepConv, norm_layers=LayerNorm2dNoBias),
        "caformer": dict(token_mixers=[SepConv, SepConv, Attention, Attention],
                         norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2),
    }[family]
    return MetaFormer(**base, **kwargs)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_timm_after_conversion(name):
    ref = randomize_(timm.create_model(name, pretrained=False)).eval()
    model = hfactory.create_model(name).eval()
    assert count(model) == count(ref)
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_rel_close(model(x), ref(x), what=f"{name} logits")
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    assert len(ours) == len(theirs) == 4
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert_rel_close(o, t, what=f"{name} stage {i}")


@pytest.mark.parametrize("name,kwargs", [
    ("caformer", dict(depths=(1, 2, 1, 1), dims=(32, 64, 96, 128))),
    ("poolformer", dict(depths=(1, 1, 3, 1), dims=(16, 32, 48, 64), num_classes=5)),
])
def test_depth_and_width_variants_convert_with_from_timm(name, kwargs):
    ref = randomize_(timm_metaformer(name, **kwargs)).eval()
    model = from_timm(ref).eval()
    assert count(model) == count(ref)
    assert [s.depth for s in model.plan.stages] == list(kwargs["depths"])
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert_rel_close(model(x), ref(x), what=f"{name} variant")


def test_variant_made_by_editing_the_preset_yaml_converts():
    spec = hfactory.load_preset("convformer_s18").model_dump(mode="json", exclude_none=True)
    spec["stages"][2]["depth"] = 4
    spec["stages"][3]["embedding"] = 256
    model = hfactory.build_encoder(spec).eval()
    ref = randomize_(timm_metaformer("convformer", depths=(3, 3, 4, 3), dims=(64, 128, 320, 256))).eval()
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(model(x), ref(x), what="edited convformer")


def test_state_dict_of_another_size_is_refused_naming_keys():
    model = hfactory.create_model("caformer_s18")
    other = timm_metaformer("caformer", depths=(3, 3, 6, 3)).state_dict()
    with pytest.raises(ValueError, match=r"missing: stages\.2\.blocks\.6"):
        from_timm_state_dict(other, model)
    with pytest.raises(ValueError, match="shape mismatch"):
        from_timm_state_dict(timm_metaformer("caformer", dims=(64, 128, 256, 512)).state_dict(), model)
    with pytest.raises(ValueError, match="no converter recognises"):
        from_timm_state_dict({"foo.weight": torch.zeros(1)}, model)


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"])
@pytest.mark.parametrize("hw", [(256, 256), (320, 256)])
def test_other_resolutions_follow_the_plan(name, hw):
    model = hfactory.create_model(name).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
    plan = resolve(model.spec, img_size=hw)
    assert [tuple(m.shape[1:]) for m in maps] == [(s.out_chs, *s.out_grid) for s in plan.stages]


def test_presets_are_listed():
    assert set(PRESETS) <= set(hfactory.list_models())
    assert hfactory.list_models("caformer*") == ["caformer_s18"]
    with pytest.raises(ValueError, match="did you mean 'caformer_s18'"):
        hfactory.create_model("caformer_s81")


def test_star_relu_fast_paths_equal_the_formula():
    # StarReLU's hand-written backward and in-place inference path against scale * relu(x)^2 + bias
    # differentiated by autograd (float64, so any difference is a wrong formula, not rounding).
    from hfactory.layers.feedforward import StarReLU

    ours = StarReLU(0.8944, -0.4472).double()
    scale, bias = (p.detach().clone().requires_grad_() for p in (ours.scale, ours.bias))
    x = torch.randn(2, 5, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :2] = 0.0  # the ReLU's kink
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = ours(xa), scale * torch.relu(xb) ** 2 + bias
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    for a, b in ((y, ref), (xa.grad, xb.grad), (ours.scale.grad, scale.grad), (ours.bias.grad, bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        before = x.clone()
        torch.testing.assert_close(ours(x), ref.detach(), rtol=1e-12, atol=1e-12)
        assert torch.equal(x, before)  # the in-place path never writes into its input
    with pytest.raises(RuntimeError):  # first order only: a second derivative is refused, not wrong
        g, = torch.autograd.grad(ours(xa).sum(), xa, create_graph=True)
        g.sum().backward()


def test_star_relu_promotes_like_the_formula_in_bf16():
    # bf16 activations with fp32 parameters (autocast): fp32 out on both paths, as type promotion
    # gives for scale * relu(x)^2 + bias, and gradients of the input's dtype.
    from hfactory.layers.feedforward import StarReLU

    act = StarReLU(0.8944, -0.4472)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
    y = act(x)
    want = act.scale * torch.relu(x.detach().float()) ** 2 + act.bias
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and act.scale.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), (2 * act.scale * torch.relu(x.detach().float())).detach(),
                               rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        assert act(x).dtype == torch.float32
