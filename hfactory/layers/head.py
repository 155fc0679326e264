"""Classifier heads: pooling, dropout and the classifier ``fc`` (a Linear or an MLP head)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .feedforward import make_activation
from .token_sizes import size_weighted_mean

__all__ = ["ClassifierHead", "MlpHead", "make_classifier"]


class MlpHead(nn.Module):
    """MetaFormer baselines' MLP head (arXiv 2210.13452; timm ``metaformer.MlpHead`` names):
    ``fc1 -> act -> norm -> head_drop -> fc2``; ``(B, C) -> (B, num_classes)``."""

    def __init__(self, dim: int, num_classes: int, hidden_features: int, activation: str, norm: nn.Module,
                 bias: bool = True, drop_rate: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias)
        self.act = make_activation(activation)
        self.norm = norm
        self.head_drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden_features, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_drop(self.norm(self.act(self.fc1(x)))))


def make_classifier(num_features: int, num_classes: int, head: dict, drop_rate: float = 0.0,
                    norm: Optional[nn.Module] = None) -> nn.Module:
    """The classifier for the plan's ``head`` entry; ``nn.Identity`` when ``num_classes == 0``.
    An ``mlp`` head takes its ``norm`` built (from ``head["norm"]``, by the caller's builder)."""
    if num_classes <= 0:
        return nn.Identity()
    if head["kind"] == "mlp":
        if norm is None:
            raise TypeError("make_classifier: an mlp head needs its norm module (build head['norm'] first)")
        return MlpHead(num_features, num_classes, head["hidden_features"], head["activation"], norm, head["bias"],
                       drop_rate)
    return nn.Linear(num_features, num_classes, bias=head["bias"])


class ClassifierHead(nn.Module):
    """Pool ``(B, C, H, W)`` over H and W (``avg`` or ``max``), dropout, classifier ``fc``. When the
    plan's ``head`` has ``token_sizes`` (tokens merged by geme / att0), ``takes_token_sizes`` is
    True and ``avg`` weights each token by its size: ``pool(x, sizes)`` with sizes ``(B, H*W)``
    (:mod:`hfactory.layers.token_sizes`)."""

    def __init__(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float, head: dict,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        self.global_pool = global_pool
        self.takes_token_sizes = bool(head.get("token_sizes"))  # the token-sizes protocol
        self.drop = nn.Dropout(drop_rate)
        self.fc = make_classifier(num_features, num_classes, head, drop_rate, norm)

    @property
    def needs_token_sizes(self) -> bool:
        """Whether :meth:`pool` reads sizes: the ``avg`` pool of merged tokens (``max`` does not)."""
        return self.takes_token_sizes and self.global_pool == "avg"

    def pool(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C)`` (``global_pool=''``: the map unchanged); ``sizes`` ``(B, H*W)`` are read only by the size-weighted
        ``avg`` pool (:attr:`needs_token_sizes`), which raises a ``UsageError`` when they are
        missing or do not fit ``x``."""
        if self.needs_token_sizes:
            return size_weighted_mean(x, sizes, "the size-weighted average pool")
        if self.global_pool == "":
            return x
        return x.amax(dim=(2, 3)) if self.global_pool == "max" else x.mean(dim=(2, 3))
