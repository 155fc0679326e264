"""``hfactory.optimize(model)`` (this module: ``hfactory.cpu``): opt-in CPU speed-ups that depend on the machine.

hfactory's defaults are the plain PyTorch ops (``F.linear`` for every token-wise projection): on
the 2-core AVX2 EPYC this project is measured on they were the faster choice
(``benchmarks/RESULTS.md``, "TokenLinear"). What is faster on some CPUs and slower on others is
switched on here, per model, after measuring it on your machine (``benchmarks/tokenlinear.py``
prints the per-projection matrix; ``hfactory bench`` times a model).
The library route for CPU inference is ``torch.compile`` (Inductor; with
``torch._inductor.config.freezing = True`` for inference), which :func:`optimize` leaves to you.
"""

from __future__ import annotations

from torch import nn

__all__ = ["optimize"]


def optimize(model: nn.Module, *, onednn_linear: bool = True) -> nn.Module:
    """Switch ``model``'s opt-in CPU routes on (or off) in place and return it.

    Args:
        model: any module holding hfactory layers (an encoder, an MAE, an SFT).
        onednn_linear: run every :class:`~hfactory.layers.layout.TokenLinear` (the token-wise
            projections: qkv, proj, MLP fc1/fc2, ...) as a 1x1 oneDNN convolution on the CPU
            (see its docstring for when it takes ``F.linear`` anyway). False restores the default.

    Returns:
        ``model`` (same object; parameters and outputs are unchanged up to ~1e-7 relative).
    """
    from .layers.layout import TokenLinear

    for module in model.modules():
        if isinstance(module, TokenLinear):
            module.onednn = onednn_linear
    return model
