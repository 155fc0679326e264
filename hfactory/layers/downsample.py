"""Downsamplers / patch embeddings that start a stage.

Builders of the ``downsample`` registry slot (params in :mod:`hfactory.spec.components`).
Input and output are channels-last grids; stage 0 receives the image as ``(B, H, W, C_in)``.
"""

from __future__ import annotations

import copy

from typing import Optional

import torch
from torch import nn

__all__ = ["ConvDownsample", "Identity", "Fused"]


def build_norm(norm: Optional[nn.Module]) -> nn.Module:
    """A nested norm as the builder passed it (built from its plan entry; ``None`` -> identity).
    A layer that needs two norms of the same entry gets the second with :func:`copy_norm`."""
    return nn.Identity() if norm is None else norm


def copy_norm(norm: Optional[nn.Module]) -> nn.Module:
    """A second, independent norm of the same kind and init as ``norm`` (fresh parameters)."""
    return nn.Identity() if norm is None else copy.deepcopy(norm)


class ConvDownsample(nn.Module):
    """Strided conv ``(B, H, W, C_in) -> (B, H/stride, W/stride, C_out)`` with optional norm
    before it (``pre_norm``, CAFormer/ConvFormer) or after it (Swin-style patch embedding).

    Sources: xformers ``PatchEmbeddingConfig`` (``kernel_size=patch_size``), timm
    ``metaformer.Downsampling`` (attribute names ``norm``, ``conv``). The plan guarantees the
    grid divides exactly.
    """

    def __init__(self, in_chs: int, out_chs: int, patch_size: int, stride: int, padding: int = 0,
                 bias: bool = True, norm: Optional[nn.Module] = None, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm = build_norm(norm)
        self.conv = nn.Conv2d(in_chs, out_chs, patch_size, stride=stride, padding=padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm(x)
        # Speed (benchmarks/RESULTS.md, presets vs timm): feed the conv a channels-last tensor so
        # that oneDNN returns a channels-last one and the permute back is a contiguous (B, H, W, C)
        # grid. The stem's input is the NCHW image (one small 3-channel copy here); without it the
        # stem's output stays NCHW in memory and, with no norm to repack it (PoolFormer, Hiera),
        # every later op of the stage runs on strided tensors and each Linear copies its input first.
        # PoolFormer-S12, 1 thread, CPU time: inference 1.25-1.28x, train step 1.13-1.17x
        # faster; the other presets unchanged within noise. Same convolution, same values.
        x = self.conv(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        if not self.pre_norm:
            x = self.norm(x)
        return x


class Identity(nn.Identity):
    """No downsampling; the plan has checked that the width does not change."""

    def __init__(self, in_chs: int | None = None, out_chs: int | None = None):
        super().__init__()


class Fused(nn.Identity):
    """Placeholder of a downsampler fused into the stage's first block (Hiera's q-pooling: the
    block pools its queries and residual by ``q_stride``); it has no weights of its own."""

    def __init__(self, q_stride: list[int], lag_mixer: bool = True, expand: str = "proj"):
        super().__init__()
        self.q_stride = tuple(q_stride)
