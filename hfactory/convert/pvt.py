"""PVTv2 weights from timm (``timm.models.pvt_v2.PyramidVisionTransformerV2``, arXiv 2106.13797)
into hfactory's PVTv2 specs (preset ``pvt_v2_b0``; components in :mod:`hfactory.spec.pvt`).

Renames only, no reshapes: timm's stem ``patch_embed.{proj,norm}`` is stage 0's conv downsampler
(``stages.0.downsample.{conv,norm}``), the later ``downsample.proj`` is ``downsample.conv``, each
stage's final ``norm`` is its ``out_norm``, a block's ``attn`` is its ``token_mixer`` and the
classifier ``head`` is ``head.fc``.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from .core import Family, register_family

__all__ = ["map_pvt_v2", "spec_from_timm_pvt_v2"]

_RULES = [
    (re.compile(r"^patch_embed\.proj\."), "stages.0.downsample.conv."),
    (re.compile(r"^patch_embed\.norm\."), "stages.0.downsample.norm."),
    (re.compile(r"^(stages\.\d+\.downsample\.)proj\."), r"\1conv."),
    (re.compile(r"^(stages\.\d+\.)norm\."), r"\1out_norm."),
    (re.compile(r"^(stages\.\d+\.blocks\.\d+\.)attn\."), r"\1token_mixer."),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
]


def map_pvt_v2(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-PVTv2 keys -> hfactory keys (see module docstring); tensors unchanged."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _RULES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def spec_from_timm_pvt_v2(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``PyramidVisionTransformerV2``, read from its modules:
    widths, depths, heads, sr ratios, the linear variant, MLP ratios, qkv bias, classes and the
    image size of its pretrained config (224 when it has none)."""
    stages = []
    for i, stage in enumerate(timm_model.stages):
        block = stage.blocks[0]
        attn, mlp = block.attn, block.mlp
        linear = attn.pool is not None
        mixer = {"kind": "sr_attention", "qkv_bias": attn.q.bias is not None, "norm_eps": 1e-5}
        if linear:
            mixer.update(linear=True, pool_size=attn.pool.output_size if isinstance(attn.pool.output_size, int)
                         else attn.pool.output_size[0], norm_eps=attn.norm.eps)
        else:
            mixer["sr_ratio"] = attn.sr.kernel_size[0] if attn.sr is not None else 1
            if attn.norm is not None:
                mixer["norm_eps"] = attn.norm.eps
        dim = attn.dim
        norm = {"kind": "layernorm", "eps": block.norm1.eps}
        entry = {"embedding": dim, "depth": len(stage.blocks), "num_heads": attn.num_heads,
                 "dim_head": attn.head_dim, "token_mixer": mixer, "norm": norm,
                 "out_norm": {"kind": "layernorm", "eps": stage.norm.eps},
                 "feedforward": {"kind": "dwconv_mlp", "hidden_layer_multiplier": mlp.fc1.out_features / dim,
                                 "kernel_size": mlp.dwconv.kernel_size[0],
                                 "extra_relu": not isinstance(mlp.relu, nn.Identity)}}
        emb = timm_model.patch_embed if i == 0 else stage.downsample
        conv = emb.proj
        entry["downsample"] = {"kind": "conv", "patch_size": conv.kernel_size[0], "stride": conv.stride[0],
                               "padding": conv.padding[0], "norm": {"kind": "layernorm", "eps": emb.norm.eps}}
        stages.append(entry)
    cfg = getattr(timm_model, "pretrained_cfg", {}) or {}
    img = cfg.get("input_size", (3, 224, 224))[1:]
    return {"name": cfg.get("architecture", "pvt_v2"), "img_size": list(img), "in_chans": timm_model.in_chans,
            "num_classes": timm_model.num_classes, "head_norm": {"kind": "identity"}, "stages": stages}


register_family(Family(
    name="pvt_v2",
    detect=lambda sd: "patch_embed.proj.weight" in sd and "stages.0.blocks.0.attn.kv.weight" in sd,
    map=map_pvt_v2,
    spec_from_timm=spec_from_timm_pvt_v2,
    timm_class="PyramidVisionTransformerV2",
))
