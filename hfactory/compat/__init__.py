"""Compatibility layers that reproduce removed or foreign APIs on top of hfactory.

- :mod:`hfactory.compat.xformers`: xformers' hierarchical factory (``BasicLayerConfig``,
  ``get_hierarchical_configuration``, ``xFormerConfig``, ``xFormer``), removed in xformers
  v0.0.29. Port code by changing only its import lines.

Submodules are not imported here, so ``import hfactory.compat`` stays free of torch.
"""

__all__: list[str] = []
