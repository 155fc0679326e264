"""Feedforwards ``(..., C) -> (..., C)`` and their activations.

Builders of the ``feedforward`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import TokenLinear

__all__ = ["Mlp", "StarReLU", "SquaredReLU", "make_activation"]


class StarReLU(nn.Module):
    """``scale * relu(x)^2 + bias`` with learnable scalars (MetaFormer baselines,
    arXiv 2210.13452; timm ``StarReLU`` parameter names ``scale`` and ``bias``)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    """``relu(x)^2`` (Primer, arXiv 2109.08668)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


def make_activation(name: str) -> nn.Module:
    """The activation module for a plan name (validated by the spec's ``Activation`` literal)."""
    return {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "silu": lambda: nn.SiLU(),
        "squared_relu": SquaredReLU,
        "star_relu": StarReLU,
    }[name]()


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop`` (xformers ``MLP``; timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden_features: int, activation: str = "gelu", bias: bool = True,
                 drop: float = 0.0):
        super().__init__()
        # TokenLinear: an nn.Linear that runs on oneDNN on the CPU (speed, see its docstring).
        self.fc1 = TokenLinear(dim, hidden_features, bias=bias)
        self.act = make_activation(activation)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = TokenLinear(hidden_features, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
