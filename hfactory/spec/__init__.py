"""Specs: what users write (pydantic v2, no torch)."""

from .base import PlanError, StrictModel
from .components import ComponentParams, StageContext
from . import hiera as _hiera  # noqa: F401  (registers Hiera components)
from . import hvt as _hvt  # noqa: F401  (registers HVT components)
from . import thesis as _thesis  # noqa: F401  (registers the thesis repo's downsamplers)
from . import swin as _swin  # noqa: F401  (registers Swin components)
from . import swinv2 as _swinv2  # noqa: F401  (registers Swin V2 components)
from . import sam2 as _sam2  # noqa: F401  (registers SAM2 HieraDet components)
from . import pvt as _pvt  # noqa: F401  (registers PVTv2 components)
from . import maxvit as _maxvit  # noqa: F401  (registers MaxViT components)
from . import mvit as _mvit  # noqa: F401  (registers MViTv2 components)
from .io import dump_spec, load_spec, load_yaml
from .model import EncoderSpec, StageDefaults, StageSpec
from . import variants  # noqa: E402  (overrides and scaling rules; needs the models above)

__all__ = ["EncoderSpec", "StageSpec", "StageDefaults", "ComponentParams", "StageContext", "StrictModel",
           "PlanError", "load_spec", "dump_spec", "load_yaml"]
