"""Resize resolution-dependent weights on load, so weights trained at one resolution load into
a model built for another: learned position embeddings ``(1, H, W, C)`` (as timm's
``resample_abs_pos_embed``: bicubic with antialias), 1-D ones ``(1, N, C)`` (linear) and Swin's
relative-position bias tables ``((2*Wh-1)*(2*Ww-1), heads)`` (bicubic, Swin's recipe in
``get_started.md``, "fine-tuning on higher resolution"; per axis for non-square windows).

Clamped windows versus resized tables (Swin): a model built at one size and *run* on smaller
inputs is not the same function as a model *built* for the smaller size from the same weights.
E.g. ``swin_tiny_patch4_window7_224`` built at 224 and run on 160x160 inputs clamps stage 3's
window to its 5x5 grid and reads the central 9x9 offsets of its 13x13 table (the sub-window,
:func:`hfactory.layers.swin.relative_position_index`), while the same weights loaded into a model
built with ``img_size=160`` get a 9x9 table resized bicubically from the 13x13 one here. The two
give different outputs (logits ~1e-3 relative apart with timm's initial std-0.02 tables, ~4e-2 with
std-1 tables). The built-for-160 model is the counterpart of timm's ``img_size=160`` model, whose
``checkpoint_filter_fn`` resizes the table too (with BEiT's interpolation, not bicubic, so values
differ from ours).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..layers.posembed import resize_pos_embed

__all__ = ["resize_to_model", "resize_rel_pos_table", "resize_seq_pos_embed", "RESIZABLE_SUFFIXES"]

#: Parameter-name suffixes whose spatial size follows the resolution, and their layout.
RESIZABLE_SUFFIXES = {
    "pos_embed": "grid",                         # (1, H, W, C), or (1, N, C) for 1-D embeddings
    "pos_embed_win": "grid",                     # (1, uh, uw, C)
    "relative_position_bias_table": "table",     # ((2Wh-1)(2Ww-1), heads)
}


def _table_side(n: int) -> Optional[tuple[int, int]]:
    """The ``(2Wh-1, 2Ww-1)`` sides of a square window's table of ``n`` rows, or None."""
    side = round(n ** 0.5)
    return (side, side) if side * side == n and side % 2 == 1 else None


def resize_rel_pos_table(table: torch.Tensor, window: tuple[int, int],
                         source_window: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Resize a Swin relative-position bias table ``((2sh-1)*(2sw-1), heads)`` to ``window = (Wh, Ww)``:
    ``((2Wh-1)*(2Ww-1), heads)``, bicubic per axis (``align_corners=False``, no antialias: Swin's
    recipe; square to square is exactly what it gives).

    Without ``source_window``, a table with as many rows as ``window``'s is taken as ``window``'s
    own (returned unchanged), any other as a square window's (as timm's ``resize_rel_pos_bias_table``
    infers it; timm then interpolates with BEiT's geometric-progression recipe, so its values differ
    from Swin's bicubic one used here).

    Note: this is what a model *built* for a smaller size gets on load; a model built at the
    training size and *run* on a smaller input reads the central sub-window of its table instead
    (see the module docstring), so the two differ.

    Raises:
        ValueError: the source window cannot be inferred (a non-square table of another size than
            ``window``'s); pass ``source_window``.
    """
    rows, heads = table.shape
    dst = (2 * window[0] - 1, 2 * window[1] - 1)
    if source_window is not None:
        src = (2 * source_window[0] - 1, 2 * source_window[1] - 1)
    elif rows == dst[0] * dst[1]:
        src = dst
    else:
        src = _table_side(rows)
    if src is None or src[0] * src[1] != rows:
        raise UsageError(f"relative_position_bias_table {tuple(table.shape)}: cannot infer its source window "
                         f"(not square, nor the target window {tuple(window)}'s {dst[0] * dst[1]} rows); "
                         "pass source_window")
    if src == dst:
        return table
    grid = table.T.reshape(1, heads, *src).float()
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return grid.reshape(heads, dst[0] * dst[1]).T.to(table.dtype)


def resize_seq_pos_embed(pos_embed: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a 1-D learned position embedding ``(1, N, C)`` (HVT's per-pooling-stage embeddings,
    ``learned_1d``) to ``(1, length, C)`` by linear interpolation over the token index
    (``align_corners=False``).

    An approximation: after HVT's 1-D pooling of a flattened raster the index has no exact 2-D
    meaning, and the HVT code has no resize of its own; interpolating keeps the embedding's
    profile along the sequence, so fine-tuning starts near the trained model.
    """
    if pos_embed.shape[1] == length:
        return pos_embed
    x = F.interpolate(pos_embed.transpose(1, 2).float(), size=length, mode="linear", align_corners=False)
    return x.transpose(1, 2).to(pos_embed.dtype)


def _target_window(key: str, rows: int, model: Optional[nn.Module]) -> Optional[tuple[int, int]]:
    """The window of the module owning table ``key`` (its ``window_size``), else the square one
    ``rows`` implies, else None."""
    if model is not None:
        try:
            owner = model.get_submodule(key.rsplit(".", 1)[0])
        except AttributeError:
            owner = None
        window = getattr(owner, "window_size", None)
        if window is not None:
            window = (window, window) if isinstance(window, int) else tuple(int(w) for w in window)
            if (2 * window[0] - 1) * (2 * window[1] - 1) == rows:
                return window
    side = _table_side(rows)
    return None if side is None else ((side[0] + 1) // 2, (side[1] + 1) // 2)


def resize_to_model(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    model: Optional[nn.Module] = None) -> dict:
    """Return ``state`` with every resizable tensor resized to the shape ``expected`` has.

    Relative-position tables are resized to the window of the module that owns them in ``model``
    (``window_size``), which is how non-square windows (e.g. Swin's last stage clamped to a 6x5
    grid at ``img_size=[192, 160]``) are resized; without ``model`` only square windows are (the
    window is read from the table's size). Tensors that cannot be resized are left as they are,
    for the caller's mismatch report to name. See the module docstring for how a table resized
    here differs from a clamped window's sub-table at run time.
    """
    out = dict(state)
    for key, value in state.items():
        kind = RESIZABLE_SUFFIXES.get(key.rsplit(".", 1)[-1])
        ref = expected.get(key)
        if kind is None or ref is None or value.shape == ref.shape:
            continue
        if kind == "grid" and value.ndim == 4 and ref.ndim == 4 and value.shape[-1] == ref.shape[-1]:
            out[key] = resize_pos_embed(value, tuple(ref.shape[1:3]))
        elif kind == "grid" and value.ndim == 3 and ref.ndim == 3 and value.shape[::2] == ref.shape[::2]:
            out[key] = resize_seq_pos_embed(value, ref.shape[1])
        elif kind == "table" and value.ndim == 2 and ref.ndim == 2 and value.shape[1] == ref.shape[1]:
            window = _target_window(key, ref.shape[0], model)
            if window is not None:
                try:
                    out[key] = resize_rel_pos_table(value, window)
                except ValueError:
                    pass  # left to the mismatch report
    return out
