"""hfactory.compat.xformers: xformers' removed hierarchical factory, rebuilt on hfactory.

Independent references: the xformers documentation example of the hierarchical factory, the API
and the faults of xformers commit 6e10bd21 (the MetaFormer trunk has 6,570,688 parameters), and
hand-computed token counts.
"""

import math
import os

import pytest
import torch

import hfactory.compat.xformers as compat
from hfactory import PlanError
from hfactory.compat.xformers import (
    BasicLayerConfig,
    ResidualNormStyle,
    get_hierarchical_configuration,
    xFormer,
    xFormerConfig,
)
from hfactory.layers.posembed import LearnedPosEmbed


def seed_example(image_size):
    """The xformers documentation example, verbatim except for its imports (above)."""
    base_hierarchical_configs = [
        BasicLayerConfig(
            embedding=64,  # the dimensions just have to match along the layers
            attention_mechanism="scaled_dot_product",  # anything you like
            patch_size=7,
            stride=4,
            padding=2,
            seq_len=image_size * image_size // 16,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=128,
            attention_mechanism="scaled_dot_product",
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 64,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=320,
            attention_mechanism="scaled_dot_product",
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 256,
            feedforward="MLP",
        ),
    ]

    # Fill in the gaps in the config
    xformer_config = get_hierarchical_configuration(
        base_hierarchical_configs,
        residual_norm_style="pre",
        use_rotary_embeddings=False,
        mlp_multiplier=4,
        dim_head=32,
    )
    config = xFormerConfig(xformer_config)
    model = xFormer.from_config(config)
    return model


def two_stages(h=32, w=None, **stage1):
    """A small 2-stage config list (stride 4 then 2) for an h x w image."""
    w = w or h
    return [
        BasicLayerConfig(embedding=32, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                         seq_len=(h // 4) * (w // 4), feedforward="MLP"),
        BasicLayerConfig(**{"embedding": 64, "attention_mechanism": "scaled_dot_product", "patch_size": 3, "stride": 2,
                            "padding": 1, "seq_len": (h // 8) * (w // 8), "feedforward": "MLP", **stage1}),
    ]


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_seed_example_maps_images_to_last_stage_tokens(image_size):
    model = seed_example(image_size).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, image_size * image_size // 256, 320)
    assert torch.isfinite(y).all()
    # The tokens are the encoder's final (normed) map, flattened row-major.
    with torch.no_grad():
        ref = model.encoder.forward_features(x)
    torch.testing.assert_close(y, ref.flatten(2).transpose(1, 2))
    # Fault 4 fixed: every stage has its own learned position embedding on its own grid.
    for i, stage in enumerate(model.encoder.stages):
        side = image_size // (4 * 2 ** i)
        assert isinstance(stage.pos_embed, LearnedPosEmbed)
        assert tuple(stage.pos_embed.pos_embed.shape) == (1, side, side, (64, 128, 320)[i])
    assert [s.num_heads for s in model.plan.stages] == [2, 4, 10]


def test_seed_example_is_a_pre_norm_stack_with_final_layernorm():
    model = seed_example(32)
    blocks = [b for s in model.encoder.stages for b in s.blocks]
    assert len(blocks) == 3 and all(b.pre_norm for b in blocks)
    assert isinstance(model.encoder.norm, torch.nn.LayerNorm)
    assert model.spec.head_norm_first


def test_metaformer_example_parameter_count_matches_xformers():
    # xformers' examples/cifar_MetaFormer.py trunk: 4 stages, rotary, dim_head 32, 32x32 input;
    # the reference measured 6,570,688 parameters and (B, 4, 512) outputs. hfactory adds one
    # learned position embedding to each of stages 2-4 (xformers had only stage 1's).
    image_size = 32
    configs = [
        BasicLayerConfig(embedding=e, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                         seq_len=image_size * image_size // 4 ** (i + 1), feedforward="MLP")
        for i, e in enumerate((64, 128, 320, 512))
    ]
    stack = get_hierarchical_configuration(configs, "pre", True, mlp_multiplier=4, dim_head=32)
    config = xFormerConfig(stack)
    config.weight_init = "moco"  # as the example does, after construction
    model = xFormer.from_config(config)
    extra_pos = 8 * 8 * 128 + 4 * 4 * 320 + 2 * 2 * 512
    assert sum(p.numel() for p in model.parameters()) == 6_570_688 + extra_pos
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 512)


def test_non_square_image_via_img_size():
    h, w = 64, 96
    configs = [
        BasicLayerConfig(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                         seq_len=(h // 4) * (w // 4), feedforward="MLP"),
        BasicLayerConfig(embedding=128, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                         seq_len=(h // 8) * (w // 8), feedforward="MLP"),
        BasicLayerConfig(embedding=320, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                         seq_len=(h // 16) * (w // 16), feedforward="MLP"),
    ]
    stack = get_hierarchical_configuration(configs, residual_norm_style="pre", use_rotary_embeddings=False,
                                           dim_head=32, img_size=(h, w))
    model = xFormer.from_config(xFormerConfig(stack))
    assert model.plan.img_size == (h, w)
    assert model(torch.randn(1, 3, h, w)).shape == (1, 4 * 6, 320)
    # Without img_size the (square) size cannot be derived from 16 * 24 = 384 tokens.
    with pytest.raises(ValueError, match="img_size"):
        get_hierarchical_configuration(configs, dim_head=32)


def test_model_built_square_runs_other_sizes_the_plan_admits():
    model = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(two_stages(32), dim_head=32)))
    assert model.plan.img_size == (32, 32)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 4 * 6, 64)
    with pytest.raises(PlanError, match="stride"):
        model(torch.randn(1, 3, 32, 36))  # 36 is not divisible by the stem's stride 4


def test_default_residual_norm_style_works_and_styles_are_honoured():
    # Fault 1: xformers' default (ResidualNormStyle.Pre) crashed.
    stack = get_hierarchical_configuration(two_stages())
    assert [c["residual_norm_style"] for c in stack] == ["pre", "pre"]
    pre = xFormer.from_config(xFormerConfig(stack))
    assert all(b.pre_norm for s in pre.encoder.stages for b in s.blocks)
    assert pre(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)

    enum_stack = get_hierarchical_configuration(two_stages(), residual_norm_style=ResidualNormStyle.Post)
    post = xFormer.from_config(xFormerConfig(enum_stack))
    assert not any(b.pre_norm for s in post.encoder.stages for b in s.blocks)
    assert isinstance(post.encoder.norm, torch.nn.Identity)  # no final norm after a post-norm stack

    for bad in ("deepnorm", "sandwich", ResidualNormStyle.DeepNorm):
        with pytest.raises(ValueError, match="'pre', 'post'"):
            get_hierarchical_configuration(two_stages(), residual_norm_style=bad)


def test_unknown_attention_name_lists_supported_names():
    with pytest.raises(ValueError) as err:
        get_hierarchical_configuration(two_stages(attention_mechanism="linformer"))
    msg = str(err.value)
    assert "linformer" in msg and "layer_base_configs[1].attention_mechanism" in msg
    assert "scaled_dot_product" in msg and "pooling" in msg
    with pytest.raises(ValueError, match="'scaled_dot_prodcut'.*did you mean 'scaled_dot_product'"):
        get_hierarchical_configuration(two_stages(attention_mechanism="scaled_dot_prodcut"))


def test_unsupported_feedforward_and_normalization_names_raise():
    with pytest.raises(ValueError, match="Conv2DFeedforward.*MLP"):
        get_hierarchical_configuration(two_stages(feedforward="Conv2DFeedforward"))
    with pytest.raises(ValueError, match="batchnorm.*layernorm, skip"):
        get_hierarchical_configuration(two_stages(normalization="batchnorm"))


def test_wrong_seq_len_of_a_later_stage_is_a_plan_error():
    # Fault 4: xformers ignored the seq_len of stages after the first.
    with pytest.raises(PlanError) as err:
        get_hierarchical_configuration(two_stages(seq_len=17))
    assert isinstance(err.value, ValueError)
    assert err.value.loc == "stages.1.seq_len"
    assert "stages.1.seq_len" in str(err.value) and "16" in str(err.value)
    # The same check guards hand-written stack configs.
    good = get_hierarchical_configuration(two_stages())
    good[1]["position_encoding_config"]["seq_len"] = 17
    with pytest.raises(ValueError, match=r"stages\.1\.seq_len.*stack_configs\[1\]"):
        xFormerConfig(good)


def test_dim_head_not_dividing_embedding_raises():
    # Fault 5: xformers asserted without a message.
    with pytest.raises(ValueError, match=r"layer_base_configs\[0\].*dim_head 24 does not divide embedding 32"):
        get_hierarchical_configuration(two_stages(), dim_head=24)


def test_unknown_keyword_to_basic_layer_config_raises():
    with pytest.raises(TypeError, match="window_size"):
        BasicLayerConfig(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                         seq_len=64, feedforward="MLP", window_size=7)


def test_unknown_keys_in_stack_configs_raise():
    # Fault 2: xformers silently dropped unknown keys inside attention / feedforward dicts.
    stack = get_hierarchical_configuration(two_stages())
    stack[1]["multi_head_config"]["attention"]["casual"] = True
    with pytest.raises(ValueError, match=r"stack_configs\[1\]\.multi_head_config\.attention: unknown key 'casual'"):
        xFormerConfig(stack)
    stack = get_hierarchical_configuration(two_stages())
    stack[0]["layer_norm_style"] = "pre"
    with pytest.raises(ValueError, match="unknown key 'layer_norm_style'.*residual_norm_style"):
        xFormerConfig(stack)
    stack = get_hierarchical_configuration(two_stages())
    del stack[0]["block_type"]
    with pytest.raises(ValueError, match="block_type"):
        xFormerConfig(stack)


def test_unsupported_model_options_raise():
    stack = get_hierarchical_configuration(two_stages())
    with pytest.raises(ValueError, match="tie_embedding_weights"):
        xFormerConfig(stack, tie_embedding_weights=True)
    with pytest.raises(ValueError, match="weight_init 'xavier'.*timm, vit, moco, small"):
        xFormerConfig(stack, weight_init="xavier")
    decoder = get_hierarchical_configuration(two_stages())
    decoder[1]["block_type"] = "decoder"
    with pytest.raises(ValueError, match="encoders only"):
        xFormerConfig(decoder)
    with pytest.raises(ValueError, match="tgt"):
        xFormer.from_config(xFormerConfig(stack))(torch.randn(1, 3, 32, 32), tgt=torch.randn(1, 16, 64))


def test_repeat_layer_gives_blocks_in_that_stage():
    stack = get_hierarchical_configuration(two_stages(repeat_layer=3))
    # xformers' format: the repeats follow as dicts without a patch embedding (separate copies here).
    assert len(stack) == 4
    assert ["patch_embedding_config" in c for c in stack] == [True, True, False, False]
    assert stack[2] is not stack[3]
    model = xFormer.from_config(xFormerConfig(stack))
    assert [len(s.blocks) for s in model.encoder.stages] == [1, 3]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)
    # A repeat dict that does not match its stage is refused, naming what differs.
    stack[3]["dim_model"] = 32
    with pytest.raises(ValueError, match="differs from it in: embedding"):
        xFormerConfig(stack)


def test_rotary_embeddings_are_applied():
    x = torch.randn(2, 3, 32, 32)
    plain = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        two_stages(), use_rotary_embeddings=False, dim_head=16))).eval()
    rotary = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        two_stages(), use_rotary_embeddings=True, dim_head=16))).eval()
    assert all(s.token_mixer["rotary"] for s in rotary.plan.stages)
    assert not any(s.token_mixer["rotary"] for s in plain.plan.stages)
    rotary.load_state_dict(plain.state_dict(), strict=True)  # rotary adds no parameters
    twin = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        two_stages(), use_rotary_embeddings=False, dim_head=16))).eval()
    twin.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        a, b, c = plain(x), rotary(x), twin(x)
    torch.testing.assert_close(a, c)  # same weights, same settings: same output
    assert b.shape == a.shape and (a - b).abs().max() > 1e-3  # so the difference is rotary's


def test_pooling_stages_ignore_heads_and_rotary_as_xformers():
    configs = two_stages(attention_mechanism="pooling")
    configs[0] = BasicLayerConfig(embedding=32, attention_mechanism="pooling", patch_size=7, stride=4, padding=2,
                                  seq_len=64, feedforward="MLP", normalization="skip")
    stack = get_hierarchical_configuration(configs, use_rotary_embeddings=True, dim_head=16)
    model = xFormer.from_config(xFormerConfig(stack))
    assert [s.token_mixer["kind"] for s in model.plan.stages] == ["pooling", "pooling"]
    assert model.plan.stages[0].norm["kind"] == "identity"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)


def test_dict_of_stacks_and_copies_are_independent():
    stack = get_hierarchical_configuration(two_stages())
    config = xFormerConfig({"stem": stack[0], "stage2": stack[1]})
    stack[1]["dim_model"] = 7  # the config was deep-copied: no effect
    model = xFormer.from_config(config)
    assert model.plan.num_features == 64
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)


def test_weight_init_follows_xformers():
    stack = get_hierarchical_configuration(two_stages(), dim_head=16)
    vit = xFormer.from_config(xFormerConfig(stack))  # default "vit"
    attn = vit.encoder.stages[0].blocks[0].token_mixer
    # q, k and v are initialised as separate 32x32 xavier matrices (bound sqrt(6/64) = 0.306), not
    # as one 96x32 matrix (bound sqrt(6/128) = 0.217).
    assert 0.217 < attn.qkv.weight.abs().max() <= math.sqrt(6 / 64) + 1e-6
    fc1 = vit.encoder.stages[0].blocks[0].mlp.fc1
    assert 0 < fc1.bias.abs().max() < 1e-4  # FFN biases ~ N(0, 1e-6)
    assert attn.qkv.bias.abs().max() == 0

    timm = xFormer.from_config(xFormerConfig(stack, weight_init="timm"))
    bound = math.sqrt(3) * 0.02
    for m in timm.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.abs().max() <= bound + 1e-7 and m.bias.abs().max() == 0
    stem = timm.encoder.stages[0].downsample.conv  # PyTorch's default: uniform(+-1/sqrt(fan_in))
    assert bound < stem.weight.abs().max() <= 1 / math.sqrt(3 * 7 * 7)


@pytest.mark.skipif("HFACTORY_XFORMERS_SRC" not in os.environ,
                    reason="set HFACTORY_XFORMERS_SRC to an xformers source tree at commit 6e10bd21 "
                           "(or any tree with xformers/factory) to compare outputs with the original")
@pytest.mark.parametrize("style", ["pre", "post"])
@pytest.mark.parametrize("attention", ["scaled_dot_product", "pooling"])
def test_same_outputs_as_original_xformers(style, attention, monkeypatch):
    monkeypatch.syspath_prepend(os.environ["HFACTORY_XFORMERS_SRC"])
    import contextlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    import xformers.factory as xff
    from xformers.helpers import hierarchical_configs as xhc

    def base(module):
        return [module.BasicLayerConfig(32, attention, 7, 4, 2, 64, "MLP", repeat_layer=2),
                module.BasicLayerConfig(64, attention, 3, 2, 1, 16, "MLP")]

    with contextlib.redirect_stdout(io.StringIO()):
        xcfg = xhc.get_hierarchical_configuration(base(xhc), residual_norm_style=style, dim_head=16)
    ref = xff.xFormer.from_config(xff.xFormerConfig(xcfg)).eval()
    ours = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        base(compat), residual_norm_style=style, dim_head=16))).eval()
    xs, new = ref.state_dict(), {}
    layers = [(s, b) for s, st in enumerate(ours.encoder.stages) for b in range(len(st.blocks))]
    for i, (s, b) in enumerate(layers):
        p, q = f"encoders.{i}.", f"encoder.stages.{s}."
        last = i == len(layers) - 1 and style == "pre"
        if b == 0:
            for t in ("weight", "bias"):
                new[f"{q}downsample.conv.{t}"] = xs[f"{p}patch_emb.1.{t}"]
        if style == "pre":
            att, ff = p + "wrap_att.layer.", p + ("wrap_ff.sublayer.layer." if last else "wrap_ff.layer.")
            norms = (att + "norm", ff + "norm")
            att, ff = att + "sublayer.", ff + "sublayer."
        else:
            norms = (p + "wrap_att.norm", p + "wrap_ff.norm")
            att, ff = p + "wrap_att.sublayer.layer.", p + "wrap_ff.sublayer.layer."
        for t in ("weight", "bias"):
            new[f"{q}blocks.{b}.norm1.{t}"] = xs[f"{norms[0]}.{t}"]
            new[f"{q}blocks.{b}.norm2.{t}"] = xs[f"{norms[1]}.{t}"]
            new[f"{q}blocks.{b}.mlp.fc1.{t}"] = xs[f"{ff}mlp.0.{t}"]
            new[f"{q}blocks.{b}.mlp.fc2.{t}"] = xs[f"{ff}mlp.3.{t}"]
            if attention == "scaled_dot_product":
                new[f"{q}blocks.{b}.token_mixer.qkv.{t}"] = torch.cat(
                    [xs[f"{att}in_proj_container.{n}_proj.{t}"] for n in "qkv"])
                new[f"{q}blocks.{b}.token_mixer.proj.{t}"] = xs[f"{att}proj.{t}"]
            if last:
                new[f"encoder.norm.{t}"] = xs[f"{p}wrap_ff.norm.{t}"]
    new["encoder.stages.0.pos_embed.pos_embed"] = xs["encoders.0.pose_encoding.pos_emb"].reshape(1, 8, 8, 32)
    new["encoder.stages.1.pos_embed.pos_embed"] = torch.zeros(1, 4, 4, 64)  # xformers had none here
    ours.load_state_dict(new, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
