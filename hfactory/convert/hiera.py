"""Hiera weights from timm (``timm.models.hiera``) and from the official ``hiera`` package
(facebookresearch/hiera, PyPI ``hiera-transformer``) into hfactory's Hiera specs.

timm and the package number blocks flatly (``blocks.N``); hfactory nests them in stages, so
``N`` is placed with the model's plan (stage depths). The package's keys differ only in the
head (``norm.*`` and ``head.projection.*``; timm: ``head.norm.*``, ``head.fc.*``), as timm's own
``hiera.checkpoint_filter_fn`` maps them.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn

from .core import Family, register_family

__all__ = ["map_hiera", "spec_from_timm_hiera", "from_package_keys"]


def _block_index(model: nn.Module) -> list[tuple[int, int]]:
    return [(s.index, j) for s in model.plan.stages for j in range(s.depth)]


def from_package_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Rename the official package's head keys to timm's."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("norm."):
            k = "head.norm." + k[len("norm."):]
        elif k.startswith("head.projection."):
            k = "head.fc." + k[len("head.projection."):]
        out[k] = v
    return out


def map_hiera(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-Hiera keys -> hfactory keys (see module docstring)."""
    blocks = _block_index(model)
    out = {}
    for k, v in from_package_keys(state_dict).items():
        if k == "pos_embed":
            # (1, N, C) in raster order -> (1, H, W, C); a square source grid if N differs from ours
            h, w = model.plan.stages[0].out_grid
            if v.shape[1] != h * w:
                h = w = math.isqrt(v.shape[1])
            out["stages.0.pos_embed.pos_embed"] = v.reshape(1, h, w, v.shape[-1])
        elif k.startswith("patch_embed.proj."):
            out["stages.0.downsample.conv." + k.split(".")[-1]] = v
        elif k.startswith("head.norm."):
            out["norm." + k.split(".")[-1]] = v
        elif k.startswith("head.fc."):
            out[k] = v
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
            if m is None or int(m.group(1)) >= len(blocks):
                out[k] = v  # left for the mismatch report to name
                continue
            stage, j = blocks[int(m.group(1))]
            rest = re.sub(r"^attn\.", "token_mixer.", m.group(2))
            out[f"stages.{stage}.blocks.{j}.{rest}"] = v
    return out


def spec_from_timm_hiera(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``Hiera``: the ``hiera_tiny_224`` preset with the
    model's widths, depths, heads, mask units, image size and classes."""
    from ..presets import load_preset

    spec = load_preset("hiera_tiny_224").model_dump(mode="json", exclude_none=True)
    ends = [-1, *timm_model.stage_ends]
    stages = []
    for i, (a, b) in enumerate(zip(ends[:-1], ends[1:])):
        last = timm_model.blocks[b]
        stage = dict(spec["stages"][min(i, 3)])
        stage.update(embedding=last.dim_out, depth=b - a, num_heads=last.attn.heads)
        stage.pop("dim_head", None)
        stage["token_mixer"] = "mask_unit_attention" if timm_model.blocks[b].attn.use_mask_unit_attn else "attention"
        stages.append(stage)
    # timm's attention of stage i is decided with one block of lag: read it from the stage's last block
    spec["stages"] = stages
    spec["defaults"].pop("dim_head", None)
    ps = timm_model.patch_stride[0]
    spec["img_size"] = [n * ps for n in timm_model.tokens_spatial_shape]
    spec["mask_unit_size"] = list(timm_model.mask_unit_size)
    spec["num_classes"] = timm_model.num_classes
    spec["name"] = timm_model.pretrained_cfg.get("architecture", "hiera") if hasattr(timm_model, "pretrained_cfg") \
        else "hiera"
    return spec


register_family(Family(
    name="hiera",
    detect=lambda sd: "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd)
    and "pos_embed" in sd and not any("relative_position" in k for k in sd),
    map=map_hiera,
    spec_from_timm=spec_from_timm_hiera,
    timm_class="Hiera",
))
