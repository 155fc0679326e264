"""Norms over channels-last tensors ``(B, ..., C)``.

Builders of the ``norm`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "GroupNorm", "Identity"]


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last (channel) dimension; ``bias=False`` gives the
    bias-free LayerNorm of CAFormer/ConvFormer (arXiv 2210.13452)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


class GroupNorm(nn.Module):
    """GroupNorm on a channels-last grid ``(B, H, W, C)``; statistics over (H, W, C/groups).

    ``num_groups=1`` is PoolFormer's ``GroupNorm1`` (arXiv 2111.11418; timm ``metaformer.py``);
    ``bias=False`` is PoolFormerV2's ``GroupNorm1NoBias`` (arXiv 2210.13452).
    Parameter names (``weight``, ``bias``) match ``torch.nn.GroupNorm``.
    """

    def __init__(self, dim: int, num_groups: int = 1, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # group_norm wants channels at dim 1; move them there and back (views, no copies kept).
        y = F.group_norm(x.movedim(-1, 1), self.num_groups, self.weight, self.bias, self.eps)
        return y.movedim(1, -1)


class Identity(nn.Identity):
    """No normalisation (accepts and ignores the resolved numbers)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
