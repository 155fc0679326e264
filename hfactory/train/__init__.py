"""Training and evaluation for hfactory specs: the library behind ``hfactory train`` / ``eval`` /
``pretrain``.

Needs the ``train`` extra (scikit-learn, torchvision, tqdm). Importing this package loads only the
torch-free configs (:mod:`.config`); :func:`train`, :func:`evaluate` and :func:`load_data` load
on first use (``hfactory.train.pretrain`` is the pretraining module, so its function is
``hfactory.train.pretrain.pretrain``). The package never imports the command line
(:mod:`hfactory.cli` imports it), so it can be used from any program.

Modules: :mod:`.config` (run options), :mod:`.loop` (the one training engine: epochs, optimizer,
schedule, checkpoints, exact resume, torchrun), :mod:`.classify` (the classification task of
``hfactory train``), :mod:`.pretrain` (the masked-autoencoder task of ``hfactory pretrain``),
:mod:`.pretrained` (fine-tuning from pretrained encoder weights), :mod:`.data`,
:mod:`.checkpoint` (the run directory), :mod:`.distributed` (torchrun, DDP, FSDP2).

Example::

    from hfactory import load_spec
    from hfactory.train import TrainConfig, train

    metrics = train(load_spec("examples/digits_hybrid.yaml"), "runs/digits", TrainConfig(epochs=5))
"""

from __future__ import annotations

from ..errors import NonFiniteLossError
from .config import RUNTIME_FIELDS, PretrainConfig, TrainConfig, check_ranges

__all__ = ["TrainConfig", "PretrainConfig", "RUNTIME_FIELDS", "check_ranges", "train", "evaluate", "load_data",
           "NonFiniteLossError"]

# torch-heavy names, imported on first access (PEP 562) so that the parser stays fast
_LAZY = {"train": ".classify", "evaluate": ".classify", "load_data": ".data"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hfactory.train' has no attribute {name!r}")
