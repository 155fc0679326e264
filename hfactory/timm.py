"""hfactory's timm integration: ``import hfactory.timm`` registers hfactory encoders as timm models.

After the import, every preset (:func:`hfactory.presets.list_models`) is the timm model
``hfactory_<preset>``::

    import timm
    import hfactory.timm  # registers; must come before timm / smp / transformers resolve the name

    model = timm.create_model("hfactory_caformer_s18", num_classes=10)
    backbone = timm.create_model("hfactory_swin_tiny_patch4_window7_224", features_only=True,
                                 out_indices=(1, 3))          # NCHW maps at strides 8 and 32
    hfactory.timm.register("my_encoder", "my_spec.yaml")      # a user's spec, the same way

``create_model`` takes timm's arguments: ``num_classes``, ``in_chans``, ``img_size``,
``drop_rate``, ``drop_path_rate``, ``global_pool`` (top-level spec fields), ``device`` /
``dtype`` (where the model is built), ``features_only`` / ``out_indices`` (timm's
``FeatureGetterNet`` over ``forward_intermediates``; all stages by default), and
``output_stride`` only at its natural value (the encoders have no dilated stages; another value
raises ``UsageError``). Anything else raises ``TypeError``. ``pretrained=True`` needs a weight
source (e.g. ``pretrained_cfg_overlay=dict(file=...)``); none is registered yet.

Each entry's pretrained config (``model.pretrained_cfg``) has the spec's ``input_size``,
``pool_size``, ``first_conv``, ``classifier`` and ``num_classes``, and the preprocessing of the
preset's timm twin (:data:`TIMM_TWINS`) or timm's ImageNet defaults.

The implementation is :mod:`hfactory.timm_models` (timm lists these models under
``module="timm_models"``). Needs timm (``pip install 'timm>=1.0'``). Sources: timm 1.0.31
``timm/models/_registry.py``, ``_builder.py``, ``_features.py``.
"""

from .timm_models import (PREFIX, TIMM_TWINS, default_cfgs, pretrained_cfg_for, register,  # noqa: F401
                          registered_models, timm_name)

__all__ = ["PREFIX", "TIMM_TWINS", "default_cfgs", "register", "pretrained_cfg_for", "timm_name",
           "registered_models"]
