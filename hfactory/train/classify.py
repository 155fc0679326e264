"""Classification, the task of ``hfactory train``: label-smoothed cross-entropy, random-shift
augmentation of in-memory images, accuracy on the test split; run by :func:`.loop.fit`.

Run directory (``--out``): the layout of :mod:`.checkpoint`; ``model/`` holds the trained model
(an encoder, or an SFT for an SFT spec), ``metrics.jsonl`` per epoch ``train_loss``,
``test_loss`` and ``test_accuracy``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models import build_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataBundle
from .distributed import DistContext, GlobalBatchSampler, agree, log_main, shard_positions
from .loop import Share, Task, fit

__all__ = ["train", "evaluate", "ClassificationTask", "pretrained_preprocessing"]


def train(spec, out: str | os.PathLike, config: Optional[TrainConfig] = None,
          resume: bool = False, init_from: Optional[str | os.PathLike] = None) -> dict:
    """Train ``spec`` on ``config.data`` and write the run into ``out`` (layout: :mod:`.checkpoint`).
    ``spec`` is an :class:`~hfactory.spec.model.EncoderSpec`, or an :class:`~hfactory.spec.sft.SFTSpec`
    (the model is :func:`hfactory.models.build_model`'s).

    Evaluates on the test split after every epoch, appends a line to ``out/metrics.jsonl``,
    and saves a checkpoint; at the end saves the model to ``out/model`` (``save_pretrained``)
    and the final metrics to ``out/metrics.json``.

    Under torchrun (``WORLD_SIZE > 1``) every process calls this; ``config.batch_size`` is the
    global batch, only rank 0 writes and prints, and every process returns the same metrics
    (see :mod:`.distributed`; ``config.fsdp`` shards the model with FSDP2).

    ``init_from`` (a pretraining run or save_pretrained directory) starts a new run from those
    encoder weights (:func:`.pretrained.load_pretrained_encoder`); a resumed run continues from
    its checkpoint instead.

    ``config.pretrained`` (fine-tuning: True for the preset's timm weights, or a source of
    :mod:`hfactory.pretrained`) starts a new run from those weights: when the data's class count
    differs from ``spec.num_classes``, the spec becomes ``spec.with_changes({"num_classes": n})``
    (the spec ``--set num_classes=n`` gives, so the run resumes with either) and a message says so;
    the weights' classifier is then not loaded (it keeps its new initialisation), everything else
    is; ImageFolder preprocessing follows the weights' pretrained config (mean, std, crop_pct,
    interpolation). Without it a class-count mismatch is refused, naming ``--set num_classes=n``.

    Returns:
        the final metrics (``test_accuracy``, ``test_loss``, ``params``, ``epochs``, ``steps``,
        ``elapsed_s``, ...); with ``stopped: True`` when ``config.stop_at_step`` ended it early.

    Raises:
        UsageError (a ValueError): bad options, ``out`` holds another run (see
            :func:`.checkpoint.check_out_dir`), the data's class count differs from
            ``spec.num_classes`` (without ``pretrained``), an unusable checkpoint, ``init_from`` or
            ``pretrained`` weights that do not fit (keys and shapes named), both given.
        FileNotFoundError: the data directory, ``init_from`` or ``pretrained`` is missing (or not
            in the download cache when it cannot be downloaded).
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    config = config or TrainConfig()
    config.validate()
    return fit(ClassificationTask(spec, config, init_from), out, config, resume)


def _preset_weights(spec) -> Optional[str]:
    """The timm weights of the preset ``spec`` is (by name), for ``--pretrained`` without a path."""
    from ..presets import list_models, timm_weights

    name = getattr(spec, "name", None) or ""
    return timm_weights(name) if name in list_models() else None


def pretrained_preprocessing(spec, pretrained) -> Optional[dict]:
    """The ImageFolder preprocessing of a run of ``spec`` started with ``--pretrained``
    (``config.pretrained``; None/False: hfactory's defaults, returned as None), for ``hfactory eval``
    to read images as the run did."""
    if pretrained in (None, False):
        return None
    return _pretrained_source(spec, pretrained)[1]


def _pretrained_source(spec, pretrained) -> tuple[str, Optional[dict]]:
    """``(weight source, ImageFolder preprocessing)`` of ``--pretrained`` for ``spec``.

    Raises:
        UsageError: ``--pretrained`` without a path for a spec that is no preset with weights.
    """
    from ..presets import presets_with_weights
    from ..pretrained import TIMM_PREFIX, timm_preprocessing

    weights = _preset_weights(spec)
    if pretrained is True:
        if weights is None:
            raise UsageError(f"--pretrained without a path loads a preset's timm weights, and "
                             f"{getattr(spec, 'name', None) or 'this spec'!r} is no preset with weights (those are: "
                             f"{', '.join(presets_with_weights())}); give --pretrained PATH (a weights file or "
                             "directory), hf-hub:ORG/NAME or timm:MODEL[.TAG]")
        source = TIMM_PREFIX + weights
    else:
        source = str(pretrained)
    if source.startswith(TIMM_PREFIX):
        return source, timm_preprocessing(source[len(TIMM_PREFIX):])
    return source, timm_preprocessing(weights) if weights is not None else None


class ClassificationTask(Task):
    """``hfactory train``'s task (see :class:`.loop.Task`). Its generator (checkpoint key
    ``aug_rng``, seed + 1) draws the ``--shift`` offsets."""

    command = "train"
    rng_key, rng_offset = "aug_rng", 1
    metric_keys = ("test_loss", "test_accuracy")

    def __init__(self, spec, config: TrainConfig, init_from: Optional[str | os.PathLike] = None):
        self.spec, self.config, self.init_from = spec, config, init_from
        self.run_fields = {}  # run.json of a training run has no "task" (it predates pretraining)
        self.source, self.messages = None, []
        if config.pretrained not in (None, False):
            if init_from is not None:
                raise UsageError("--pretrained and --init-from both give initial weights; use one")
            self.source, self.preprocess = _pretrained_source(spec, config.pretrained)
            self._follow_data_classes()

    def _follow_data_classes(self) -> None:
        """Fine-tuning: the classifier takes the data's class count (before the run directory is
        checked, so a resumed run finds the same spec)."""
        from .data import count_classes

        n = count_classes(self.config.data)
        if n != self.spec.num_classes:
            old = self.spec.num_classes
            self.spec = (self.spec.with_changes({"num_classes": n}) if hasattr(self.spec, "with_changes")
                         else type(self.spec).model_validate({**self.spec.model_dump(mode="json"), "num_classes": n}))
            self.messages.append(f"the data {self.config.data} has {n} classes: num_classes {old} -> {n}; the "
                                 f"classifier is new (randomly initialised), the rest starts from {self.source}")

    @property
    def initial_weights(self) -> bool:
        return self.source is not None or self.init_from is not None

    def check_data(self, data: DataBundle) -> None:
        if data.num_classes != self.spec.num_classes:
            fix = (f"add --set num_classes={data.num_classes}" if hasattr(self.spec, "with_changes") else
                   f"set num_classes: {data.num_classes} in the spec's YAML")
            raise UsageError(f"the data {data.name} has {data.num_classes} classes but the spec's num_classes is "
                             f"{self.spec.num_classes}; {fix} (or, fine-tuning with --pretrained, the classifier "
                             "follows the data)")

    def build(self) -> nn.Module:
        return build_model(self.spec)  # an encoder, or an SFT for an SFT spec

    def start(self, model: nn.Module, data: DataBundle, ctx: DistContext) -> None:
        for message in self.messages:
            log_main(ctx, message)
        # (not for a sharded model: its forward is a collective)
        if ctx.is_main and not self.config.fsdp and next(model.parameters()).device.type == "cpu":
            from .estimate import epoch_time_warning

            image = data.train[0][0].unsqueeze(0)
            warning = epoch_time_warning(model, image, len(data.train), len(data.test))
            if warning:
                log_main(ctx, warning)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        self.max_shift = round(self.config.shift * min(self.spec.img_hw)) if data.in_memory else 0
        # The background value the shift pads with: the training set's minimum (for digits every
        # image's own minimum, so the same as each batch's minimum in one process).
        self.fill = float(data.train.tensors[0].min()) if data.in_memory else None

    def init_weights(self, model: nn.Module, ctx: DistContext) -> None:
        if self.source is not None:  # fine-tuning from pretrained weights (a new classifier if the classes differ)
            from ..pretrained import load_weights

            loaded = agree(ctx, lambda: load_weights(model, self.source, log=False))
            log_main(ctx, f"initialised {loaded['loaded']} tensors from {loaded['source']} ({loaded['format']})"
                     + (f"; {loaded['classifier']}" if loaded["classifier"] else ""))
            return
        if self.init_from is None:
            return
        from .pretrained import load_pretrained_encoder  # fine-tuning: pretrained encoder, new classifier

        loaded = agree(ctx, lambda: load_pretrained_encoder(model, self.init_from))
        log_main(ctx, f"initialised {loaded['loaded']} tensors from {loaded['source']}")

    def loss(self, model: nn.Module, share: Share, gen: torch.Generator) -> torch.Tensor:
        images = _random_shift(share.images, self.max_shift, gen, self.fill, share.rows, share.n_global)
        return self.criterion(model(images), share.labels)

    def evaluate(self, model: nn.Module, data: DataBundle, device: torch.device, ctx: DistContext) -> dict:
        c = self.config
        return evaluate(model, data.test, c.eval_batch_size, c.amp, c.workers, device, ctx)

    def final_metrics(self, metrics: dict) -> dict:
        return {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
                "test_images": metrics["images"]}

    def save(self, out: Path, model: nn.Module, weights: Optional[dict]) -> None:
        if weights is None:
            model.save_pretrained(out / ckpt.MODEL_DIR)
        else:  # FSDP: `model` holds shards here
            ckpt.save_model_dir(out / ckpt.MODEL_DIR, self.spec, weights)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256, amp: bool = False, workers: int = 0,
             device: Optional[torch.device] = None, ctx: Optional[DistContext] = None) -> dict:
    """Accuracy and mean cross-entropy (no label smoothing) of ``model`` on ``dataset``.

    With ``ctx`` of several processes, each evaluates its share of every batch of
    ``batch_size`` (the same split as training) and the sums are all-reduced, so every process
    returns the numbers of the whole test set (a collective: call it in every process).

    Returns:
        ``{"test_loss": float (nats), "test_accuracy": float in [0, 1], "images": int}``.

    Raises:
        UsageError (a ValueError): the test set is empty.
    """
    ctx = ctx or DistContext()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # this process's share of each batch; an empty share (a last batch smaller than the world
    # size) runs one placeholder sample, uncounted, since a sharded model's forward is collective
    shares = []
    for batch in GlobalBatchSampler(range(len(dataset)), batch_size, ctx).global_batches():
        own = batch[shard_positions(len(batch), ctx)]
        shares.append((own or batch[:1], bool(own)))
    if isinstance(dataset, torch.utils.data.TensorDataset):
        x, y = dataset.tensors
        if ctx.enabled:
            batches = ((x[torch.as_tensor(idx)], y[torch.as_tensor(idx)]) for idx, _ in shares)
        else:  # plain slices (no copies) for one process
            batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_sampler=[idx for idx, _ in shares], num_workers=workers)
    loss_sum, correct, n = 0.0, 0, 0
    for (_, real), (images, labels) in zip(shares, batches):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        if not real:
            continue
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        n += len(labels)
    model.train(was_training)
    loss_sum, correct, n = ctx.all_reduce_sum([loss_sum, correct, n], device)
    if n == 0:
        raise UsageError("the test set is empty")
    return {"test_loss": loss_sum / n, "test_accuracy": correct / n, "images": int(n)}


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator, fill: Optional[float] = None,
                  rows: slice = slice(None), total: Optional[int] = None) -> torch.Tensor:
    """Translate each image of ``x`` ``(B, C, H, W)`` by its own random integer offset in
    ``[-max_shift, max_shift]`` per axis, filling with ``fill`` (default: ``x.min()``, the
    background).

    The offsets of ``total`` images (default ``B``) are drawn from ``gen`` and ``x`` gets those at
    ``rows``: a process holding its share of a global batch draws the whole batch's offsets, as
    every other process does, and uses its own, so N processes augment as one does.
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b if total is None else total), generator=gen)[:, rows]
    if b == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()) if fill is None else fill)
    rows_ = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows_, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> NCHW
