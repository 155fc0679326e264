"""Resize resolution-dependent weights on load (bicubic), so weights trained at one resolution
load into a model built for another: learned position embeddings ``(1, H, W, C)`` and Swin's
relative-position bias tables ``((2*Wh-1)*(2*Ww-1), heads)`` (as timm's ``resample_abs_pos_embed``
and Swin's fine-tuning recipe, ``get_started.md`` "fine-tuning on higher resolution")."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = ["resize_to_model", "resize_grid", "RESIZABLE_SUFFIXES"]

#: Parameter-name suffixes whose spatial size follows the resolution, and their layout.
RESIZABLE_SUFFIXES = {
    "pos_embed": "grid",                         # (1, H, W, C)
    "pos_embed_win": "grid",                     # (1, uh, uw, C)
    "relative_position_bias_table": "table",     # ((2Wh-1)(2Ww-1), heads)
}


def resize_grid(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``(1, H, W, C)`` to ``(1, size[0], size[1], C)`` (``align_corners=False``)."""
    if tuple(t.shape[1:3]) == tuple(size):
        return t
    out = F.interpolate(t.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(t.dtype)


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
            out[key] = resize_grid(value, tuple(ref.shape[1:3]))
        elif kind == "table" and value.ndim == 2 and value.shape[1] == ref.shape[1]:
            out[key] = _resize_table(value, ref.shape)
    return out
