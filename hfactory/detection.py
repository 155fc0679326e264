"""An hfactory encoder as the backbone of torchvision's detection models.

torchvision's ``FasterRCNN``, ``RetinaNet``, ``MaskRCNN`` and ``FCOS`` take a backbone module
that maps images to an ``OrderedDict`` of NCHW feature maps, all with ``backbone.out_channels``
channels (torchvision 0.29 ``models/detection/faster_rcnn.py``; its own ResNet route is
``backbone_utils.BackboneWithFPN``, which needs the stages as direct children of the model and
so cannot wrap an encoder). :class:`BackboneWithFPN` takes the encoder's stage maps from
``forward_intermediates`` and runs them through torchvision's ``FeaturePyramidNetwork`` (Lin et
al., "Feature Pyramid Networks for Object Detection", arXiv 1612.03144) with ``LastLevelMaxPool``:
the maps are keyed ``"0"``, ``"1"``, ... and ``"pool"``, the names the detectors' defaults
(``MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"])``, five anchor sizes) expect for four
stages.

Needs torchvision (``pip install 'hfactory[train]'``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import UsageError

__all__ = ["BackboneWithFPN"]


class BackboneWithFPN(nn.Module):
    """Encoder stage maps -> torchvision ``FeaturePyramidNetwork`` -> ``OrderedDict`` of maps.

    ``forward(images (B, C, H, W))`` returns ``{"0": (B, out_channels, H/r0, W/r0), ...,
    "pool": (B, out_channels, H/(2 r_last), W/(2 r_last))}``, one entry per chosen stage in
    stage order (highest resolution first; ``r_i`` the stage's reduction from
    ``encoder.feature_info``) plus ``LastLevelMaxPool``'s extra level. The image size must be one
    the encoder's plan accepts (torchvision's ``GeneralizedRCNNTransform`` pads batches to a
    multiple of 32 pixels, which suits every stride-32 preset with a flexible size).

    Args:
        encoder: an hfactory encoder (``HierarchicalEncoder`` or ``SFTEncoder``); kept as
            ``self.body`` with its classifier (unused: only ``forward_intermediates`` runs).
        out_channels: channels of every pyramid level (torchvision's default 256).
        out_indices: the stages to use (negative counts from the end); default every stage.
        extra_blocks: torchvision's extra pyramid block (an ``ExtraFPNBlock``); default
            ``LastLevelMaxPool()``, which adds the ``"pool"`` level.

    Raises:
        UsageError: an ``out_indices`` entry outside the encoder's stages, or a repeated one.
        ImportError: torchvision is not installed.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256, out_indices: Optional[Sequence[int]] = None,
                 extra_blocks: Optional[nn.Module] = None):
        super().__init__()
        try:
            from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("BackboneWithFPN needs torchvision (pip install 'hfactory[train]')") from err
        info = encoder.feature_info
        n = len(info)
        indices = list(range(n)) if out_indices is None else [i + n if i < 0 else i for i in out_indices]
        if any(not 0 <= i < n for i in indices) or len(set(indices)) != len(indices) or not indices:
            raise UsageError(f"out_indices {list(out_indices)}: give distinct stage indices in -{n}..{n - 1} "
                             f"(the encoder has {n} stages)")
        self.body, self.out_indices = encoder, sorted(indices)
        self.fpn = FeaturePyramidNetwork([info[i]["num_chs"] for i in self.out_indices], out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels  # read by torchvision's detectors

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.body.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return self.fpn(OrderedDict((str(k), m) for k, m in enumerate(maps)))
