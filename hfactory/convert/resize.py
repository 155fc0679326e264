"""Resize resolution-dependent weights on load (bicubic), so weights trained at one resolution
load into a model built for another: learned position embeddings ``(1, H, W, C)`` (as timm's
``resample_abs_pos_embed``: bicubic with antialias) and Swin's relative-position bias tables
``((2*Wh-1)*(2*Ww-1), heads)`` (bicubic, Swin's recipe in ``get_started.md``, "fine-tuning on
higher resolution")."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..layers.posembed import resize_pos_embed

__all__ = ["resize_to_model", "RESIZABLE_SUFFIXES"]

#: Parameter-name suffixes whose spatial size follows the resolution, and their layout.
RESIZABLE_SUFFIXES = {
    "pos_embed": "grid",                         # (1, H, W, C)
    "pos_embed_win": "grid",                     # (1, uh, uw, C)
    "relative_position_bias_table": "table",     # ((2Wh-1)(2Ww-1), heads)
}


def _resize_table(t: torch.Tensor, target: torch.Size) -> torch.Tensor:
    old, heads = t.shape
    new = target[0]
    side_old, side_new = round(old ** 0.5), round(new ** 0.5)
    if side_old ** 2 != old or side_new ** 2 != new:
        return t  # non-square windows: left to the mismatch report
    grid = t.T.reshape(1, heads, side_old, side_old).float()
    grid = F.interpolate(grid, size=(side_new, side_new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new).T.to(t.dtype)


def resize_to_model(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict:
    """Return ``state`` with every resizable tensor resized to the shape ``expected`` has."""
    out = dict(state)
    for key, value in state.items():
        kind = RESIZABLE_SUFFIXES.get(key.rsplit(".", 1)[-1])
        ref = expected.get(key)
        if kind is None or ref is None or value.shape == ref.shape:
            continue
        if kind == "grid" and value.ndim == 4 and ref.ndim == 4 and value.shape[-1] == ref.shape[-1]:
            out[key] = resize_pos_embed(value, tuple(ref.shape[1:3]))
        elif kind == "table" and value.ndim == 2 and value.shape[1] == ref.shape[1]:
            out[key] = _resize_table(value, ref.shape)
    return out
