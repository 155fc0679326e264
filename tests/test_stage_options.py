"""Stage options the newer families need: a stage output norm (PVTv2) and res-post-norm residuals
(Swin V2), checked against hand-written computations on the built modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hfactory
from hfactory import PlanError, load_spec, resolve


def _spec(**stage1):
    return load_spec({
        "img_size": 32, "num_classes": 3, "defaults": {"dim_head": 8},
        "stages": [{"embedding": 16, "depth": 1, "downsample": {"kind": "conv", "patch_size": 4}},
                   {"embedding": 32, "depth": 2, **stage1}]})


def test_out_norm_is_applied_after_the_blocks_and_seen_by_intermediates():
    torch.manual_seed(0)
    model = hfactory.build(_spec(out_norm={"kind": "layernorm", "eps": 1e-6})).eval()
    assert resolve(model.spec).stages[1].out_norm["eps"] == 1e-6 and resolve(model.spec).stages[0].out_norm is None
    with torch.no_grad():
        model.stages[1].out_norm.weight.uniform_(0.5, 1.5)
        model.stages[1].out_norm.bias.uniform_(-1, 1)
        x = torch.randn(2, 3, 32, 32)
        maps = model.forward_intermediates(x, intermediates_only=True)
        s0, _ = model.stages[0](x.permute(0, 2, 3, 1))  # stages take channels-last images; (B, 8, 8, 16)
        s1 = model.stages[1].blocks(model.stages[1].pos_embed(model.stages[1].downsample(s0)))
        want = F.layer_norm(s1, (32,), model.stages[1].out_norm.weight, model.stages[1].out_norm.bias, 1e-6)
    torch.testing.assert_close(maps[1], want.permute(0, 3, 1, 2))


def test_res_post_norm_block():
    torch.manual_seed(0)
    model = hfactory.build(_spec(residual_norm_style="res_post")).eval()
    block = model.stages[1].blocks[0]
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 4, 4, 32)
        y = x + block.norm1(block.token_mixer(x))  # Swin V2: x + norm(attn(x)), then x + norm(mlp(x))
        y = y + block.norm2(block.mlp(y))
        torch.testing.assert_close(block(x), y)
        # and it differs from pre-norm on the same weights (the style is really used)
        pre = x + block.token_mixer(block.norm1(x))
        assert not torch.allclose(pre + block.mlp(block.norm2(pre)), y)


def test_fused_transition_refuses_res_post():
    data = load_spec("examples/mae_digits.yaml").model_dump(mode="json", exclude_none=True)
    data["stages"][1]["residual_norm_style"] = "res_post"
    with pytest.raises(PlanError, match="pre-norm only") as err:
        resolve(load_spec(data))
    assert err.value.loc == "stages.1.residual_norm_style"
