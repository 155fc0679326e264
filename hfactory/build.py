"""plan -> modules. The only place that turns resolved plan entries into ``nn.Module``s."""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from . import registry
from .layers.block import Block
from .layers.layout import grid_to_units
from .plan import Plan, StagePlan

__all__ = ["build_component", "build_stages", "Stage"]


def build_component(slot: str, resolved: dict) -> nn.Module:
    """Build one component from its plan entry (``{"kind": name, **kwargs}``)."""
    kwargs = dict(resolved)
    return registry.get(slot, kwargs.pop("kind")).build(**kwargs)


class Stage(nn.Module):
    """``downsample -> pos_embed -> [grid to units] -> blocks``: ``(B, H, W, C_in)`` (or units) to
    ``(B, H', W', C_out)`` (or units ``(B, U, uh', uw', C_out)``)."""

    def __init__(self, plan: StagePlan):
        super().__init__()
        self.downsample = build_component("downsample", plan.downsample)
        self.pos_embed = build_component("pos_embed", plan.pos_embed)
        # Stage 0 of a spec with mask units converts its grid to the units layout, once.
        self.unit_size = plan.unit_size if plan.index == 0 and plan.layout == "units" else None
        self.blocks = nn.Sequential(*[
            Block(plan.out_chs, build_component("token_mixer", b.token_mixer),
                  build_component("feedforward", plan.feedforward), build_component("norm", b.norm1),
                  build_component("norm", plan.norm), plan.residual_norm_style, plan.layer_scale,
                  plan.res_scale, rate, dim_in=b.dim_in, q_stride=b.q_stride, expand=b.expand)
            for b, rate in zip(plan.blocks, plan.drop_path)
        ])
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.pos_embed(self.downsample(x))
        if self.unit_size is not None:
            x = grid_to_units(x, self.unit_size)
        if self.grad_checkpointing and x.requires_grad:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


def build_stages(plan: Plan) -> nn.ModuleList:
    """One :class:`Stage` per plan stage."""
    return nn.ModuleList(Stage(s) for s in plan.stages)
