"""Weight converters: timm (every preset family) and the official ``hiera`` package.

``from_timm_state_dict(state_dict, model)`` plays the role of timm's ``checkpoint_filter_fn``:
it returns a state dict that ``model.load_state_dict(..., strict=True)`` accepts.
``from_timm(timm_model)`` builds the matching hfactory model and loads it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from . import hiera as _hiera  # noqa: F401  (each import registers a family)
from . import maxvit as _maxvit  # noqa: F401
from . import metaformer as _metaformer  # noqa: F401
from . import mvit as _mvit  # noqa: F401
from . import pvt as _pvt  # noqa: F401
from .sam2 import from_sam2_state_dict  # noqa: F401  (registers the SAM2 HieraDet family)
from . import swin as _swin  # noqa: F401
from . import swinv2 as _swinv2  # noqa: F401
from .core import FAMILIES, convert_state_dict, mismatch_report
from .hiera import from_hiera_mae_state_dict, from_package_keys

__all__ = ["from_timm_state_dict", "from_timm", "from_hiera_state_dict", "from_hiera_mae_state_dict",
           "mismatch_report", "FAMILIES"]


def from_timm_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Map a timm state dict (any preset family, any depth/width variant) onto ``model``.

    Position embeddings and relative-position tables are resized (bicubic) when ``model`` was
    built for another resolution.

    Raises:
        ValueError: the keys belong to no known family, or do not fit ``model`` (the message
            names the first missing / unexpected / shape-mismatched keys).
    """
    return convert_state_dict(state_dict, model)


def from_hiera_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Map a state dict of the official ``hiera`` package (``hiera.hiera_tiny_224()`` ...) onto
    ``model``. Raises ``ValueError`` as :func:`from_timm_state_dict`."""
    family = next(f for f in FAMILIES if f.name == "hiera")
    if "model_state" in state_dict:  # the package's checkpoint files wrap the weights
        state_dict = state_dict["model_state"]
    return convert_state_dict(from_package_keys(state_dict), model, family)


def from_timm(timm_model: nn.Module):
    """Build the hfactory twin of a timm model (same architecture, widths, depths, classes and
    image size) and load its weights. Returns a :class:`~hfactory.HierarchicalEncoder`.

    Raises:
        ValueError: the timm model's class has no hfactory family.
    """
    from ..encoder import build_encoder

    cls = type(timm_model).__name__
    family = next((f for f in FAMILIES if f.timm_class == cls and f.spec_from_timm), None)
    if family is None:
        known = ", ".join(f.timm_class for f in FAMILIES if f.timm_class)
        raise UsageError(f"no hfactory family for timm class {cls}; supported: {known}")
    model = build_encoder(family.spec_from_timm(timm_model))
    model.load_state_dict(convert_state_dict(timm_model.state_dict(), model, family), strict=True)
    return model
