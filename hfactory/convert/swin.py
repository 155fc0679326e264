"""Swin Transformer weights from timm (``timm.models.swin_transformer.SwinTransformer``) and from
the official checkpoints (microsoft/Swin-Transformer) into hfactory's Swin specs
(preset ``swin_tiny_patch4_window7_224``; arXiv 2103.14030).

Key mapping (by pattern, so every depth / width variant converts):

- ``patch_embed.proj.*`` / ``patch_embed.norm.*`` -> ``stages.0.downsample.conv.*`` / ``.norm.*``
- ``layers.i.downsample.{norm,reduction}.*`` -> ``stages.i.downsample.{norm,reduction}.*``
- ``layers.i.blocks.j.attn.*`` -> ``stages.i.blocks.j.token_mixer.*`` (other block keys keep
  their names: ``norm1``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``)
- ``norm.*`` and ``head.fc.*`` unchanged.
- Non-persistent buffers (``relative_position_index``, ``attn_mask``) are dropped, as timm's
  ``checkpoint_filter_fn`` does.
- Official checkpoints merge patches at the end of a stage (``layers.0.downsample`` exists) and
  name the classifier ``head``: their downsamplers move one stage on and ``head.*`` becomes
  ``head.fc.*`` (timm's ``checkpoint_filter_fn``).

Relative-position bias tables of another window size are resized bicubically afterwards to the
window of the block that owns them, non-square ones included (:mod:`hfactory.convert.resize`, whose
docstring says how that differs from running a model built at 224 on smaller inputs).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, register_family

__all__ = ["map_swin", "spec_from_timm_swin", "PRESET"]

PRESET = "swin_tiny_patch4_window7_224"
_DROPPED = ("relative_position_index", "attn_mask")


def map_swin(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """timm- (or official-) Swin keys -> hfactory keys (see module docstring). Keys that match no
    pattern are passed through for the mismatch report to name."""
    official = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.rsplit(".", 1)[-1] in _DROPPED:
            continue
        if official:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        if k.startswith("patch_embed.proj."):
            k = "stages.0.downsample.conv." + k[len("patch_embed.proj."):]
        elif k.startswith("patch_embed.norm."):
            k = "stages.0.downsample.norm." + k[len("patch_embed.norm."):]
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(downsample\..+|blocks\.\d+\..+)", k)
            if m is not None:
                rest = re.sub(r"^(blocks\.\d+\.)attn\.", r"\1token_mixer.", m.group(2))
                k = f"stages.{m.group(1)}.{rest}"
        out[k] = v
    return out


def _layernorm(module: nn.Module, what: str) -> dict:
    if not isinstance(module, nn.LayerNorm):
        raise UsageError(f"{what}: no hfactory norm for timm {type(module).__name__}; Swin specs use LayerNorm")
    return {"kind": "layernorm", "eps": module.eps, "bias": module.bias is not None}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(x) for x in v)


def square_patch(patch_embed) -> tuple[int, int]:
    """The patch size of a timm Swin / Swin V2 ``PatchEmbed``.

    Raises:
        UsageError: a non-square patch (hfactory's conv patch embedding is square).
    """
    patch = _pair(patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise UsageError(f"non-square patch size {patch} is not supported; hfactory's conv patch embedding is square")
    return patch


def timm_stages(timm_model: nn.Module, family: str):
    """Yield ``(layer, blocks, window)`` per stage of a timm Swin / Swin V2 model: the stage, its
    blocks and its reference window (timm's ``_ref_window_sizes`` where set, else the first
    block's).

    Raises:
        UsageError: ``always_partition=True``, or an MLP activation other than GELU (``family``
            names the model in the message).
    """
    targets = getattr(timm_model, "_ref_window_sizes", None)
    for i, layer in enumerate(timm_model.layers):
        blocks = list(layer.blocks)
        if any(getattr(b, "always_partition", False) for b in blocks):
            raise UsageError("timm always_partition=True is not supported (hfactory clips windows to the grid, "
                             "as timm's default)")
        act = blocks[0].mlp.act
        if type(act).__name__ != "GELU":
            raise UsageError(f"stage {i}: no hfactory activation for timm {type(act).__name__} in {family}'s MLP")
        yield layer, blocks, (_pair(targets[i]) if targets is not None else _pair(blocks[0].window_size))


def spec_from_timm_swin(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``SwinTransformer``: the ``swin_tiny_patch4_window7_224``
    preset with the model's widths, depths, heads, windows, MLP ratios, norms, patch size, image
    size, classes, pooling and drop rates.

    Raises:
        ValueError: a timm option hfactory's Swin does not express (``always_partition``, a head
            dim that does not divide the width, non-square patches, a norm other than LayerNorm,
            pooling other than avg/max).
    """
    from ..presets import load_preset

    spec = load_preset(PRESET).model_dump(mode="json", exclude_none=True)
    pe = timm_model.patch_embed
    patch = square_patch(pe)
    stages, last = [], None
    for i, (layer, blocks, window) in enumerate(timm_stages(timm_model, "Swin")):
        blk, attn = blocks[0], blocks[0].attn
        dim, heads = blk.dim, attn.num_heads
        if attn.qkv.out_features != 3 * dim:
            raise UsageError(f"stage {i}: head_dim x num_heads = {attn.qkv.out_features // 3} differs from the "
                             f"width {dim}; hfactory's plan needs num_heads * dim_head == embedding")
        stage = {
            "embedding": dim, "depth": len(blocks), "num_heads": heads,
            "norm": _layernorm(blk.norm1, f"layers.{i}.blocks.0.norm1"),
            "token_mixer": {"kind": "window_attention", "window_size": window[0] if window[0] == window[1]
                            else list(window), "shift": True, "qkv_bias": attn.qkv.bias is not None,
                            "proj_bias": attn.proj.bias is not None, "attn_drop": attn.attn_drop.p,
                            "proj_drop": attn.proj_drop.p},
            "feedforward": {"kind": "mlp", "hidden_layer_multiplier": blk.mlp.fc1.out_features / dim,
                            "activation": "gelu" if getattr(blk.mlp.act, "approximate", "none") == "none" else "gelu_tanh",
                            "bias": blk.mlp.fc1.bias is not None, "drop": blk.mlp.drop1.p},
        }
        if i == 0:
            stage["downsample"] = {"kind": "conv", "patch_size": patch[0],
                                   "bias": pe.proj.bias is not None,
                                   "norm": _layernorm(pe.norm, "patch_embed.norm") if not isinstance(
                                       pe.norm, nn.Identity) else {"kind": "identity"}}
        elif isinstance(layer.downsample, nn.Identity):
            stage["downsample"] = "none"
        else:
            stage["downsample"] = {"kind": "patch_merging",
                                   "norm": _layernorm(layer.downsample.norm, f"layers.{i}.downsample.norm")}
        stages.append(stage)
        last = blocks[-1]
    spec["stages"] = stages
    spec["defaults"] = {}
    pool = timm_model.global_pool
    if pool not in ("avg", "max"):
        raise UsageError(f"timm global_pool {pool!r} is not supported; hfactory pools 'avg' or 'max'")
    dp = getattr(last.drop_path1, "drop_prob", 0.0) if last is not None else 0.0
    dp = float(f"{dp:.6g}")  # timm computes the rates in float32
    spec.update(
        img_size=list(_pair(pe.img_size)), in_chans=pe.proj.in_channels, num_classes=timm_model.num_classes,
        global_pool=pool, drop_rate=timm_model.head.drop.p, drop_path_rate=float(dp),
        head_norm=_layernorm(timm_model.norm, "norm"), head_norm_first=True,
        name=getattr(timm_model, "pretrained_cfg", {}).get("architecture", "swin") or "swin",
    )
    return spec


def _detect(state_dict: Mapping[str, torch.Tensor]) -> bool:
    pat = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$")
    return "patch_embed.proj.weight" in state_dict and any(pat.match(k) for k in state_dict) \
        and not any(k.endswith("logit_scale") or ".cpb_mlp." in k for k in state_dict)  # Swin V2 differs


register_family(Family(
    name="swin",
    detect=_detect,
    map=map_swin,
    spec_from_timm=spec_from_timm_swin,
    timm_class="SwinTransformer",
))
