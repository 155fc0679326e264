"""The masked-autoencoder section of a spec: ``mae:`` (decoder, mask ratio, loss). No torch.

An MAE spec is an :class:`~hfactory.spec.model.EncoderSpec` with an ``mae`` section; the encoder
ignores the section, :class:`hfactory.mae.MaskedAutoencoder` and ``hfactory pretrain`` read it
(and use :class:`MAESpec`'s defaults when a spec has none). One file therefore describes both
the pretraining and the fine-tuning of an encoder::

    name: mae_digits
    mask_unit_size: 4
    stages: [...]
    mae: {decoder_embedding: 64, decoder_depth: 2, decoder_num_heads: 4, mask_ratio: 0.6}

Defaults are the official ``hiera`` package's ``MaskedAutoencoderHiera`` (facebookresearch/hiera
``hiera/hiera_mae.py``; Ryali et al., arXiv 2306.00989): a decoder of 8 global-attention blocks of
width 512 with 16 heads and MLP ratio 4, mask ratio 0.6, per-patch normalised pixel targets,
multi-scale fusion of the stages whose tokens are finer than the last stage's.

:func:`mae_geometry` does the MAE's shape arithmetic from the encoder's plan (prediction patch,
fusion kernels, units), and is where an encoder that sparse MAE cannot run is refused, naming
the first offending stage and component (:func:`hfactory.plan.mae_verdict`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from ..errors import UsageError
from .base import MAX_BLOCKS, MAX_SIZE, PlanError, StrictModel

__all__ = ["MAESpec", "MAEGeometry", "mae_geometry", "check_mask_ratio"]


class MAESpec(StrictModel):
    """Masked-autoencoder pretraining settings (the ``mae:`` section of a spec).

    ``decoder_*``: the decoder's width, number of global-attention blocks, heads (must divide the
    width) and MLP ratio; its norms are LayerNorm (eps 1e-6) as the reference's. ``mask_ratio``
    is the default fraction of mask units hidden (``forward(x, mask_ratio=...)`` overrides it);
    ``int(U * (1 - mask_ratio))`` of the ``U`` units are kept. ``norm_pix_loss`` normalises each
    target patch by its own mean and variance (MAE, arXiv 2111.06377). ``multi_scale_fusion``
    adds the stages finer than the last one, each through a strided conv, to the encoder's output
    (Hiera's ``multi_scale_fusion_heads``); false uses the last stage only.
    """

    # Bounded like every size in a spec (hostile input is refused before anything is computed).
    decoder_embedding: int = Field(512, ge=1, le=MAX_SIZE, description="decoder width (hiera: decoder_embed_dim)")
    decoder_depth: int = Field(8, ge=1, le=MAX_BLOCKS, description="decoder blocks (global attention)")
    decoder_num_heads: int = Field(16, ge=1, le=MAX_SIZE,
                                   description="decoder attention heads; must divide decoder_embedding")
    decoder_mlp_ratio: float = Field(4.0, gt=0, description="decoder MLP hidden width / decoder_embedding")
    mask_ratio: float = Field(0.6, gt=0, lt=1, description="fraction of mask units hidden (default of forward)")
    norm_pix_loss: bool = Field(True, description="targets are pixels normalised per patch (mean 0, var 1)")
    multi_scale_fusion: bool = Field(True, description="fuse the finer stages into the encoder output "
                                     "(hiera: multi_scale_fusion_heads)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.decoder_embedding % self.decoder_num_heads:
            divisors = [d for d in range(1, self.decoder_embedding + 1) if self.decoder_embedding % d == 0]
            raise PydanticCustomError(
                "decoder_num_heads", "decoder_num_heads {heads} does not divide decoder_embedding {dim}; valid: "
                "{valid}", {"heads": self.decoder_num_heads, "dim": self.decoder_embedding,
                            "valid": ", ".join(map(str, divisors))})
        if int(self.decoder_embedding * self.decoder_mlp_ratio) < 1:
            raise PydanticCustomError("decoder_mlp_ratio", "decoder_mlp_ratio x decoder_embedding rounds to 0 "
                                      "hidden units; use a larger ratio")
        return self


def check_mask_ratio(mask_ratio: float, num_units: int) -> int:
    """The number of units kept at ``mask_ratio``: ``int(num_units * (1 - mask_ratio))`` (the
    reference's ``get_random_mask``).

    The MAE needs at least one kept unit (the encoder's input) and one masked unit (the loss is
    taken over masked units only; with none it is the mean of nothing, NaN), hence at least two
    mask units per image.

    Raises:
        ValueError: ``mask_ratio`` not a number in ``(0, 1)``; a ratio that keeps no unit or masks
            none (the message gives the ratios that work); fewer than 2 mask units.
    """
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real) or not 0 < mask_ratio < 1:
        raise UsageError(f"mask_ratio must be a number in (0, 1) (0 would mask nothing), got {mask_ratio!r}")
    if num_units < 2:
        raise UsageError(f"masked-autoencoder training needs at least 2 mask units per image (one kept, one "
                         f"masked); this image size gives {num_units}: use larger images or a smaller "
                         "mask_unit_size")
    keep = int(num_units * (1 - float(mask_ratio)))
    if not 1 <= keep < num_units:
        what = "keeps none" if keep < 1 else "masks none (the loss is over masked units only)"
        # the largest ratio that keeps one unit is 1 - 1/U; shown rounded down so it still works
        top = math.floor((1 - 1 / num_units) * 1e4) / 1e4
        raise UsageError(f"mask_ratio {float(mask_ratio)} {what} of the {num_units} mask units; use a ratio in "
                         f"(0, {top:.4f}]")
    return keep


@dataclass(frozen=True)
class MAEGeometry:
    """The MAE's numbers for an encoder plan at one image size.

    ``units`` / ``unit_grid``: mask units per image (``(nh, nw)`` row-major); ``final_grid`` and
    ``final_unit``: the last stage's token grid and tokens per unit; ``pred_stride``: pixels per
    side of the patch each final token predicts (the last stage's reduction); ``fusion``: for each
    fused stage ``(stage index, in channels, kernel = stride (kh, kw))``; ``dim``: encoder width.
    """

    units: int
    unit_grid: tuple[int, int]
    final_grid: tuple[int, int]
    final_unit: tuple[int, int]
    pred_stride: int
    fusion: tuple[tuple[int, int, tuple[int, int]], ...]
    dim: int


def mae_geometry(plan, mae: Optional[MAESpec] = None) -> MAEGeometry:
    """Shape arithmetic of a masked autoencoder on ``plan`` (a :class:`hfactory.plan.Plan`).

    Fusion (``mae.multi_scale_fusion``): every stage before the last whose mask units hold more
    tokens than the last stage's is mapped to the last stage's width by a conv with kernel =
    stride = its unit / the last unit, applied inside each unit (Hiera fuses
    ``intermediates[:q_pool]``: exactly the stages before the final resolution).

    Raises:
        PlanError: the plan is not MAE-compatible (``loc`` is the offending component, e.g.
            ``stages.0.token_mixer``), or its last stage does not reduce both axes equally.
    """
    verdict = plan.mae_incompatibility
    if verdict is not None:
        loc, _, reason = verdict.partition(": ")
        raise PlanError(loc, f"sparse MAE cannot drop mask units of this encoder: {reason}")
    mae = mae or MAESpec()
    last = plan.stages[-1]
    (h, w), (gh, gw) = plan.img_size, last.out_grid
    if h // gh != w // gw or h % gh or w % gw:
        raise PlanError(f"stages.{last.index}", f"the last stage reduces {h}x{w} pixels to {gh}x{gw} tokens, not "
                        "equally per axis; MAE predicts square pixel patches per token")
    final_unit = tuple(last.unit_size)
    fusion = []
    if mae.multi_scale_fusion:
        for s in plan.stages[:-1]:
            if tuple(s.unit_size) != final_unit:
                kernel = (s.unit_size[0] // final_unit[0], s.unit_size[1] // final_unit[1])
                fusion.append((s.index, s.out_chs, kernel))
    g0, u0 = plan.stages[0].out_grid, plan.mask_unit_size
    unit_grid = (g0[0] // u0[0], g0[1] // u0[1])
    return MAEGeometry(units=unit_grid[0] * unit_grid[1], unit_grid=unit_grid, final_grid=(gh, gw),
                       final_unit=final_unit, pred_stride=h // gh, fusion=tuple(fusion), dim=last.out_chs)
