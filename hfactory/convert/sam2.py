"""SAM2 image-encoder trunk (HieraDet) weights, from timm (``timm.models.hieradet_sam2``,
``sam2_hiera_*``) and from SAM2 checkpoints (facebookresearch/sam2, arXiv 2408.00714), into
hfactory's ``sam2_hiera_*`` specs.

Key layouts (both number blocks flatly, ``blocks.N``; hfactory nests them in stages, placed with
the model's plan, so every depth variant converts):

- timm: ``pos_embed`` ``(1, C, gh, gw)``, ``pos_embed_window`` ``(1, C, 8, 8)`` (channels-first;
  permuted to hfactory's channels-last ``abs_win`` ``pos_embed`` / ``pos_embed_win``),
  ``patch_embed.proj.*``, ``blocks.N.{norm1,proj,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
  ``blocks.N.ls{1,2}.gamma`` (``hieradet_small`` only) and ``head.norm.*`` (timm's final norm,
  applied to the pooled vector; hfactory's ``norm.*``).
- SAM2: the same trunk keys under ``image_encoder.trunk.`` in a full model's checkpoint (which
  is often wrapped as ``{"model": state_dict}``), with ``mlp.layers.0`` / ``mlp.layers.1`` for
  ``mlp.fc1`` / ``mlp.fc2`` (timm's ``hieradet_sam2.checkpoint_filter_fn`` renames the same way),
  and no final norm.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, convert_state_dict, register_family
from .hiera import map_hiera

__all__ = ["map_sam2", "from_sam2_state_dict", "spec_from_timm_sam2", "SAM2_TRUNK_PREFIX"]

#: the trunk's prefix in a full SAM2 model's state dict (``SAM2Base.image_encoder.trunk``)
SAM2_TRUNK_PREFIX = "image_encoder.trunk."


def map_sam2(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm ``HieraDet`` keys -> hfactory keys (see the module docstring): ``pos_embed_window``
    becomes the abs-win ``pos_embed_win`` (channels-last), everything else maps as timm Hiera's
    (:func:`hfactory.convert.hiera.map_hiera`)."""
    return map_hiera({("pos_embed_win" if k == "pos_embed_window" else k): v for k, v in state_dict.items()}, model)


def from_sam2_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Map a SAM2 checkpoint's trunk onto ``model`` (e.g. ``create_model("sam2_hiera_tiny")``):
    returns a state dict ``model.load_state_dict(..., strict=True)`` accepts.

    ``state_dict``: the trunk's own keys (``sam2.modeling.backbones.hieradet.Hiera``), or a full
    SAM2 model's (keys under ``image_encoder.trunk.``; the other keys, neck, memory and decoders,
    are ignored), optionally wrapped as ``{"model": ...}`` (the released ``.pt`` files).
    ``mlp.layers.0/1`` become ``mlp.fc1/fc2``. SAM2's trunk has no final norm: when ``model`` has
    one (the preset's ``norm``, timm's ``head.norm``, applied only by ``forward_head`` to the
    pooled vector, never to the stage maps SAM2 uses), it is set to the identity affine
    (weight 1, bias 0), as a freshly built LayerNorm.

    Raises:
        ValueError: the mapped dict does not fit ``model``; names the mismatching keys and shapes.
    """
    if "model" in state_dict and not isinstance(state_dict["model"], torch.Tensor):
        state_dict = state_dict["model"]
    if any(k.startswith(SAM2_TRUNK_PREFIX) for k in state_dict):
        state_dict = {k[len(SAM2_TRUNK_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SAM2_TRUNK_PREFIX)}
    renamed = {k.replace(".mlp.layers.0.", ".mlp.fc1.").replace(".mlp.layers.1.", ".mlp.fc2."): v
               for k, v in state_dict.items()}
    expected = model.state_dict()
    if "head.norm.weight" not in renamed and "norm.weight" in expected:
        renamed["head.norm.weight"] = torch.ones_like(expected["norm.weight"])
        renamed["head.norm.bias"] = torch.zeros_like(expected["norm.bias"])
    return convert_state_dict(renamed, model, SAM2_FAMILY)


def _unsupported(what: str) -> UsageError:
    return UsageError(f"timm HieraDet with {what} has no hfactory equivalent (supported: square windows, "
                      "a square patch conv, q_stride equal on both axes)")


def spec_from_timm_sam2(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``HieraDet`` (``sam2_hiera_*``, ``hieradet_small``):
    widths, depths, heads, per-stage windows (``window_spec``), global blocks
    (``global_att_blocks`` as per-block overrides), q-pooling stages and stride, LayerScale,
    abs-win position embedding sizes, patch conv, norm eps, MLP ratio and classes.

    Raises:
        ValueError: a configuration hfactory cannot express (non-square patch conv, a global
            block at a q-pooling block, which SAM2 itself cannot run).
    """
    m = timm_model
    conv = m.patch_embed.proj
    if len({*conv.kernel_size}) != 1 or len({*conv.stride}) != 1 or len({*conv.padding}) != 1:
        raise _unsupported(f"a non-square patch conv {conv}")
    ends, blocks, glob = list(m.stage_ends), m.blocks, set(m.global_att_blocks)
    first = blocks[0]
    if glob & set(m.q_pool_blocks):
        raise _unsupported(f"global attention at q-pooling blocks {sorted(glob & set(m.q_pool_blocks))}")
    ls = first.ls1
    stages = []
    for i, end in enumerate(ends):
        start = ends[i - 1] + 1 if i else 0
        last = blocks[end]
        stage = {"embedding": last.dim_out, "depth": end - start + 1, "num_heads": last.attn.num_heads,
                 "token_mixer": {"kind": "sam2_window_attention", "window_size": int(m.window_spec[i])}}
        at = [b - start for b in range(start, end + 1) if b in glob]
        if at:
            stage["blocks"] = [{"at": at, "token_mixer": "attention"}]
        if i == 0:
            stage["downsample"] = {"kind": "conv", "patch_size": conv.kernel_size[0], "stride": conv.stride[0],
                                   "padding": conv.padding[0]}
            stage["pos_embed"] = {"kind": "abs_win", "global_pos_size": list(m.pos_embed.shape[-2:]),
                                  "window_size": list(m.pos_embed_window.shape[-2:]), "antialias": False}
        else:  # timm pools in the first q_pool transitions; later ones only widen
            stride = list(m.q_stride) if start in m.q_pool_blocks else [1, 1]
            stage["downsample"] = {"kind": "q_pool", "q_stride": stride, "lag_mixer": True}
        stages.append(stage)
    head_norm = m.head.norm
    return {
        "name": m.pretrained_cfg.get("architecture", "sam2_hiera") if hasattr(m, "pretrained_cfg") else "sam2_hiera",
        "img_size": 224,
        "in_chans": conv.in_channels,
        "num_classes": m.num_classes,
        "head_norm": {"kind": "layernorm", "eps": head_norm.eps} if isinstance(head_norm, nn.LayerNorm)
        else {"kind": "identity"},
        "defaults": {
            "norm": {"kind": "layernorm", "eps": first.norm1.eps},
            "feedforward": {"kind": "mlp", "hidden_layer_multiplier": first.mlp.fc1.out_features / first.dim_out,
                            "activation": "gelu"},
            "layer_scale": float(getattr(ls, "init_values", 1e-5)) if hasattr(ls, "gamma") else False,
        },
        "stages": stages,
    }


SAM2_FAMILY = register_family(Family(
    name="sam2",
    detect=lambda sd: "pos_embed_window" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd),
    map=map_sam2,
    spec_from_timm=spec_from_timm_sam2,
    timm_class="HieraDet",
))
