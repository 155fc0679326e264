"""MViTv2 weights from timm (``timm.models.mvitv2.MultiScaleVit``, arXiv 2112.01526) into
hfactory's MViTv2 specs (preset ``mvitv2_tiny``; components in :mod:`hfactory.spec.mvit`).

Renames: timm's stem ``patch_embed.proj`` is stage 0's conv downsampler
(``stages.0.downsample.conv``), a block's ``attn`` is its ``token_mixer`` and its
``shortcut_proj_attn`` the block's residual ``proj``; ``norm`` (the final norm) and ``head.fc``
keep their names. The relative-position tables ``rel_pos_h``/``rel_pos_w`` ``(L, dim_head)`` of
another length than the model's (weights of another input size) are resized linearly over the
rows, as timm's ``mvitv2.checkpoint_filter_fn`` does.

:func:`spec_from_timm_mvitv2` reads a timm model into a spec for the configurations hfactory
expresses: ``expand_attn=True`` (every named size but ``mvitv2_large``), no class token, no
absolute position embedding, ``pool_first=False``, pooling modes ``conv``/``max``/``avg``; the
others are refused with a ``ValueError`` naming the setting.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from ..layers.mvit import resize_rel_pos
from .core import Family, register_family

__all__ = ["map_mvitv2", "spec_from_timm_mvitv2"]

_RULES = [
    (re.compile(r"^patch_embed\.proj\."), "stages.0.downsample.conv."),
    (re.compile(r"^(stages\.\d+\.blocks\.\d+\.)attn\."), r"\1token_mixer."),
    (re.compile(r"^(stages\.\d+\.blocks\.\d+\.)shortcut_proj_attn\."), r"\1proj."),
]


def map_mvitv2(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-MViTv2 keys -> hfactory keys (see module docstring); ``rel_pos_h``/``rel_pos_w``
    tables resized (linear) to the length ``model`` has for the same key, other tensors
    unchanged (shape mismatches are left for the caller's report)."""
    expected = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _RULES:
            k = pattern.sub(repl, k)
        ref = expected.get(k)
        if (k.endswith((".rel_pos_h", ".rel_pos_w")) and ref is not None and v.ndim == 2 and ref.ndim == 2
                and v.shape[1] == ref.shape[1] and v.shape[0] != ref.shape[0]):
            v = resize_rel_pos(v, ref.shape[0])
        out[k] = v
    return out


def _refuse(what: str) -> UsageError:
    return UsageError(f"timm MultiScaleVit with {what} has no hfactory MViTv2 spec; supported: expand_attn=True, "
                      "no class token, no absolute position embedding, pool_first=False, mode conv/max/avg")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _img_size(timm_model: nn.Module) -> list[int]:
    """The square image side the timm model was built for: read from stage 0's first
    relative-position table (``2 * grid // min(q_stride, kv_stride) - 1`` rows), else its
    pretrained config's input size (timm does not keep ``img_size`` on the model)."""
    attn = timm_model.stages[0].blocks[0].attn
    stride = timm_model.patch_embed.proj.stride[0]
    if getattr(attn, "rel_pos_h", None) is not None:
        # a skipped pooling (kernel and stride 1) counts as stride 1
        s = min(_pair(p.stride)[0] if p is not None else 1 for p in (attn.pool_q, attn.pool_k))
        side = (attn.rel_pos_h.shape[0] + 1) // 2 * s * stride
        return [side, side]
    cfg = getattr(timm_model, "pretrained_cfg", {}) or {}
    return list(cfg.get("input_size", (3, 224, 224))[1:])


def spec_from_timm_mvitv2(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``MultiScaleVit``, read from its modules: widths,
    depths, heads, pooling kernels and strides (q per stage, kv per stage), relative positions,
    residual pooling, MLP ratio, norm eps, classes and the built image size.

    Raises:
        ValueError: a configuration hfactory does not express (named in the message).
    """
    m = timm_model
    if getattr(m, "cls_token", None) is not None:
        raise _refuse("a class token (use_cls_token=True)")
    if getattr(m, "pos_embed", None) is not None:
        raise _refuse("an absolute position embedding (use_abs_pos=True)")
    if not getattr(m, "expand_attn", True):
        raise _refuse("expand_attn=False (the width changes in the last block's MLP)")
    stages = []
    for i, stage in enumerate(m.stages):
        blocks = list(stage.blocks)
        b0 = blocks[0]
        attn = b0.attn
        if type(attn).__name__ != "MultiScaleAttention":
            raise _refuse(f"{type(attn).__name__} (pool_first=True)")
        if attn.mode not in ("conv", "max", "avg"):
            raise _refuse(f"mode {attn.mode!r}")
        q_stride = _pair(attn.pool_q.stride) if attn.pool_q is not None else [1, 1]
        kq = next((_pair(b.attn.pool_q.kernel_size) for b in blocks if b.attn.pool_q is not None), [1, 1])
        pk = attn.pool_k
        kkv, kv_stride = (_pair(pk.kernel_size), _pair(pk.stride)) if pk is not None else ([1, 1], [1, 1])
        mixer = {"kind": "mvit_attention", "pool": attn.mode, "kernel_q": kq, "kernel_kv": kkv,
                 "kv_stride": kv_stride, "rel_pos": getattr(attn, "rel_pos_h", None) is not None,
                 "residual_pooling": attn.residual_pooling, "qkv_bias": attn.qkv.bias is not None}
        if attn.norm_q is not None or attn.norm_k is not None:
            mixer["norm_eps"] = (attn.norm_q or attn.norm_k).eps
        dim = b0.dim_out
        entry = {"embedding": dim, "depth": len(blocks), "num_heads": attn.num_heads, "dim_head": attn.head_dim,
                 "token_mixer": mixer, "norm": {"kind": "layernorm", "eps": b0.norm1.eps},
                 "feedforward": {"kind": "mlp", "hidden_layer_multiplier": b0.mlp.fc1.out_features / dim,
                                 "activation": "gelu"}}
        if i == 0:
            if q_stride != [1, 1]:
                raise _refuse("query pooling in stage 0 (stride_q[0] != (1, 1))")
            conv = m.patch_embed.proj
            entry["downsample"] = {"kind": "conv", "patch_size": _pair(conv.kernel_size)[0],
                                   "stride": _pair(conv.stride)[0], "padding": _pair(conv.padding)[0]}
        else:
            entry["downsample"] = {"kind": "mvit_q_pool", "q_stride": q_stride}
        stages.append(entry)
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    return {"name": cfg.get("architecture", "mvitv2"), "img_size": _img_size(m), "in_chans": m.in_chans,
            "num_classes": m.num_classes, "global_pool": m.global_pool,
            "head_norm": {"kind": "layernorm", "eps": m.norm.eps}, "head_norm_first": True, "stages": stages}


def _detect(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state_dict and "stages.0.blocks.0.attn.qkv.weight" in state_dict


register_family(Family(
    name="mvitv2",
    detect=_detect,
    map=map_mvitv2,
    spec_from_timm=spec_from_timm_mvitv2,
    timm_class="MultiScaleVit",
))
