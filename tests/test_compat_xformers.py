"""hfactory.compat.xformers: xformers' removed hierarchical factory, rebuilt on hfactory.

Independent references: the xformers documentation example of the hierarchical factory (seed 004),
hand-computed token and parameter counts, and what xformers 0.0.28's factory itself builds:
parameter counts, state-dict keys and shapes, and outputs for fixed weights, recorded by running
the xformers 0.0.28 wheel's pure-Python factory on CPU (``tests/xformers028_facts.py`` says how).
"""

import math

import pytest
import torch
from pydantic import ValidationError

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
from xformers028_facts import FACTS, VARIANTS, filled_state_dict, output_samples, probe_image


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


def build_variant(name, **options):
    """hfactory's build of ``VARIANTS[name]``, the way the recorded xformers model was built."""
    v = VARIANTS[name]
    config = xFormerConfig(get_hierarchical_configuration([BasicLayerConfig(**layer) for layer in v["layers"]],
                                                          **v["kwargs"]), **options)
    if "weight_init" in v:
        config.weight_init = v["weight_init"]
    return xFormer.from_config(config)


def two_stages(h=32, w=None, **stage1):
    """A small 2-stage config list (stride 4 then 2) for an h x w image."""
    w = w or h
    return [
        BasicLayerConfig(embedding=32, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                         seq_len=(h // 4) * (w // 4), feedforward="MLP"),
        BasicLayerConfig(**{"embedding": 64, "attention_mechanism": "scaled_dot_product", "patch_size": 3, "stride": 2,
                            "padding": 1, "seq_len": (h // 8) * (w // 8), "feedforward": "MLP", **stage1}),
    ]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ equal to xformers 0.0.28


def test_seed_example_has_xformers_028_parameter_count_and_state_dict_keys():
    facts = FACTS["seed004_224"]  # recorded from xformers 0.0.28's factory: 2,134,848 parameters, 57 keys
    assert facts["params"] == 2_134_848 and len(facts["keys"]) == 57
    model = seed_example(224)
    assert n_params(model) == facts["params"]
    state = model.state_dict()
    assert sorted(state) == sorted(key for key, _ in facts["keys"])
    assert [(key, tuple(t.shape)) for key, t in state.items()] == facts["keys"]  # same shapes, same order
    # By hand: xformers' one position embedding (stage 0, 56x56 tokens of 64 channels) is the only
    # one; per-stage embeddings would add 28*28*128 + 14*14*320 parameters.
    assert state["encoders.0.pose_encoding.pos_emb"].shape == (1, 56 * 56, 64)
    assert not any("pose_encoding" in key for key in state if not key.startswith("encoders.0."))


def test_metaformer_example_has_xformers_028_parameter_count_and_keys():
    # examples/cifar_MetaFormer.py's trunk; 6,570,688 parameters as xformers 0.0.28 built it.
    facts = FACTS["metaformer"]
    assert facts["params"] == 6_570_688
    model = build_variant("metaformer")
    assert n_params(model) == facts["params"]
    assert [(key, tuple(t.shape)) for key, t in model.state_dict().items()] == facts["keys"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 512)


@pytest.mark.parametrize("name", [name for name, v in VARIANTS.items() if v.get("probe")])
def test_outputs_equal_xformers_028_for_its_state_dict(name):
    # The recorded xformers model was given these weights (its own keys and shapes) and this input;
    # hfactory's build loads the same state dict strictly and must compute the same tokens.
    v, facts = VARIANTS[name], FACTS[name]
    model = build_variant(name).eval()
    model.load_state_dict(filled_state_dict(facts["keys"], facts["buffers"]), strict=True)
    with torch.no_grad():
        y = model(probe_image(v["image_size"]))
    assert tuple(y.shape) == facts["out_shape"]
    got = output_samples(y)
    assert got["head"] == pytest.approx(facts["head"], abs=5e-5)
    assert got["token_norms"] == pytest.approx(facts["token_norms"], abs=5e-4)
    assert got["sum"] == pytest.approx(facts["sum"], abs=2e-3)
    assert got["abs_mean"] == pytest.approx(facts["abs_mean"], abs=5e-6)


@pytest.mark.parametrize("name", ["post_rotary_repeat", "pre_pooling_skip_then_attention"])
def test_state_dict_keys_equal_xformers_028_except_pooling_projections(name):
    facts = FACTS[name]
    model = build_variant(name)
    state = model.state_dict()
    xformers_keys = dict(facts["keys"])
    assert {key: tuple(t.shape) for key, t in state.items() if key in xformers_keys} == \
        {key: shape for key, shape in xformers_keys.items() if key in state}
    assert set(state) <= set(xformers_keys)
    if "pooling" not in name:
        assert set(state) == set(xformers_keys)
        assert n_params(model) == facts["params"]
        return
    # xformers' pooling layers (0 and 1) carried an output projection it never applied (and a rotary
    # buffer): hfactory has neither, so it has 2 * (32 * 32 + 32) parameters fewer.
    unused = {f"encoders.{i}.wrap_att.layer.sublayer.{p}" for i in (0, 1)
              for p in ("proj.weight", "proj.bias", "rotary_embeddings.inv_freq")}
    assert set(xformers_keys) - set(state) == unused
    assert n_params(model) == facts["params"] - 2 * (32 * 32 + 32)


def test_state_dict_round_trips_and_native_keys_load():
    model = build_variant("post_rotary_repeat").eval()
    x = torch.randn(2, 3, 32, 32)
    twin = build_variant("post_rotary_repeat").eval()
    twin.load_state_dict(model.state_dict(), strict=True)  # xformers' format
    native = build_variant("post_rotary_repeat").eval()
    native.load_state_dict({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        torch.testing.assert_close(native(x), model(x))
    # q, k and v are the thirds of hfactory's fused projection; the position embedding its grid, row-major.
    state, attn = model.state_dict(), model.encoder.stages[0].blocks[0].token_mixer
    prefix = "encoders.0.wrap_att.sublayer.layer.in_proj_container."
    torch.testing.assert_close(state[prefix + "k_proj.weight"], attn.qkv.weight[32:64])
    torch.testing.assert_close(state[prefix + "v_proj.bias"], attn.qkv.bias[64:])
    pos = model.encoder.stages[0].pos_embed.pos_embed  # (1, 8, 8, 32)
    torch.testing.assert_close(state["encoders.0.pose_encoding.pos_emb"][0, 8 * 3 + 5], pos[0, 3, 5])
    # The rotary buffer is xformers' 1 / 10000^(2i/d) for d = 16 channels per head.
    inv_freq = state["encoders.0.wrap_att.sublayer.layer.rotary_embeddings.inv_freq"]
    torch.testing.assert_close(inv_freq, torch.tensor([10000 ** (-i / 8) for i in range(8)]))
    # An incomplete xformers state dict is refused.
    del state[prefix + "k_proj.weight"]
    with pytest.raises(RuntimeError, match="k_proj.weight"):
        twin.load_state_dict(state, strict=True)


def test_state_dict_keys_when_nested_in_another_module():
    trunk = build_variant("post_rotary_repeat")
    outer = torch.nn.Sequential(trunk, torch.nn.Linear(64, 10))
    keys = list(outer.state_dict())
    assert "0.encoders.0.patch_emb.1.weight" in keys and "1.weight" in keys
    outer.load_state_dict(outer.state_dict(), strict=True)


# ------------------------------------------------------------------------------ position embeddings


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
    # As xformers: a learned position embedding on the first stage only.
    side = image_size // 4
    assert isinstance(model.encoder.stages[0].pos_embed, LearnedPosEmbed)
    assert tuple(model.encoder.stages[0].pos_embed.pos_embed.shape) == (1, side, side, 64)
    assert [isinstance(s.pos_embed, LearnedPosEmbed) for s in model.encoder.stages] == [True, False, False]
    assert [s.num_heads for s in model.plan.stages] == [2, 4, 10]


def test_position_embedding_on_every_stage_option():
    v = VARIANTS["seed004_224"]
    configs = get_hierarchical_configuration([BasicLayerConfig(**layer) for layer in v["layers"]], **v["kwargs"])
    config = xFormerConfig(configs, position_embedding_on_every_stage=True)
    model = xFormer.from_config(config)
    assert [isinstance(s.pos_embed, LearnedPosEmbed) for s in model.encoder.stages] == [True, True, True]
    assert n_params(model) == 2_134_848 + 28 * 28 * 128 + 14 * 14 * 320
    state = model.state_dict()
    assert state["encoders.1.pose_encoding.pos_emb"].shape == (1, 28 * 28, 128)
    assert state["encoders.2.pose_encoding.pos_emb"].shape == (1, 14 * 14, 320)
    model.load_state_dict(state, strict=True)
    direct = xFormer(configs, position_embedding_on_every_stage=True)
    assert n_params(direct) == n_params(model)
    # Keyword-only, and a bool.
    with pytest.raises(TypeError):
        xFormerConfig(configs, False, "vit", True)
    with pytest.raises(ValidationError, match="position_embedding_on_every_stage"):
        xFormerConfig(configs, position_embedding_on_every_stage="yes")


def test_seed_example_is_a_pre_norm_stack_with_final_layernorm():
    model = seed_example(32)
    blocks = [b for s in model.encoder.stages for b in s.blocks]
    assert len(blocks) == 3 and all(b.pre_norm for b in blocks)
    assert isinstance(model.encoder.norm, torch.nn.LayerNorm)
    assert model.spec.head_norm_first


# ------------------------------------------------------------------------------ sizes


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
    with pytest.raises(ValidationError, match=r"layer_base_configs\.0\.seq_len\n  384 is not a square.*img_size"):
        get_hierarchical_configuration(configs, dim_head=32)
    with pytest.raises(ValidationError, match=r"img_size\n.*positive int or \(height, width\)"):
        get_hierarchical_configuration(configs, dim_head=32, img_size=(64, 0))


def test_model_built_square_runs_other_sizes_the_plan_admits():
    model = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(two_stages(32), dim_head=32)))
    assert model.plan.img_size == (32, 32)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 4 * 6, 64)
    with pytest.raises(PlanError, match="stride"):
        model(torch.randn(1, 3, 32, 36))  # 36 is not divisible by the stem's stride 4


def test_wrong_seq_len_of_a_later_stage_is_a_plan_error():
    # xformers ignored the seq_len of stages after the first.
    with pytest.raises(PlanError) as err:
        get_hierarchical_configuration(two_stages(seq_len=17))
    assert isinstance(err.value, ValueError)
    assert err.value.loc == "stages.1.seq_len"
    assert "stages.1.seq_len" in str(err.value) and "16" in str(err.value)
    assert "layer_base_configs.1" in str(err.value)
    # The same check guards hand-written stack configs.
    good = get_hierarchical_configuration(two_stages())
    good[1]["position_encoding_config"]["seq_len"] = 17
    with pytest.raises(PlanError, match=r"stages\.1\.seq_len.*stack_configs\.1\b"):
        xFormerConfig(good)


# ------------------------------------------------------------------------------ the helper's arguments


def test_default_residual_norm_style_works_and_styles_are_honoured():
    # xformers' default (ResidualNormStyle.Pre) crashed.
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
        with pytest.raises(ValidationError, match=r"residual_norm_style\n.*valid: 'pre', 'post'"):
            get_hierarchical_configuration(two_stages(), residual_norm_style=bad)


def test_unknown_attention_name_names_location_and_supported_names():
    with pytest.raises(ValidationError) as err:
        get_hierarchical_configuration(two_stages(attention_mechanism="linformer"))
    msg = str(err.value)
    assert "layer_base_configs.1.attention_mechanism\n" in msg
    assert "xformers' 'linformer' attention is not supported" in msg
    assert "supported xformers names: pooling, scaled_dot_product" in msg
    assert err.value.errors()[0]["loc"] == ("layer_base_configs", 1, "attention_mechanism")
    with pytest.raises(ValidationError, match="'scaled_dot_prodcut' \\(did you mean 'scaled_dot_product'\\?\\)"):
        get_hierarchical_configuration(two_stages(attention_mechanism="scaled_dot_prodcut"))


def test_unsupported_feedforward_and_normalization_names_raise():
    with pytest.raises(ValidationError, match=r"layer_base_configs\.1\.feedforward\n.*Conv2DFeedforward.*MLP"):
        get_hierarchical_configuration(two_stages(feedforward="Conv2DFeedforward"))
    with pytest.raises(ValidationError, match=r"layer_base_configs\.1\.normalization\n.*batchnorm.*layernorm, skip"):
        get_hierarchical_configuration(two_stages(normalization="batchnorm"))


def test_bad_basic_layer_fields_and_arguments_are_located():
    with pytest.raises(ValidationError) as err:
        get_hierarchical_configuration(two_stages(padding=-1, repeat_layer=0))
    assert {e["loc"] for e in err.value.errors()} == {("layer_base_configs", 1, "padding"),
                                                     ("layer_base_configs", 1, "repeat_layer")}
    with pytest.raises(ValidationError, match=r"layer_base_configs\.1\.embedding\n  expected a number, got the "
                                              r"boolean"):
        get_hierarchical_configuration(two_stages(embedding=True))
    with pytest.raises(ValidationError, match="use_rotary_embeddings"):
        get_hierarchical_configuration(two_stages(), use_rotary_embeddings="yes")
    with pytest.raises(ValidationError, match="mlp_multiplier"):
        get_hierarchical_configuration(two_stages(), mlp_multiplier=0)
    with pytest.raises(ValidationError, match=r"layer_base_configs\n  Input should be a valid list"):
        get_hierarchical_configuration(two_stages()[0])
    with pytest.raises(ValidationError, match=r"layer_base_configs\n  List should have at least 1 item"):
        get_hierarchical_configuration([])
    # A dict of BasicLayerConfig fields works; an unknown key in one is located and suggested.
    fields = dict(embedding=32, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                  seq_len=64, feedforward="MLP")
    assert len(get_hierarchical_configuration([fields])) == 1
    with pytest.raises(ValidationError, match=r"layer_base_configs\.0\.repeat_layers\n  unknown key "
                                              r"'repeat_layers' \(did you mean 'repeat_layer'\?\)"):
        get_hierarchical_configuration([{**fields, "repeat_layers": 2}])


def test_dim_head_not_dividing_embedding_raises():
    # xformers asserted without a message.
    with pytest.raises(ValidationError, match=r"layer_base_configs\.0\.embedding\n  dim_head 24 does not divide "
                                              r"embedding 32.*\(for 32: 1, 2, 4, 8, 16, 32\)"):
        get_hierarchical_configuration(two_stages(), dim_head=24)


def test_unknown_keyword_to_basic_layer_config_raises():
    with pytest.raises(TypeError, match="window_size"):
        BasicLayerConfig(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                         seq_len=64, feedforward="MLP", window_size=7)


# ------------------------------------------------------------------------------ the stack dicts


def test_unknown_keys_in_stack_configs_are_located_with_valid_keys():
    # xformers silently dropped unknown keys inside attention / feedforward dicts.
    stack = get_hierarchical_configuration(two_stages())
    stack[1]["multi_head_config"]["attention"]["window_size"] = 7
    with pytest.raises(ValidationError) as err:
        xFormerConfig(stack)
    assert err.value.errors()[0]["loc"] == ("stack_configs", 1, "multi_head_config", "attention", "window_size")
    assert "stack_configs.1.multi_head_config.attention.window_size\n  unknown key 'window_size'; valid keys of " \
           "ScaledDotProductConfig: causal, dropout, name" in str(err.value)

    stack = get_hierarchical_configuration(two_stages())
    stack[1]["multi_head_config"]["attention"]["casual"] = True
    with pytest.raises(ValidationError, match=r"unknown key 'casual' \(did you mean 'causal'\?\)"):
        xFormerConfig(stack)
    stack = get_hierarchical_configuration(two_stages())
    stack[0]["layer_norm_style"] = "pre"
    with pytest.raises(ValidationError, match=r"stack_configs\.0\.layer_norm_style\n.*unknown key "
                                              r"'layer_norm_style'.*residual_norm_style"):
        xFormerConfig(stack)
    stack = get_hierarchical_configuration(two_stages())
    del stack[0]["block_type"]
    with pytest.raises(ValidationError, match=r"stack_configs\.0\.block_type\n  missing key 'block_type' "
                                              r"\(use 'encoder'\)"):
        xFormerConfig(stack)


def test_bad_values_in_stack_configs_are_located():
    cases = [
        (("feedforward_config", "name"), "Conv2DFeedforward", r"feedforward_config\.name\n.*supported xformers names: "
                                                              r"MLP"),
        (("feedforward_config", "activation"), "smelu", r"feedforward_config\.activation\n.*'smelu' activation is "
                                                        r"not supported.*gelu, relu, squared_relu, star_relu"),
        (("position_encoding_config", "name"), "sine", r"position_encoding_config\.name\n.*'sine' position encoding "
                                                       r"has no hfactory equivalent; supported: 'learnable'"),
        (("patch_embedding_config", "pool_type"), "MAX", r"patch_embedding_config\.pool_type\n.*'CONV_2D'"),
        (("patch_embedding_config", "in_channels"), 16, r"patch_embedding_config\.in_channels\n  16 does not match "
                                                        r"the previous stage's dim_model 32; use 32"),
        (("multi_head_config", "attention", "causal"), True, r"attention\.causal\n.*causal attention is not "
                                                             r"supported.*use False"),
        (("multi_head_config", "bias"), (True, False, True, True), r"multi_head_config\.bias\n.*q, k and v biases "
                                                                    r"must be equal"),
        (("dim_model",), 48, r"stack_configs\.1\.multi_head_config\.dim_model\n  64 differs from the block's "
                             r"dim_model 48"),
        (("reversible",), True, r"stack_configs\.1\.reversible\n.*reversible layers are not supported"),
        (("residual_norm_style",), "deepnorm", r"residual_norm_style\n.*'deepnorm' is not supported"),
    ]
    for path, value, pattern in cases:
        stack = get_hierarchical_configuration(two_stages())
        for block in stack:
            block["multi_head_config"]["dim_model"] = block["dim_model"]  # xformers fills it in; allowed
        target = stack[1]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValidationError, match=pattern):
            xFormerConfig(stack)


def test_unsupported_model_options_raise():
    stack = get_hierarchical_configuration(two_stages())
    with pytest.raises(ValidationError, match=r"tie_embedding_weights\n.*encoders only; use False"):
        xFormerConfig(stack, tie_embedding_weights=True)
    with pytest.raises(ValidationError, match=r"weight_init\n  unknown weight_init 'xavier'; valid: timm, vit, moco, "
                                              r"small"):
        xFormerConfig(stack, weight_init="xavier")
    with pytest.raises(ValueError, match="unknown weight_init 'xavier'"):
        compat.init_weights(xFormer.from_config(xFormerConfig(stack)).encoder, "xavier")
    decoder = get_hierarchical_configuration(two_stages())
    decoder[1]["block_type"] = "decoder"
    with pytest.raises(ValidationError, match=r"stack_configs\.1\.block_type\n.*encoders only; use 'encoder'"):
        xFormerConfig(decoder)
    with pytest.raises(ValueError, match="tgt"):
        xFormer.from_config(xFormerConfig(stack))(torch.randn(1, 3, 32, 32), tgt=torch.randn(1, 16, 64))
    with pytest.raises(ValidationError, match="expected a list \\(or dict\\) of block config dicts"):
        xFormerConfig("encoder")


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
    stack[3]["multi_head_config"]["num_heads"] = 1
    with pytest.raises(ValidationError, match=r"stack_configs\.3\n  has no patch_embedding_config, so it adds blocks "
                                              r"to the stage of stack_configs\.1, but differs from it in: embedding"):
        xFormerConfig(stack)
    stack = get_hierarchical_configuration(two_stages())
    stack[1]["num_layers"] = 2
    with pytest.raises(ValidationError, match=r"stack_configs\.1\.num_layers\n  2 with a patch_embedding_config"):
        xFormerConfig(stack)


def test_rotary_embeddings_are_applied():
    x = torch.randn(2, 3, 32, 32)
    plain = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        two_stages(), use_rotary_embeddings=False, dim_head=16))).eval()
    rotary = xFormer.from_config(xFormerConfig(get_hierarchical_configuration(
        two_stages(), use_rotary_embeddings=True, dim_head=16))).eval()
    assert all(s.token_mixer["rotary"] for s in rotary.plan.stages)
    assert not any(s.token_mixer["rotary"] for s in plain.plan.stages)
    assert n_params(rotary) == n_params(plain)  # rotary adds no parameters (only xformers' inv_freq buffers)
    rotary.load_state_dict(plain.state_dict(), strict=True)  # xformers' inv_freq buffers are derived
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


def test_hfactory_token_mixer_kinds_are_validated_in_place():
    stack = get_hierarchical_configuration(two_stages())
    stack[1]["multi_head_config"]["attention"] = {"name": "sepconv", "kernel_size": 3}
    model = xFormer.from_config(xFormerConfig(stack))
    assert model.plan.stages[1].token_mixer["kind"] == "sepconv"
    stack[1]["multi_head_config"]["attention"] = {"name": "sepconv", "kernel": 3}
    with pytest.raises(ValidationError, match=r"stack_configs\.1\.multi_head_config\.attention\.kernel\n  unknown key "
                                              r"'kernel'"):
        xFormerConfig(stack)


def test_dict_of_stacks_and_copies_are_independent():
    stack = get_hierarchical_configuration(two_stages())
    config = xFormerConfig({"stem": stack[0], "stage2": stack[1]})
    stack[1]["dim_model"] = 7  # the config was deep-copied: no effect
    model = xFormer.from_config(config)
    assert model.plan.num_features == 64
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)
    bad = get_hierarchical_configuration(two_stages())
    bad[1]["feedforward_config"]["hidden_layer_multiplier"] = -1
    with pytest.raises(ValidationError, match=r"stack_configs\.stage2\.feedforward_config\.hidden_layer_multiplier"):
        xFormerConfig({"stem": bad[0], "stage2": bad[1]})


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
