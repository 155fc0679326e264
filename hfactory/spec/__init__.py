"""Specs: what users write (pydantic v2, no torch)."""

from .base import PlanError, StrictModel
from .components import ComponentParams, StageContext
from .io import dump_spec, load_spec, load_yaml
from .model import EncoderSpec, StageDefaults, StageSpec

__all__ = ["EncoderSpec", "StageSpec", "StageDefaults", "ComponentParams", "StageContext", "StrictModel",
           "PlanError", "load_spec", "dump_spec", "load_yaml"]
