"""hfactory: a declarative factory for hierarchical vision transformers.

spec (pydantic, no torch) -> plan (pure shape arithmetic) -> registry -> modules.
Importing ``hfactory`` does not import torch; the torch-side names load on first use.
"""

# spec first: its components module registers the built-ins into the registry.
from .spec import EncoderSpec, StageDefaults, StageSpec, dump_spec, load_spec  # isort: skip
from . import registry
from .plan import Plan, PlanError, StagePlan, resolve
from .presets import create_model, list_models, load_preset

__version__ = "0.1.0"

_LAZY = {
    "HierarchicalEncoder": ".encoder",
    "build_encoder": ".encoder",
    "from_pretrained": ".encoder",
    "MaskedAutoencoder": ".mae",
    "build": ".models",
    "load": ".models",
    "attention": ".layers.attention",
    "attention_backend": ".layers.attention",
    "optimize": ".cpu",
}

__all__ = ["EncoderSpec", "StageSpec", "StageDefaults", "Plan", "StagePlan", "PlanError", "resolve",
           "load_spec", "dump_spec", "registry", "create_model", "list_models", "load_preset", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hfactory' has no attribute {name!r}")
