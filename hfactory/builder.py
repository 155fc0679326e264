"""plan -> modules. The only place that turns resolved plan entries into ``nn.Module``s."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import registry
from .layers.block import Block
from .layers.layout import grid_to_units
from .plan import Plan, StagePlan

__all__ = ["build_component", "build_stages", "Stage", "PerUnit"]


def build_component(slot: str, resolved: dict) -> nn.Module:
    """Build one component from its plan entry (``{"kind": name, **kwargs}``); an entry the plan
    marked ``per_unit`` (a grid component in the units layout) is wrapped in :class:`PerUnit`.

    Components nested in the entry (the keys its params model declares in ``nested``, e.g. a
    downsampler's ``norm``) are built here first and passed to the builder as modules (``None``
    stays ``None``), so layers never call back into the builder."""
    kwargs = dict(resolved)
    per_unit = kwargs.pop("per_unit", False)
    entry = registry.get(slot, kwargs.pop("kind"))
    for key, nested_slot in entry.params.nested.items():
        if isinstance(kwargs.get(key), dict) and "kind" in kwargs[key]:
            kwargs[key] = build_component(nested_slot, kwargs[key])
    module = entry.build(**kwargs)
    return PerUnit(module) if per_unit else module


class PerUnit(nn.Module):
    """Runs a grid component ``(B, H, W, C)`` inside each mask unit of the units layout
    ``(B, U, uh, uw, C)``: the units are folded into the batch, ``(B*U, uh, uw, C)``, and unfolded
    after. The plan only asks for it when the component reads nothing outside its unit (unshifted
    windows tiling the unit, non-overlapping strided convs and poolings, patch merging; see
    :func:`hfactory.plan.crosses_units`), so the result equals the component on the whole grid.
    The wrapped module's parameters are under ``inner.``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return self.inner(x)
        y = self.inner(x.flatten(0, 1))
        return y.unflatten(0, x.shape[:2])


class Stage(nn.Module):
    """``downsample -> pos_embed -> [grid to units [-> keep units]] -> blocks [-> out_norm]``: ``(B, H, W, C_in)``
    (or units) to ``(B, H', W', C_out)`` (or units ``(B, U, uh', uw', C_out)``).

    ``forward(x, sizes=None, keep=None) -> (x, sizes)``: the tokens and their token sizes
    (:mod:`hfactory.layers.token_sizes`): ``sizes`` ``(B, N)`` float, or None when the tokens
    carry none. The sizes going in are those of the previous stage's tokens; the sizes coming
    out are those of this stage's tokens: made by a downsampler that emits them, kept through one
    whose params model is ``identity``, else None. The blocks whose mixer takes sizes get them
    (as an argument, also under activation checkpointing, so a recomputed block sees the sizes of
    its own forward).

    ``keep`` (stage 0 of a units plan only): a bool ``(B, U)`` mask of the units to keep, the same
    number ``K`` per sample; the others are deleted right after the grid is cut into units, so the
    blocks see ``(B, K, uh, uw, C)`` and cost what ``K`` units cost (sparse MAE)."""

    def __init__(self, plan: StagePlan):
        super().__init__()
        self.downsample = build_component("downsample", plan.downsample)
        self.pos_embed = build_component("pos_embed", plan.pos_embed)
        # Stage 0 of a spec with mask units converts its grid to the units layout, once.
        self.unit_size = plan.unit_size if plan.index == 0 and plan.layout == "units" else None
        self.blocks = nn.Sequential(*[
            Block(plan.out_chs, build_component("token_mixer", b.token_mixer),
                  build_component("feedforward", b.feedforward or plan.feedforward), build_component("norm", b.norm1),
                  build_component("norm", b.norm2 or plan.norm), plan.residual_norm_style, plan.layer_scale,
                  plan.res_scale, rate, dim_in=b.dim_in, q_stride=b.q_stride, expand=b.expand)
            for b, rate in zip(plan.blocks, plan.drop_path)
        ])
        self.grad_checkpointing = False
        # the stage's own output norm after its blocks (PVTv2), or None
        self.out_norm = build_component("norm", plan.out_norm) if plan.out_norm is not None else None
        # att0's clusters, appended after the tokens for the blocks to update (plan.carry)
        self.carry = build_component("downsample", plan.carry) if plan.carry is not None else None
        # The token-sizes protocol (hfactory.layers.token_sizes), read once here from the modules'
        # takes_token_sizes / emits_token_sizes: a module's forward signature is its own business,
        # and a stage without sizes then does no per-call work for them. Sizes survive a
        # downsampler that leaves the tokens as they are, which its params model says (identity).
        self.downsample_takes_sizes = bool(getattr(self.downsample, "takes_token_sizes", False))
        self.downsample_emits_sizes = bool(getattr(self.downsample, "emits_token_sizes", False))
        self.downsample_keeps_sizes = bool(registry.get("downsample", plan.downsample["kind"]).params.identity)

    def forward(self, x, sizes: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None):
        if self.downsample_emits_sizes:
            x, sizes = self.downsample(x, sizes) if self.downsample_takes_sizes else self.downsample(x)
        else:
            x = self.downsample(x)
            if not self.downsample_keeps_sizes:
                sizes = None  # new tokens, without sizes
        x = self.pos_embed(x)
        if self.carry is not None:
            x = self.carry(x)
        if self.unit_size is not None:
            x = grid_to_units(x, self.unit_size)
            if keep is not None:
                x = x[keep].unflatten(0, (x.shape[0], -1))  # kept units, in ascending unit order
        if self.grad_checkpointing and x.requires_grad:
            for block in self.blocks:
                # the sizes are an argument, so the recomputation in backward sees these sizes
                args = (x, sizes) if sizes is not None and block.takes_token_sizes else (x,)
                x = checkpoint(block, *args, use_reentrant=False)
        elif sizes is None:
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = block(x, sizes) if block.takes_token_sizes else block(x)
        return (x if self.out_norm is None else self.out_norm(x)), sizes


def build_stages(plan: Plan) -> nn.ModuleList:
    """One :class:`Stage` per plan stage."""
    return nn.ModuleList(Stage(s) for s in plan.stages)
