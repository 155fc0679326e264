"""Feedforwards ``(..., C) -> (..., C)`` and their activations.

Builders of the ``feedforward`` registry slot (params in :mod:`hfactory.spec.components`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layout import TokenLinear

__all__ = ["Mlp", "StarReLU", "SquaredReLU", "make_activation"]


class _StarReLUFunction(torch.autograd.Function):
    """``scale * relu(x)^2 + bias`` with a hand-written backward (first order only).

    Why: autograd of the composite runs about seven elementwise passes over the activation in
    backward (mul, pow backward, threshold backward, reductions) and keeps ``relu(x)`` and its
    square; with ``t = grad * relu(x)`` the gradients are ``2 * scale * t`` for ``x`` (``relu(x)``
    is 0 exactly where the ReLU's gradient is, so no threshold pass), ``<t, relu(x)>`` for
    ``scale`` and ``sum(grad)`` for ``bias``; only ``relu(x)`` is kept.
    """

    @staticmethod
    def forward(ctx, x, scale, bias):
        r = torch.relu(x)
        ctx.save_for_backward(r, scale)
        ctx.x_dtype, ctx.bias_shape = x.dtype, bias.shape
        # Output dtype as the composite's type promotion gives it: fp32 for a bf16 x (autocast)
        # with fp32 parameters.
        return torch.addcmul(bias, scale, r * r)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        r, scale = ctx.saved_tensors
        t = grad * r  # promoted to grad's dtype (fp32 under autocast, where r is bf16)
        grad_scale = (torch.dot(t.reshape(-1), r.reshape(-1).to(t.dtype)).reshape(scale.shape).to(scale.dtype)
                      if ctx.needs_input_grad[1] else None)
        grad_bias = grad.sum().reshape(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        grad_x = t.mul_(2 * scale).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_scale, grad_bias


class StarReLU(nn.Module):
    """``scale * relu(x)^2 + bias`` with learnable scalars, any shape (at least 1-D) to the same
    shape (MetaFormer baselines, arXiv 2210.13452; timm ``StarReLU`` parameter names ``scale``
    and ``bias``). Same values as timm's up to rounding (~1e-7 relative), computed in fewer
    passes over memory: in place without autograd, with a two-pass backward otherwise (speed:
    benchmarks/RESULTS.md). A bf16 input with fp32 parameters gives fp32, as the formula does.
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad or self.bias.requires_grad):
            return _StarReLUFunction.apply(x, self.scale, self.bias)
        # relu gives a new tensor, so the in-place steps never touch the input; it is made the
        # promoted dtype first (a bf16 x with fp32 parameters gives fp32, as the formula would).
        r = torch.relu(x).to(torch.promote_types(x.dtype, self.scale.dtype))
        return r.mul_(r).mul_(self.scale).add_(self.bias)


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
        "tanh": lambda: nn.Tanh(),
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
