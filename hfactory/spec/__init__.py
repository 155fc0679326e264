"""Specs: what users write (pydantic v2, no torch)."""

from .base import PlanError, StrictModel
from .components import ComponentParams, StageContext
from . import hiera as _hiera  # noqa: F401  (registers Hiera components)
from . import swin as _swin  # noqa: F401  (registers Swin components)
from .io import dump_spec, load_spec, load_yaml
from .model import EncoderSpec, StageDefaults, StageSpec

__all__ = ["EncoderSpec", "StageSpec", "StageDefaults", "ComponentParams", "StageContext", "StrictModel",
           "PlanError", "load_spec", "dump_spec", "load_yaml"]
