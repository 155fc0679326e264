"""MetaFormer weights from timm (``timm.models.metaformer``: PoolFormer v1/v2, ConvFormer,
CAFormer, IdentityFormer) into hfactory's MetaFormer specs.

hfactory's stage and block names follow timm's MetaFormer, so only the stem (timm ``stem.*`` is
hfactory's stage-0 downsampler), the head norm (``head.norm`` -> ``norm``) and the 1x1-conv MLP
weights of timm's NCHW blocks (``(out, in, 1, 1)`` -> Linear ``(out, in)``) change.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, register_family

__all__ = ["map_metaformer", "spec_from_timm_metaformer"]


def map_metaformer(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-MetaFormer keys -> hfactory keys (see module docstring)."""
    expected = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith("stem."):
            k = "stages.0.downsample." + k[len("stem."):]
        elif k.startswith("head.norm."):
            k = "norm." + k[len("head.norm."):]
        ref = expected.get(k)
        if ref is not None and v.ndim == 4 and ref.ndim == 2 and v.shape[2:] == (1, 1):
            v = v.flatten(1)  # 1x1 conv of an NCHW block -> Linear
        out[k] = v
    return out


def _norm(module: nn.Module) -> dict:
    """The spec of a timm norm module (GroupNorm1[NoBias], LayerNorm[2d][NoBias])."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.GroupNorm):
        return {"kind": "groupnorm", "num_groups": module.num_groups, "eps": module.eps, "bias": bias}
    if isinstance(module, nn.LayerNorm):
        return {"kind": "layernorm", "eps": module.eps, "bias": bias}
    if isinstance(module, nn.Identity):
        return {"kind": "identity"}
    raise UsageError(f"no hfactory norm for timm {type(module).__name__}")


def _io(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a 1x1 Conv2d (timm's NCHW blocks)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


_ACTS = {"GELU": "gelu", "StarReLU": "star_relu", "SquaredReLU": "squared_relu", "ReLU": "relu", "SiLU": "silu"}


def _act(module: nn.Module) -> str:
    name = type(module).__name__
    if name not in _ACTS:
        raise UsageError(f"no hfactory activation for timm {name}; supported: {', '.join(_ACTS)}")
    return _ACTS[name]


def _mixer(module: nn.Module) -> dict:
    name = type(module).__name__
    if name == "Pooling":
        return {"kind": "pooling", "pool_size": module.pool.kernel_size}
    if name == "SepConv":
        return {"kind": "sepconv", "kernel_size": module.dwconv.kernel_size[0],
                "expansion_ratio": _io(module.pwconv1)[1] / _io(module.pwconv1)[0],
                "activation": _act(module.act1), "bias": module.pwconv1.bias is not None}
    if name == "Attention":
        return {"kind": "attention", "qkv_bias": module.qkv.bias is not None,
                "proj_bias": module.proj.bias is not None}
    if name == "Identity":
        return {"kind": "identity"}
    raise UsageError(f"no hfactory token mixer for timm MetaFormer's {name}")


def _conv(conv: nn.Conv2d, norm: nn.Module | None, pre_norm: bool) -> dict:
    spec = {"kind": "conv", "patch_size": conv.kernel_size[0], "stride": conv.stride[0], "padding": conv.padding[0],
            "bias": conv.bias is not None, "pre_norm": pre_norm}
    if norm is not None and not isinstance(norm, nn.Identity):
        spec["norm"] = _norm(norm)
    return spec


def spec_from_timm_metaformer(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``MetaFormer``, read from its modules: widths, depths,
    token mixers, norms, MLP activation and biases, LayerScale / ResScale, stem and downsampling
    norms and the head. LayerScale's init value is taken as 1e-5 (PoolFormer's)."""
    stages = []
    for i, stage in enumerate(timm_model.stages):
        block = stage.blocks[0]
        fc1 = block.mlp.fc1
        in_f, out_f = _io(fc1)
        mixer = _mixer(block.token_mixer)
        entry = {"embedding": in_f, "depth": len(stage.blocks), "token_mixer": mixer, "norm": _norm(block.norm1),
                 "feedforward": {"kind": "mlp", "hidden_layer_multiplier": out_f / in_f,
                                 "activation": _act(block.mlp.act), "bias": fc1.bias is not None},
                 "layer_scale": 1e-5 if not isinstance(block.layer_scale1, nn.Identity) else False,
                 "res_scale": not isinstance(block.res_scale1, nn.Identity)}
        if mixer["kind"] == "attention":
            entry["dim_head"] = block.token_mixer.head_dim
        if i == 0:
            entry["downsample"] = _conv(timm_model.stem.conv, getattr(timm_model.stem, "norm", None), False)
        else:
            ds = stage.downsample
            entry["downsample"] = _conv(ds.conv, getattr(ds, "norm", None), True)
        stages.append(entry)
    fc = timm_model.head.fc
    head = {"kind": "linear"}
    if type(fc).__name__ == "MlpHead":
        head = {"kind": "mlp", "hidden_layer_multiplier": fc.fc1.out_features / fc.fc1.in_features,
                "activation": _act(fc.act), "norm": _norm(fc.norm), "bias": fc.fc1.bias is not None}
    cfg = getattr(timm_model, "pretrained_cfg", {}) or {}
    img = cfg.get("input_size", (3, 224, 224))[1:]
    return {"name": cfg.get("architecture", "metaformer"), "img_size": list(img), "in_chans": timm_model.in_chans,
            "num_classes": timm_model.num_classes, "head_norm": _norm(timm_model.head.norm), "head": head,
            "stages": stages}


register_family(Family(
    name="metaformer",
    detect=lambda sd: "stem.conv.weight" in sd,
    map=map_metaformer,
    spec_from_timm=spec_from_timm_metaformer,
    timm_class="MetaFormer",
))
