"""Hiera weights from timm (``timm.models.hiera``) and from the official ``hiera`` package
(facebookresearch/hiera, PyPI ``hiera-transformer``) into hfactory's Hiera specs.

timm and the package number blocks flatly (``blocks.N``); hfactory nests them in stages, so
``N`` is placed with the model's plan (stage depths). The package's keys differ only in the
head (``norm.*`` and ``head.projection.*``; timm: ``head.norm.*``, ``head.fc.*``), as timm's own
``hiera.checkpoint_filter_fn`` maps them (also ``encoder_norm.*`` of MAE checkpoints and
``pos_embed_abs`` of abs-win checkpoints).

Position embeddings: the plain learned one is ``(1, N, C)`` in raster order (reshaped to
``(1, H, W, C)``; a square source grid when ``N`` differs from the model's, then resized on load
by :mod:`hfactory.convert.resize`; a non-square source grid is given channels-first, see
:func:`map_hiera`); the abs-win ones (timm ``abs_win_pos_embed=True``,
arXiv 2311.05613) are channels-first ``(1, C, gh, gw)`` / ``(1, C, uh, uw)`` and are permuted to
hfactory's channels-last ``(1, gh, gw, C)`` / ``(1, uh, uw, C)``. LayerScale ``ls1.gamma`` /
``ls2.gamma`` become ``layer_scale1.scale`` / ``layer_scale2.scale``.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from .core import Family, mismatch_report, register_family

__all__ = ["map_hiera", "spec_from_timm_hiera", "from_package_keys", "from_hiera_mae_state_dict"]

_BLOCK_RENAMES = ((r"^attn\.", "token_mixer."), (r"^ls(\d)\.gamma$", r"layer_scale\1.scale"))


def _block_index(model: nn.Module) -> list[tuple[int, int]]:
    return [(s.index, j) for s in model.plan.stages for j in range(s.depth)]


def from_package_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Rename the official package's (and older checkpoints') keys to timm's, as timm's
    ``hiera.checkpoint_filter_fn``."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("norm."):
            k = "head.norm." + k[len("norm."):]
        elif k.startswith("encoder_norm."):
            k = "head.norm." + k[len("encoder_norm."):]
        elif k.startswith("head.projection."):
            k = "head.fc." + k[len("head.projection."):]
        elif k == "pos_embed_abs":
            k = "pos_embed"
        out[k] = v
    return out


def _raster_grid(n: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The grid of a ``(1, n, C)`` raster-order embedding: the model's ``grid`` when ``n`` fits it, else
    a square one, else None (a non-square source grid cannot be told from ``n`` alone).

    Limit: a non-square source grid whose token count is a perfect square (e.g. 64x16 = 1024
    tokens, from a model built at 256x64) is taken as square (32x32), as timm's loaders assume
    too; give such an embedding channels-first ``(1, C, H, W)``, which carries its grid."""
    if n == grid[0] * grid[1]:
        return tuple(grid)
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def _grid_error(key: str, source: torch.Tensor, target: torch.Tensor, layout: str) -> UsageError:
    n = source.shape[1]
    return UsageError(
        f"{key}: source {tuple(source.shape)} vs model {tuple(target.shape)}: {n} tokens are neither the model's "
        f"{target.shape[1]}x{target.shape[2]} grid nor a square one, so the source grid cannot be inferred; pass "
        f"the source grid by giving {key} as {layout}")


def _pos_embed(v: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """hfactory's ``(1, H, W, C)`` of a timm / package ``pos_embed``, or ``v`` unchanged when its
    source grid cannot be inferred (see :func:`map_hiera`)."""
    if v.ndim == 4:  # abs-win global embedding (or a source grid given so), channels-first (1, C, gh, gw)
        return v.permute(0, 2, 3, 1)
    # (1, N, C) in raster order -> (1, H, W, C); a square source grid if N differs from ours
    hw = _raster_grid(v.shape[1], model.plan.stages[0].out_grid) if v.ndim == 3 else None
    return v if hw is None else v.reshape(1, *hw, v.shape[-1])


_POS = "stages.0.pos_embed.pos_embed"


def map_hiera(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """timm-Hiera keys -> hfactory keys (see module docstring).

    A ``(1, N, C)`` ``pos_embed`` is read on the model's grid when ``N`` fits it, else on a square
    grid (as timm's ``resample_abs_pos_embed`` assumes), else it is left as it is: a state dict that
    otherwise fits the model (its classifier aside) raises the ``ValueError`` below; one that does not (another
    architecture or size) is named key by key by the caller's mismatch report. A source built for a
    non-square size (timm ``img_size=(320, 256)``: 80x64 tokens) is loaded by giving ``pos_embed``
    channels-first ``(1, C, H, W)``, the layout of abs-win checkpoints.

    Raises:
        ValueError: ``pos_embed``'s source grid cannot be inferred (names the key and both shapes).
    """
    blocks = _block_index(model)
    out = {}
    for k, v in from_package_keys(state_dict).items():
        if k == "pos_embed":
            out["stages.0.pos_embed.pos_embed"] = _pos_embed(v, model)
        elif k == "pos_embed_win" and v.ndim == 4:
            out["stages.0.pos_embed.pos_embed_win"] = v.permute(0, 2, 3, 1)
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
            rest = m.group(2)
            for pattern, repl in _BLOCK_RENAMES:
                rest = re.sub(pattern, repl, rest)
            out[f"stages.{stage}.blocks.{j}.{rest}"] = v
    pos = out.get(_POS)
    if pos is not None and pos.ndim == 3:  # a (1, N, C) embedding of an unknown, non-square grid
        expected = model.state_dict()

        def rest(d):  # all but the embedding and the classifier (a Hiera with other classes still gets the hint)
            return {k: t for k, t in d.items() if k != _POS and not k.startswith("head.")}

        if _POS in expected and not mismatch_report(rest(expected), rest(out)):
            raise _grid_error("pos_embed", pos, expected[_POS], "channels-first (1, C, H, W), e.g. "
                              "state_dict['pos_embed'] = pos_embed.reshape(1, H, W, C).permute(0, 3, 1, 2) "
                              "(H, W = the source image size / the patch stride)")
        # otherwise another architecture or size: the caller's mismatch report names every key
    return out


def _unsupported(what: str) -> UsageError:
    return UsageError(f"timm Hiera with {what} has no hfactory equivalent (supported: 2-D images, learned or "
                      "abs-win position embedding, avg/max pooling, square patch embedding)")


def spec_from_timm_hiera(timm_model: nn.Module) -> dict:
    """The hfactory spec (dict) of a timm ``Hiera``: widths, depths, heads, token mixers (mask-unit
    or global per stage, read through timm's one-block lag), q-pooling stages and stride, the
    residual expansion (``use_expand_proj``), LayerScale, position embedding (learned or
    abs-win with its global size), patch embedding, norm eps, MLP ratio, image size, mask
    units, classes and pooling.

    Raises:
        ValueError: a configuration hfactory cannot express (video / separate position
            embeddings, non-square patch conv, ``avgmax`` pooling).
    """
    m = timm_model
    if getattr(m, "pos_embed_spatial", None) is not None or len(m.tokens_spatial_shape) != 2:
        raise _unsupported("video input / sep_pos_embed")
    conv = m.patch_embed.proj
    if len({*conv.kernel_size}) != 1 or len({*conv.stride}) != 1 or len({*conv.padding}) != 1:
        raise _unsupported(f"a non-square patch conv {conv}")
    pool = m.head.pool_type
    if pool not in ("avg", "max"):
        raise _unsupported(f"global_pool {pool!r}")
    blocks, ends = m.blocks, list(m.stage_ends)
    first = blocks[0]
    eps = first.norm1.eps

    def mixer(stage: int) -> str:
        # timm decides stage i's attention with one block of lag: the first block of stage i
        # uses stage i-1's. Read it from a non-first block of the stage, else the next stage's first.
        a = ends[stage - 1] + 1 if stage else 0
        b = ends[stage]
        probe = b if (stage == 0 or b > a) else (b + 1 if b + 1 < len(blocks) else None)
        use_mu = probe is not None and blocks[probe].attn.use_mask_unit_attn
        return "mask_unit_attention" if use_mu else "attention"

    ls = first.ls1
    layer_scale = float(getattr(ls, "init_values", 1e-5)) if hasattr(ls, "gamma") else False
    expand = "proj"
    if len(ends) > 1 and blocks[ends[0] + 1].do_expand and blocks[ends[0] + 1].proj is None:
        expand = "max_avg"
    q_stride = list(m.q_stride)
    stages = []
    for i, b in enumerate(ends):
        a = ends[i - 1] + 1 if i else 0
        last = blocks[b]
        stage = {"embedding": last.dim_out, "depth": b - a + 1, "num_heads": last.attn.heads,
                 "token_mixer": mixer(i)}
        if i == 0:
            stage["downsample"] = {"kind": "conv", "patch_size": conv.kernel_size[0], "stride": conv.stride[0],
                                   "padding": conv.padding[0]}
            if m.pos_embed_win is not None:
                stage["pos_embed"] = {"kind": "abs_win", "global_pos_size": list(m.pos_embed.shape[-2:]),
                                      "window_size": list(m.pos_embed_win.shape[-2:])}
            else:
                stage["pos_embed"] = "learned"
        else:  # timm pools only in the first q_pool transitions; later ones just widen
            stage["downsample"] = {"kind": "q_pool", "q_stride": q_stride if i <= m.q_pool else [1, 1],
                                   "lag_mixer": True, "expand": expand}
        stages.append(stage)
    head_norm = m.head.norm
    return {
        "name": m.pretrained_cfg.get("architecture", "hiera") if hasattr(m, "pretrained_cfg") else "hiera",
        "img_size": [n * s for n, s in zip(m.tokens_spatial_shape, m.patch_stride)],
        "in_chans": conv.in_channels,
        "num_classes": m.num_classes,
        "global_pool": pool,
        "mask_unit_size": list(m.mask_unit_size),
        "head_norm": {"kind": "layernorm", "eps": head_norm.eps} if isinstance(head_norm, nn.LayerNorm)
        else {"kind": "identity"},
        "defaults": {
            "norm": {"kind": "layernorm", "eps": eps},
            "feedforward": {"kind": "mlp", "hidden_layer_multiplier": first.mlp.fc1.out_features / first.dim_out,
                            "activation": "gelu"},
            "layer_scale": layer_scale,
        },
        "stages": stages,
    }


register_family(Family(
    name="hiera",
    detect=lambda sd: "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd)
    and ("pos_embed" in sd or "pos_embed_abs" in sd) and not any("relative_position" in k for k in sd)
    and "pos_embed_window" not in sd,  # SAM2's HieraDet (hfactory.convert.sam2)
    map=map_hiera,
    spec_from_timm=spec_from_timm_hiera,
    timm_class="Hiera",
))


_MAE_PASS = ("mask_token", "multi_scale_fusion_heads.", "decoder_embed.", "decoder_norm.", "decoder_pred.")


def from_hiera_mae_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Map a state dict of the official package's ``MaskedAutoencoderHiera`` (``hiera.mae_hiera_tiny_224()``
    ..., or a ``{"model_state": ...}`` checkpoint) onto a :class:`hfactory.mae.MaskedAutoencoder`.

    Encoder keys (``patch_embed``, ``pos_embed``, ``blocks.N``, ``encoder_norm``) map as
    :func:`map_hiera` does, under ``encoder.`` (``encoder_norm`` is the encoder's final ``norm``);
    ``decoder_blocks.N.attn.*`` become ``decoder_blocks.N.token_mixer.*``; ``decoder_pos_embed``
    ``(1, N, D)`` in raster order becomes channels-last ``(1, h, w, D)`` (bicubically resized when the
    model's grid differs); ``mask_token``, ``multi_scale_fusion_heads.*`` (the package's last head is
    an ``Identity`` without weights), ``decoder_embed``, ``decoder_norm`` and ``decoder_pred`` keep
    their names.

    Raises:
        ValueError: the mapped dict does not fit ``model``; names the mismatching keys and shapes.
    """
    from ..layers.posembed import resize_pos_embed
    from .core import mismatch_report
    from .resize import resize_to_model

    if "model_state" in state_dict:
        state_dict = state_dict["model_state"]
    encoder, out = {}, {}
    for k, v in state_dict.items():
        if k == "decoder_pos_embed":
            grid = tuple(model.decoder_pos_embed.shape[1:3])
            if v.ndim == 4:  # hfactory's own channels-last (1, H, W, D): a source grid given so
                out[k] = resize_pos_embed(v, grid) if v.shape[-1] == model.decoder_pos_embed.shape[-1] else v
                continue
            hw = _raster_grid(v.shape[1], grid) if v.ndim == 3 else None
            out[k] = v if hw is None else resize_pos_embed(v.reshape(1, *hw, v.shape[-1]), grid)
        elif k.startswith("decoder_blocks."):
            out[re.sub(r"^(decoder_blocks\.\d+\.)attn\.", r"\1token_mixer.", k)] = v
        elif k.startswith(_MAE_PASS):
            out[k] = v
        else:
            encoder[k] = v
    mapped = resize_to_model(map_hiera(encoder, model.encoder), model.encoder.state_dict(), model.encoder)
    out.update({f"encoder.{k}": v for k, v in mapped.items()})
    expected = model.state_dict()
    dec = out.get("decoder_pos_embed")
    if dec is not None and dec.ndim == 3 and "decoder_pos_embed" in expected and not mismatch_report(
            {k: t for k, t in expected.items() if k != "decoder_pos_embed"},
            {k: t for k, t in out.items() if k != "decoder_pos_embed"}):
        raise _grid_error("decoder_pos_embed", dec, expected["decoder_pos_embed"], "channels-last (1, H, W, D), "
                          "e.g. state_dict['decoder_pos_embed'] = decoder_pos_embed.reshape(1, H, W, D) "
                          "(H, W = the source's decoder grid: its last stage's grid times the unrolled strides)")
    report = mismatch_report(expected, out)
    if report:
        raise UsageError(f"hiera MAE state dict does not fit this model ({model.spec.name}); {report}")
    return out
