"""The run configurations of ``hfactory train`` and ``hfactory pretrain``: plain dataclasses.

Torch-free on purpose: the command line builds its parser (flags, defaults, help) from these, and
``hfactory summary`` / ``schema`` must not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import UsageError

__all__ = ["TrainConfig", "PretrainConfig", "RUNTIME_FIELDS", "check_ranges"]


@dataclass
class TrainConfig:
    """Training options; the defaults train ``examples/digits_hybrid.yaml`` to >= 98% on digits.

    ``lr`` is the peak learning rate (reached after ``warmup_epochs``), ``shift`` the maximal
    random translation of in-memory training images as a fraction of the image side (0: off;
    ImageFolder data uses RandomResizedCrop + flip instead). ``stop_at_step`` ends this
    invocation after that many optimizer steps in total, leaving a checkpoint to ``--resume``
    (the schedule still spans ``epochs``). ``threads=None`` uses every core available to the
    process (shared by the processes of a torchrun job on this machine), ``device=None`` CUDA
    when available, else the CPU. ``batch_size`` is the global batch: under torchrun each of N
    processes takes about ``batch_size / N`` images of every step. ``fsdp`` shards the model
    with FSDP2 instead of replicating it with DDP (torchrun only).

    Fine-tuning: ``pretrained`` starts a new run from pretrained weights (True: the preset's timm
    weights; a string: a weights file or directory, ``hf-hub:org/name`` or ``timm:model[.tag]``; see
    :mod:`hfactory.pretrained`); the classifier then follows the data's class count, and
    ImageFolder preprocessing follows the weights' pretrained config. ``layer_decay`` scales each
    layer's learning rate by ``layer_decay ** (num_layers + 1 - layer_id)`` (BEiT / MAE / Hiera
    fine-tuning, arXiv 2111.06377, 2306.00989; see :func:`hfactory.train.loop.param_groups`).
    """

    data: str = "digits"  # or an ImageFolder directory with train/ and val/
    pretrained: Optional[Union[bool, str]] = None
    layer_decay: Optional[float] = None
    epochs: int = 15
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = None
    amp: bool = False
    seed: int = 0
    shift: float = 0.1
    # Options that do not change the trajectory (may differ between a run and its resumption):
    eval_batch_size: int = 256
    workers: int = 2
    threads: Optional[int] = None
    device: Optional[str] = None
    progress: bool = True
    stop_at_step: Optional[int] = None
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP

    def validate(self) -> None:
        """Raises:
            UsageError (a ValueError): the first out-of-range option, named as its flag."""
        check_ranges(self, [
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "in (0, 1] (or unset)"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0 (or unset)"),
            ("shift", 0 <= self.shift < 1, "in [0, 1)"), ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("workers", self.workers >= 0, ">= 0"), ("threads", self.threads is None or self.threads >= 1, ">= 1"),
            ("stop_at_step", self.stop_at_step is None or self.stop_at_step >= 1, ">= 1")])


@dataclass
class PretrainConfig:
    """Pretraining options (``hfactory pretrain --help``); the defaults pretrain
    ``examples/mae_digits.yaml`` on digits in about two minutes on two CPU cores.

    ``mask_ratio=None`` uses the spec's ``mae.mask_ratio``; the other fields mean what they mean
    in :class:`TrainConfig`. ``batch_size`` is the global batch.
    """

    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    clip_grad: Optional[float] = None
    amp: bool = False
    seed: int = 0
    mask_ratio: Optional[float] = None
    # Options that do not change the trajectory:
    eval_batch_size: int = 256
    workers: int = 2
    threads: Optional[int] = None
    device: Optional[str] = None
    progress: bool = True
    stop_at_step: Optional[int] = None
    fsdp: bool = False

    def validate(self) -> None:
        """Raises:
            UsageError (a ValueError): the first out-of-range option, named as its flag."""
        check_ranges(self, [
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0 (or unset)"),
            ("mask_ratio", self.mask_ratio is None or 0 < self.mask_ratio < 1, "in (0, 1)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"), ("workers", self.workers >= 0, ">= 0"),
            ("threads", self.threads is None or self.threads >= 1, ">= 1"),
            ("stop_at_step", self.stop_at_step is None or self.stop_at_step >= 1, ">= 1")])


def check_ranges(config, checks: list[tuple[str, bool, str]]) -> None:
    """Check ``(field, ok, valid range)`` rows of ``config`` (any object with those attributes).

    Raises:
        UsageError (a ValueError): for the first row that is not ok, naming the command-line flag,
            its value and what would be valid.
    """
    for name, ok, valid in checks:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)} is out of range; it must be {valid}")


#: Config fields that a resumed run may change without changing its result.
RUNTIME_FIELDS = frozenset({"eval_batch_size", "workers", "threads", "device", "progress", "stop_at_step",
                            "fsdp"})
