"""Compatibility layers that reproduce removed or foreign APIs on top of hfactory.

- :mod:`hfactory.compat.xformers`: xformers' hierarchical factory (``BasicLayerConfig``,
  ``get_hierarchical_configuration``, ``xFormerConfig``, ``xFormer``), removed in xformers
  v0.0.29. Port code by changing only its import lines: the models have xformers 0.0.28's
  parameters and state-dict keys (one position embedding, on the first stage, unless
  ``position_embedding_on_every_stage=True``), and config errors name their location.

Submodules are not imported here, so ``import hfactory.compat`` stays free of torch.
"""

__all__: list[str] = []
