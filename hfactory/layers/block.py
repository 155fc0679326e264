"""The generic block: norm / token mixer / norm / feedforward with residuals.

One block for every architecture, as timm ``metaformer.MetaFormerBlock`` (arXiv 2111.11418):
the same class is a Swin block, a ViT block and (with ``dim_in``/``q_stride``) a Hiera block;
pre-norm ``x = res_scale(x) + layer_scale(drop_path(mixer(norm1(x))))`` (same for the MLP), or
post-norm ``x = norm1(x + layer_scale(drop_path(mixer(x))))`` (original Transformer), or
res-post-norm ``x = x + layer_scale(drop_path(norm1(mixer(x))))`` (Swin V2, arXiv 2111.09883).
Tokens are channels-last, ``(B, H, W, C)`` or ``(B, N, C)``; merged tokens' sizes ``(B, N)``
reach the token mixer as an argument (:mod:`hfactory.layers.token_sizes`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import TokenLinear, pool_hw

__all__ = ["Block", "DropPath", "Scale"]


def _overlap_max_pool(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Max-pool a channels-last grid ``(B, H, W, C) -> (B, H/sh, W/sw, C)`` with an overlapping
    kernel ``s + 1`` (``1`` where ``s == 1``), stride ``s`` and padding ``kernel // 2`` per axis
    (MViTv2's ``shortcut_pool_attn``, arXiv 2112.01526); the plan keeps ``s`` even or 1, where
    this leaves exactly ``H/sh x W/sw`` tokens."""
    if tuple(stride) == (1, 1):
        return x
    kernel = tuple(s + 1 if s > 1 else 1 for s in stride)
    y = F.max_pool2d(x.permute(0, 3, 1, 2), kernel, tuple(stride), tuple(k // 2 for k in kernel))
    return y.permute(0, 2, 3, 1)


class DropPath(nn.Module):
    """Stochastic depth per sample (arXiv 1603.09382): zero the residual branch of a sample with
    probability ``p`` in training and scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Scale(nn.Module):
    """Learned per-channel scale ``x * scale`` (LayerScale, arXiv 2103.17239, and ResScale,
    arXiv 2210.13452; timm parameter name ``scale``)."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Block(nn.Module):
    """One transformer / MetaFormer block; modules come built, numbers come from the plan.

    Attribute names follow timm's MetaFormer (``norm1``, ``token_mixer``, ``layer_scale1``,
    ``res_scale1``, ``norm2``, ``mlp``, ``layer_scale2``, ``res_scale2``).

    ``takes_token_sizes`` is the mixer's (the token-sizes protocol of
    :mod:`hfactory.layers.token_sizes`): then ``forward(x, sizes)`` hands the sizes ``(B, N)`` of
    the tokens to the mixer; the block never changes them. Without sizes the block calls the mixer
    as ``token_mixer(x)``, as before.
    """

    def __init__(self, dim: int, token_mixer: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 residual_norm_style: str = "pre", layer_scale: Optional[float] = None, res_scale: bool = False,
                 drop_path: float = 0.0, dim_in: Optional[int] = None, q_stride: Optional[tuple[int, int]] = None,
                 expand: str = "proj"):
        super().__init__()
        if residual_norm_style not in ("pre", "post", "res_post"):
            raise ValueError(f"residual_norm_style {residual_norm_style!r}: valid are pre, post, res_post")
        self.pre_norm = residual_norm_style == "pre"
        self.res_post_norm = residual_norm_style == "res_post"
        # Hiera's stage-transition block (timm hiera.HieraBlock): the residual is the projection
        # of the normed input (when the width changes), max-pooled like the mixer's queries;
        # with expand="max_avg" (timm use_expand_proj=False) it is the concat of the max- and
        # avg-pooled raw input instead (dim = 2 * dim_in, no weights); with expand="proj_overlap"
        # (MViTv2, timm mvitv2.MultiScaleBlock) it is pooled as with "proj" but by an overlapping
        # max-pool (kernel s + 1, stride s, padding (s + 1) // 2; see _overlap_max_pool).
        self.q_stride = tuple(q_stride) if q_stride else None
        self.overlap = expand == "proj_overlap"
        widen = dim_in is not None and dim_in != dim
        self.max_avg = widen and expand == "max_avg"
        # TokenLinear: an nn.Linear that runs on oneDNN on the CPU (speed, see its docstring).
        self.proj = TokenLinear(dim_in, dim) if widen and not self.max_avg else None
        self.norm1, self.token_mixer = norm1, token_mixer
        # read once here, so a block without sizes does no per-call protocol work
        self.takes_token_sizes = bool(getattr(token_mixer, "takes_token_sizes", False))
        self.drop_path1 = DropPath(drop_path)
        self.layer_scale1 = Scale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.res_scale1 = Scale(dim) if res_scale else nn.Identity()
        # A feedforward that declares itself a zero branch (``zero_branch = True``, e.g. the
        # ``none`` feedforward of conv-only blocks such as MaxViT's MBConv) removes the whole
        # second sublayer: no norm2, layer/res scale or drop path whose weights nothing would train.
        self.has_ffn = not getattr(mlp, "zero_branch", False)
        self.norm2, self.mlp = (norm2, mlp) if self.has_ffn else (nn.Identity(), nn.Identity())
        self.drop_path2 = DropPath(drop_path)
        self.layer_scale2 = Scale(dim, layer_scale) if layer_scale is not None and self.has_ffn else nn.Identity()
        self.res_scale2 = Scale(dim) if res_scale and self.has_ffn else nn.Identity()

    def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Merged tokens' sizes go to the mixer (the stage passes them only to a block whose mixer
        # takes them); without sizes the mixer is called as it always was.
        mix = self.token_mixer if sizes is None else (lambda t: self.token_mixer(t, sizes))
        if self.q_stride is not None or self.proj is not None or self.max_avg:
            x_norm = self.norm1(x)
            stride = self.q_stride or (1, 1)
            if self.max_avg:
                shortcut = torch.cat([pool_hw(x, stride), pool_hw(x, stride, "avg")], dim=-1)
            else:
                base = x if self.proj is None else self.proj(x_norm)
                shortcut = _overlap_max_pool(base, stride) if self.overlap else pool_hw(base, stride)
            x = self.res_scale1(shortcut) + self.layer_scale1(self.drop_path1(mix(x_norm)))
            return self._feedforward(x, "pre")
        if self.pre_norm:
            x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(mix(self.norm1(x))))
            return self._feedforward(x, "pre")
        if self.res_post_norm:  # Swin V2: the branch output is normed before the residual sum
            x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.norm1(mix(x))))
            return self._feedforward(x, "res_post")
        x = self.norm1(self.res_scale1(x) + self.layer_scale1(self.drop_path1(mix(x))))
        return self._feedforward(x, "post")

    def _feedforward(self, x: torch.Tensor, style: str) -> torch.Tensor:
        """The second sublayer in the block's norm style (the fused transition block is pre-norm);
        absent for a zero-branch feedforward."""
        if not self.has_ffn:
            return x
        if style == "pre":
            return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))
        if style == "res_post":
            return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.norm2(self.mlp(x))))
        return self.norm2(self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(x))))
