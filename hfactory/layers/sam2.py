"""SAM2 HieraDet modules (params and plan arithmetic in :mod:`hfactory.spec.sam2`).

Sources: Ravi et al., arXiv 2408.00714; facebookresearch/sam2 ``sam2/modeling/backbones/hieradet.py``
(``MultiScaleAttention``, ``MultiScaleBlock``) and ``backbones/utils.py`` (``window_partition``,
``window_unpartition``); timm ``models/hieradet_sam2.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import grid_to_units, is_symbolic, units_to_grid
from .mixers import Attention

__all__ = ["Sam2WindowAttention"]


class Sam2WindowAttention(Attention):
    """SAM2 HieraDet's windowed multi-head attention: ``(B, H, W, C_in) -> (B, H/s, W/s, C)``
    (``s`` = ``q_stride``, 1 when none), channels-last.

    1. zero-pad the (already normed) grid at the bottom/right to ``(Hp, Wp)``, multiples of
       ``window_size`` (``(ws - H % ws) % ws``; no mask: padded tokens take part in attention),
    2. cut it into row-major windows ``(B, nW, wh, ww, C_in)`` (the units layout),
    3. attend inside each window (:class:`hfactory.layers.mixers.Attention` per unit: ``qkv`` split
       ``[q|k|v]``, heads major inside each, SDPA default scale, queries max-pooled by ``q_stride``
       inside the window),
    4. put the windows back, ``(B, Hp/s, Wp/s, C)``, and crop to ``(H // s, W // s)`` (SAM2's
       ``window_unpartition`` with the pooled window and the pooled shortcut's grid).

    The padding follows the input's grid at run time (``grid``/``padded_grid`` from the plan are
    kept for ``extra_repr``). Parameters ``qkv`` (``Linear(C_in, 3C)``) and ``proj``
    (``Linear(C, C)``), the names of timm's and SAM2's checkpoints.
    """

    per_unit = True

    def __init__(self, dim: int, num_heads: int, dim_head: int, window_size: list[int], grid: list[int],
                 padded_grid: list[int], qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, dim_in: int | None = None, q_stride: list[int] | None = None,
                 backend: str = "auto"):
        super().__init__(dim, num_heads, dim_head, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, dim_in=dim_in, q_stride=q_stride, backend=backend)
        self.window_size, self.grid, self.padded_grid = tuple(window_size), tuple(grid), tuple(padded_grid)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, window={self.window_size}, q_stride={self.q_stride}, grid={self.grid}, "
                f"padded_grid={self.padded_grid}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        wh, ww = self.window_size
        # Rounded up, not ``(wh - h % wh) % wh``: the same numbers, but on torch.export's symbolic
        # sizes ``h + ph`` is then ``wh * ((h + wh - 1) // wh)``, a multiple the tracer can see
        # (the window reshape keeps a constant window axis), and no remainder reaches ONNX.
        ph, pw = (h + wh - 1) // wh * wh - h, (w + ww - 1) // ww * ww - w
        symbolic = is_symbolic(h, w)  # no Python branch on them
        if symbolic or ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        o = super().forward(grid_to_units(x, (wh, ww)))  # (B, nW, wh/s, ww/s, C)
        sh, sw = self.q_stride or (1, 1)
        o = units_to_grid(o, ((h + ph) // sh, (w + pw) // sw))
        if symbolic:  # a negative pad: a new contiguous tensor whatever the padding (a slice's
            # contiguity would depend on it, and torch.export would guard on it)
            o = F.pad(o, (0, 0, 0, w // sw - o.shape[2], 0, h // sh - o.shape[1]))
        elif ph or pw:
            o = o[:, :h // sh, :w // sw]
        return o
