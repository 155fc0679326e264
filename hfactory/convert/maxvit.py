"""MaxViT weights from timm (``timm.models.maxxvit.MaxxVit`` built of MaxViT blocks, the ``_tf``
configurations; arXiv 2204.01697) into hfactory's MaxViT specs (preset ``maxvit_tiny_tf_224``;
components in :mod:`hfactory.spec.maxvit`).

timm's MaxViT block ``j`` of a stage is hfactory's blocks ``3j - 1`` (MBConv), ``3j`` (block
attention) and ``3j + 1`` (grid attention), except that block 0's MBConv is the stage's
``downsample`` (and timm's ``stem`` is stage 0's ``downsample.stem``). Renames: ``conv.`` ->
``token_mixer.`` (or ``downsample.``), ``attn_block`` / ``attn_grid``: ``attn.`` -> ``token_mixer.``
with ``attn.rel_pos.relative_position_bias_table`` reshaped from timm's ``(heads, 2h-1, 2w-1)``,
indexed by key minus query, to Swin's ``((2h-1)(2w-1), heads)`` indexed by query minus key
(both offset axes flipped); head ``head.norm`` -> ``norm``, ``head.pre_logits.fc`` ->
``head.fc.fc1``, ``head.fc`` -> ``head.fc.fc2`` (or ``head.fc`` for a linear head).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, register_family

__all__ = ["map_maxvit", "spec_from_timm_maxvit", "table_from_timm"]

_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(conv|attn_block|attn_grid)\.(.*)$")
_ATTN = [
    (re.compile(r"^attn\.rel_pos\.relative_position_bias_table$"), "token_mixer.relative_position_bias_table"),
    (re.compile(r"^attn\."), "token_mixer."),
]


def table_from_timm(table: torch.Tensor) -> torch.Tensor:
    """timm ``RelPosBiasTf`` table ``(heads, 2h-1, 2w-1)`` -> hfactory's ``((2h-1)(2w-1), heads)``
    (:class:`hfactory.layers.maxvit.PartitionAttention`): both offset axes flipped, heads last.
    A table already in hfactory's layout (2-D) is returned as it is."""
    if table.ndim != 3:
        return table
    return table.flip(1, 2).permute(1, 2, 0).reshape(-1, table.shape[0])


def map_maxvit(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-MaxViT keys -> hfactory keys (see the module docstring); only bias tables reshape.
    A linear head (timm ``ClassifierHead`` with the model's ``norm``) keeps ``head.fc``."""
    mlp_head = "head.pre_logits.fc.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        m = _BLOCK.match(k)
        if m:
            stage, j, part, rest = int(m[1]), int(m[2]), m[3], m[4]
            if part == "conv":
                k = f"stages.{stage}.downsample.{rest}" if j == 0 else f"stages.{stage}.blocks.{3 * j - 1}.token_mixer.{rest}"
            else:
                for pattern, repl in _ATTN:
                    rest = pattern.sub(repl, rest)
                k = f"stages.{stage}.blocks.{3 * j + (0 if part == 'attn_block' else 1)}.{rest}"
                if rest.endswith("relative_position_bias_table"):
                    v = table_from_timm(v)
        elif k.startswith("stem."):
            k = "stages.0.downsample." + k
        elif k.startswith("head.norm."):
            k = k[len("head."):]
        elif k.startswith("head.pre_logits.fc."):
            k = "head.fc.fc1." + k[len("head.pre_logits.fc."):]
        elif k.startswith("head.fc.") and mlp_head:
            k = "head.fc.fc2." + k[len("head.fc."):]
        out[k] = v
    return out


def _act(module: nn.Module, where: str) -> str:
    """hfactory's activation name of a timm activation module."""
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    known = {"GELUTanh": "gelu_tanh", "SiLU": "silu", "Swish": "silu", "ReLU": "relu", "Tanh": "tanh"}
    if name not in known:
        raise UsageError(f"{where}: activation {name} has no hfactory counterpart; supported: GELU, GELUTanh, "
                         "SiLU, ReLU, Tanh")
    return known[name]


def _padding(conv: nn.Module) -> str:
    return "same" if type(conv).__name__ == "Conv2dSame" else "symmetric"


def _mbconv(conv: nn.Module, where: str) -> dict:
    """The mbconv options of a timm ``MbConvBlock`` (refusing the variants hfactory lacks)."""
    if type(conv).__name__ != "MbConvBlock":
        raise UsageError(f"{where}: {type(conv).__name__} is not an MBConv; hfactory's MaxViT has MbConvBlock only")
    if not isinstance(conv.down, nn.Identity) or conv.conv1_1x1.stride != (1, 1):
        raise UsageError(f"{where}: stride_mode 'pool' / '1x1' is not supported; hfactory strides the depthwise "
                         "conv (stride_mode 'dw')")
    if conv.se_early is not None or not isinstance(conv.pre_norm.act, nn.Identity):
        raise UsageError(f"{where}: attn_early / pre_norm_act are not supported")
    if conv.se is not None and type(conv.se).__name__ not in ("SEModule", "Identity"):
        raise UsageError(f"{where}: attention layer {type(conv.se).__name__} is not supported (SE only)")
    out = conv.conv3_1x1.out_channels
    mid = conv.conv1_1x1.out_channels
    se = conv.se.fc1.out_channels if type(conv.se).__name__ == "SEModule" else 0
    se_ratio = se / out
    if int(out * se_ratio) != se:  # float rounding: int() floors, so aim inside [se, se + 1)
        se_ratio = (se + 0.5) / out
    entry = {"kernel_size": conv.conv2_kxk.kernel_size[0], "expand_ratio": mid / out, "se_ratio": se_ratio,
             "activation": _act(conv.norm1.act, f"{where}.norm1"), "norm_eps": conv.pre_norm.eps,
             "padding": _padding(conv.conv2_kxk), "bias": conv.conv3_1x1.bias is not None}
    if se:
        entry["se_activation"] = _act(conv.se.act, f"{where}.se")
    return entry


def _attention(part: nn.Module, where: str) -> tuple[dict, dict, dict]:
    """(token mixer, norm, feedforward) of a timm ``PartitionAttentionCl``."""
    if type(part).__name__ != "PartitionAttentionCl":
        raise UsageError(f"{where}: {type(part).__name__} is not supported; hfactory's MaxViT has the channels-last "
                         "PartitionAttentionCl (use_nchw_attn=False)")
    attn = part.attn
    if type(attn.rel_pos).__name__ != "RelPosBiasTf":
        raise UsageError(f"{where}: relative position {type(attn.rel_pos).__name__} is not supported; hfactory has "
                         "the TF MaxViT bias (rel_pos_type='bias_tf')")
    if attn.head_first:
        raise UsageError(f"{where}: head_first=True qkv layout is not supported (the _tf MaxViTs use False)")
    if not isinstance(part.ls1, nn.Identity):
        raise UsageError(f"{where}: layer scale (init_values) is not supported in MaxViT conversion")
    size = [int(s) for s in part.partition_size]
    kind, field = ("block_attention", "window_size") if part.partition_block else ("grid_attention", "grid_size")
    bias = attn.qkv.bias is not None
    mixer = {"kind": kind, field: size, "qkv_bias": bias, "proj_bias": attn.proj.bias is not None}
    dim = attn.qkv.in_features
    ffn = {"kind": "mlp", "hidden_layer_multiplier": part.mlp.fc1.out_features / dim,
           "activation": _act(part.mlp.act, f"{where}.mlp.act")}
    return mixer, {"kind": "layernorm", "eps": part.norm1.eps}, ffn


def spec_from_timm_maxvit(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``MaxxVit`` made of MaxViT blocks (``block_type`` 'M' in
    every stage; MBConv + block attention + grid attention, TF relative position bias), read from
    its modules: stem, widths, depths, MBConv and attention options, partition sizes, the head,
    classes and image size.

    Raises:
        ValueError (``UsageError``): a timm MaxxVit variant hfactory does not express (CoAtNet's
            'C'/'T' stages, ConvNeXt blocks, parallel blocks, the MLP relative position, NCHW
            attention, head_first qkv ...), naming the module.
    """
    stem = timm_model.stem
    stem_entry = {"kind": "conv_stem", "width": [stem.conv1.out_channels, stem.conv2.out_channels],
                  "kernel_size": stem.conv1.kernel_size[0], "bias": stem.conv1.bias is not None,
                  "norm_eps": stem.norm1.eps, "activation": _act(stem.norm1.act, "stem.norm1"),
                  "padding": _padding(stem.conv1)}
    stages = []
    for i, stage in enumerate(timm_model.stages):
        for j, blk in enumerate(stage.blocks):
            if type(blk).__name__ != "MaxxVitBlock" or blk.attn_block is None:
                raise UsageError(f"stages.{i}.blocks.{j}: {type(blk).__name__} is not a MaxViT block (conv + block + "
                                 "grid attention); hfactory converts MaxViT stages ('M') only")
        first = stage.blocks[0]
        mixer, norm, ffn = _attention(first.attn_block, f"stages.{i}.blocks.0.attn_block")
        grid, _, _ = _attention(first.attn_grid, f"stages.{i}.blocks.0.attn_grid")
        mb = _mbconv(first.conv, f"stages.{i}.blocks.0.conv")
        depth = len(stage.blocks)
        blocks = [{"every": 3, "offset": 1, "token_mixer": grid}]
        if depth > 1:
            mb_mixer = _mbconv(stage.blocks[1].conv, f"stages.{i}.blocks.1.conv")
            blocks.append({"every": 3, "offset": 2, "token_mixer": {"kind": "mbconv", **mb_mixer},
                           "norm": "identity", "feedforward": "none"})
        downsample = {"kind": "mbconv", **mb}
        if i == 0:
            downsample["stem"] = stem_entry
        attn = first.attn_block.attn
        stages.append({"embedding": first.conv.conv3_1x1.out_channels, "depth": 3 * depth - 1,
                       "dim_head": attn.dim_head, "num_heads": attn.num_heads, "downsample": downsample,
                       "token_mixer": mixer, "norm": norm, "feedforward": ffn, "blocks": blocks})
    head = timm_model.head
    spec = {"name": (getattr(timm_model, "pretrained_cfg", None) or {}).get("architecture", "maxvit"),
            "img_size": list(timm_model.img_size), "in_chans": stem.conv1.in_channels,
            "num_classes": timm_model.num_classes, "global_pool": timm_model.global_pool or "", "stages": stages}
    if type(head).__name__ == "NormMlpClassifierHead":
        spec["head_norm"] = {"kind": "layernorm", "eps": head.norm.eps}
        if not isinstance(head.pre_logits, nn.Identity):
            spec["head"] = {"kind": "mlp", "hidden_layer_multiplier": head.hidden_size / timm_model.embed_dim,
                            "activation": _act(head.pre_logits.act, "head.pre_logits.act"), "norm": "identity"}
    else:
        spec["head_norm"] = {"kind": "layernorm", "eps": timm_model.norm.eps}
        spec["head_norm_first"] = True  # timm's norm acts on the final map, before pooling
    return spec


register_family(Family(
    name="maxvit",
    detect=lambda sd: "stem.conv1.weight" in sd and any(".attn_grid." in k for k in sd),
    map=map_maxvit,
    spec_from_timm=spec_from_timm_maxvit,
    timm_class="MaxxVit",
))
