"""Swin Transformer V2 weights from timm (``timm.models.swin_transformer_v2.SwinTransformerV2``)
and from the official checkpoints (microsoft/Swin-Transformer) into hfactory's Swin V2 specs
(preset ``swinv2_tiny_window8_256``; arXiv 2111.09883).

The key layout is Swin V1's, so the mapping is :func:`hfactory.convert.swin.map_swin`
(``patch_embed.*`` -> ``stages.0.downsample.*``, ``layers.i.downsample.*`` ->
``stages.i.downsample.*``, ``layers.i.blocks.j.attn.*`` -> ``stages.i.blocks.j.token_mixer.*``,
official checkpoints' downsamplers moved one stage on and ``head.*`` -> ``head.fc.*``), and the
non-persistent buffers (``relative_position_index``, ``relative_coords_table``, ``attn_mask``,
``k_bias``) are dropped, as timm's ``checkpoint_filter_fn`` does. The attention keys
(``qkv.weight``, ``q_bias``, ``v_bias``, ``logit_scale``, ``cpb_mlp.{0,2}.*``, ``proj.*``) keep
their names; the bias MLP works for any window, so no table is resized.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, register_family
from .swin import _layernorm, _pair, map_swin, square_patch, timm_stages

__all__ = ["map_swinv2", "spec_from_timm_swinv2", "PRESET"]

PRESET = "swinv2_tiny_window8_256"
_DROPPED = ("relative_coords_table", "k_bias")


def map_swinv2(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """timm- (or official-) Swin V2 keys -> hfactory keys (see module docstring). Keys that match
    no pattern are passed through for the mismatch report to name."""
    return {k: v for k, v in map_swin(state_dict, model).items() if k.rsplit(".", 1)[-1] not in _DROPPED}


def spec_from_timm_swinv2(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``SwinTransformerV2``: the ``swinv2_tiny_window8_256``
    preset with the model's widths, depths, heads, windows (timm's per-stage reference windows,
    clipped by the plan as timm clips them), pretrained windows, MLP ratios, norms, patch size,
    image size, classes, pooling and drop rates.

    Raises:
        UsageError (a ValueError): a timm option hfactory's Swin V2 does not express
            (``always_partition``, non-square patches, a norm other than LayerNorm, an activation
            other than GELU, pooling other than avg/max).
    """
    from ..presets import load_preset

    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    pe = timm_model.patch_embed
    patch = square_patch(pe)
    stages, last = [], None
    for i, (layer, blocks, window) in enumerate(timm_stages(timm_model, "Swin V2")):
        blk, attn = blocks[0], blocks[0].attn
        pretrained = _pair(attn.pretrained_window_size)
        stage = {
            "embedding": blk.dim, "depth": len(blocks), "num_heads": attn.num_heads,
            "norm": _layernorm(blk.norm1, f"layers.{i}.blocks.0.norm1"),
            "token_mixer": {"kind": "window_attention_v2",
                            "window_size": window[0] if window[0] == window[1] else list(window),
                            "pretrained_window_size": pretrained[0] if pretrained[0] == pretrained[1]
                            else list(pretrained),
                            "cpb_hidden": attn.cpb_mlp[0].out_features, "shift": True,
                            "qkv_bias": attn.q_bias is not None, "attn_drop": attn.attn_drop.p,
                            "proj_drop": attn.proj_drop.p},
            "feedforward": {"kind": "mlp", "hidden_layer_multiplier": blk.mlp.fc1.out_features / blk.dim,
                            "activation": "gelu" if getattr(blk.mlp.act, "approximate", "none") == "none" else "gelu_tanh",
                            "bias": blk.mlp.fc1.bias is not None, "drop": blk.mlp.drop1.p},
        }
        if i == 0:
            stage["downsample"] = {"kind": "conv", "patch_size": patch[0], "bias": pe.proj.bias is not None,
                                   "norm": _layernorm(pe.norm, "patch_embed.norm") if not isinstance(
                                       pe.norm, nn.Identity) else {"kind": "identity"}}
        elif isinstance(layer.downsample, nn.Identity):
            stage["downsample"] = "none"
        else:
            stage["downsample"] = {"kind": "patch_merging_v2",
                                   "norm": _layernorm(layer.downsample.norm, f"layers.{i}.downsample.norm")}
        stages.append(stage)
        last = blocks[-1]
    spec["stages"] = stages
    spec["defaults"] = {"residual_norm_style": "res_post"}
    pool = timm_model.global_pool
    if pool not in ("avg", "max"):
        raise UsageError(f"timm global_pool {pool!r} is not supported; hfactory pools 'avg' or 'max'")
    dp = getattr(last.drop_path1, "drop_prob", 0.0) if last is not None else 0.0
    spec.update(
        img_size=list(_pair(pe.img_size)), in_chans=pe.proj.in_channels, num_classes=timm_model.num_classes,
        global_pool=pool, drop_rate=timm_model.head.drop.p, drop_path_rate=float(f"{dp:.6g}"),
        head_norm=_layernorm(timm_model.norm, "norm"), head_norm_first=True,
        name=getattr(timm_model, "pretrained_cfg", {}).get("architecture", "swinv2") or "swinv2",
    )
    return spec


def _detect(state_dict: Mapping[str, torch.Tensor]) -> bool:
    pat = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.(logit_scale|cpb_mlp\.0\.weight)$")
    return "patch_embed.proj.weight" in state_dict and any(pat.match(k) for k in state_dict)


register_family(Family(
    name="swinv2",
    detect=_detect,
    map=map_swinv2,
    spec_from_timm=spec_from_timm_swinv2,
    timm_class="SwinTransformerV2",
))
