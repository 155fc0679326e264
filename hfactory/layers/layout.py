"""Token layouts and the one place that converts between them (the token-layout contract).

- grid ``(B, H, W, C)``: channels-last 2-D tokens.
- units ``(B, U, uh, uw, C)``: the grid cut into ``U`` mask units of ``uh x uw`` tokens, row-major
  over units (Hiera, arXiv 2306.00989). Per-unit operations (mask-unit attention, q-pooling) act
  on the last three axes; sparse MAE keeps a subset of ``U``.
- seq ``(B, N, C)``: tokens without 2-D structure, after HVT's 1-D pooling
  (:mod:`hfactory.layers.hvt`) or greedy merging / learnable-cluster att0
  (:mod:`hfactory.layers.thesis`); grid-only components cannot follow (the plan refuses them).
  The plan records its grid as ``(N, 1)`` and the encoder returns it as an ``N x 1`` map.

Grid and units share the trailing ``(h, w, C)`` axes, so :func:`pool_hw` serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["grid_to_units", "units_to_grid", "pool_hw", "TokenLinear", "is_symbolic"]


def is_symbolic(*sizes) -> bool:
    """Whether any of ``sizes`` is a symbolic size (``torch.export`` with dynamic dimensions)."""
    return any(isinstance(n, torch.SymInt) for n in sizes)


def _whole_units(x: torch.Tensor, unit: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` sliced to ``(H // uh * uh, W // uw * uw)``: the identity on the sizes the
    plan accepts, a no-op view. Only for the symbolic sizes of ``torch.export``: it gives the
    axes sizes the tracer knows are multiples of the unit (``uh * (H // uh)``), so the reshape into
    units splits them into ``(H // uh, uh)`` with a constant unit axis. Without it the split's
    inner axis is ``H // (H // uh)``, which the tracer cannot prove is ``uh``, and the guards it
    then records on that axis pin the height and width (and even the batch)."""
    (uh, uw), (h, w) = unit, x.shape[1:3]
    return x[:, :h // uh * uh, :w // uw * uw]


def grid_to_units(x: torch.Tensor, unit: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C) -> (B, (H/uh)*(W/uw), uh, uw, C)``; units row-major (the plan checked divisibility)."""
    b, h, w, c = x.shape
    uh, uw = unit
    if is_symbolic(h, w):
        x = _whole_units(x, unit)
        h, w = x.shape[1:3]
    x = x.reshape(b, h // uh, uh, w // uw, uw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, uh, uw, c)


def units_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`grid_to_units`: ``(B, U, uh, uw, C) -> (B, H, W, C)`` for ``grid = (H, W)``."""
    b, _, uh, uw, c = x.shape
    h, w = grid
    x = x.reshape(b, h // uh, w // uw, uh, uw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def pool_hw(x: torch.Tensor, stride: tuple[int, int], mode: str = "max") -> torch.Tensor:
    """Max-pool (or, with ``mode="avg"``, average) the ``(h, w)`` axes (the 3rd and 2nd from last)
    by ``stride``, inside units in the units layout: ``(..., h, w, C) -> (..., h/sh, w/sw, C)``.
    Hiera's ``do_pool`` (max over the q-stride positions), which in the unrolled order is this
    2x2 max within a mask unit; timm's ``use_expand_proj=False`` residual also uses the mean."""
    sh, sw = stride
    if sh == sw == 1:
        return x
    *lead, h, w, c = x.shape
    # Speed (benchmarks/RESULTS.md): a non-overlapping max_pool2d / avg_pool2d on the channels-last view
    # ``(N, C, h, w)`` (a permute, no copy) gives the same values as reducing the reshaped
    # ``(..., h/sh, sh, w/sw, sw, C)`` with ``amax(dim=(-4, -2))`` / ``mean``, but runs a native
    # channels-last kernel: on hiera_tiny's q-pooling (1 CPU thread) ~20x faster forward and
    # ~10x faster forward + backward than ``amax`` over two strided axes (whose backward also
    # needs ``eq``/``sum`` passes). The output comes back channels-last, so the final permute
    # is contiguous. (On ties the max gradient goes to one input instead of being shared.)
    n = math.prod(lead)
    y = x.reshape(n, h, w, c).permute(0, 3, 1, 2)
    y = F.avg_pool2d(y, (sh, sw)) if mode == "avg" else F.max_pool2d(y, (sh, sw))
    return y.permute(0, 2, 3, 1).reshape(*lead, h // sh, w // sw, c)


class TokenLinear(nn.Linear):
    """``nn.Linear`` over the channel axis of channels-last tokens ``(..., C)`` (same parameters,
    names and values: a drop-in subclass). By default it *is* ``nn.Linear`` (``F.linear``).

    Opt-in oneDNN route (``onednn = True`` on the instance; :func:`hfactory.optimize` sets it):
    on the CPU, tokens (``ndim >= 3``) go through ``F.conv2d`` with the weight viewed as a 1x1
    kernel, all ``M`` tokens laid out as one channels-last row ``(1, C, 1, M)`` (a view, no copy;
    the output is channels-last too, so the view back is contiguous). The product is the same
    (sums in another order, ~1e-7 relative). ``dilation=2`` changes nothing for a 1x1 kernel; it
    makes PyTorch's dispatcher (``use_mkldnn`` in ``Convolution.cpp``) choose oneDNN also with one
    thread. Whether oneDNN beats the MKL GEMM behind ``F.linear`` depends on the CPU, the shapes,
    the threads and the PyTorch version: on a 2-core AVX2 EPYC (no AVX-512) float32 projections
    ran 0.5-1.0x as fast as ``F.linear`` (Swin-T's stage-4 MLP at half speed) and Swin-T / Hiera-T
    training steps 14-16% slower, hence off by default (``benchmarks/RESULTS.md``, "TokenLinear";
    ``benchmarks/tokenlinear.py`` measures your machine).

    Even when on, these take ``F.linear``: 2-D inputs (heads), other devices, dtypes other than
    float32 and bfloat16, inputs of at most 20,480 elements (the dispatcher then skips oneDNN
    for the slow reference conv), inputs of the wrong width (so the error is ``nn.Linear``'s),
    and ``torch.export`` / ``torch.compile`` tracing (Inductor compiled the conv route 30-40%
    slower than ``F.linear``).
    """

    #: Take the oneDNN route (see the class docstring); a class default, overridable per instance.
    onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.onednn and x.dim() >= 3 and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
                and not torch.compiler.is_compiling() and x.numel() > _ONEDNN_MIN
                and x.shape[-1] == self.in_features and torch.backends.mkldnn.enabled):
            y = F.conv2d(x.reshape(1, 1, -1, self.in_features).permute(0, 3, 1, 2),
                         self.weight[:, :, None, None], self.bias, dilation=2)
            return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


#: dtypes for which :class:`TokenLinear` may take the conv route (empty when PyTorch was built
#: without oneDNN). bfloat16 is kept: without AVX-512 PyTorch runs the bf16 conv on its reference
#: dilated-conv kernel, yet that measured 1.5-3x faster than ``F.linear`` in bf16 on the AVX2 EPYC
#: (both 15-60x slower than float32 there; ``benchmarks/RESULTS.md``, "TokenLinear").
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if torch.backends.mkldnn.is_available() else ()
#: Below this many input elements PyTorch's dispatcher does not send the conv to oneDNN
#: (``use_mkldnn`` in ``Convolution.cpp``) but to the slow dilated-conv fallback, 3-4x slower
#: than ``F.linear`` (e.g. one 7x7 map of width 384), so small inputs take ``F.linear``.
_ONEDNN_MIN = 20480
