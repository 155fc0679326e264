"""Sparse masked-autoencoder pretraining, the task of ``hfactory pretrain``; run by :func:`.loop.fit`.

Everything but the task is ``hfactory train``'s engine (:mod:`.loop`): data (labels unused), run
directory, checkpoints and exact resume, progress bar, warmup + cosine AdamW schedule,
weight-decay groups, non-finite-loss stop, bf16 autocast and torchrun DDP / FSDP2, around
:class:`hfactory.mae.MaskedAutoencoder`.

Reproducible like ``hfactory train``: masks are drawn for the whole global batch from the task's
generator (seed + 2, checkpoint key ``mask_rng``) and each process takes its rows, so a resumed
run, and N processes, see the masks one uninterrupted process sees. Every sample hides the same
number of units, so the mean over a share, weighted by its size, is the global batch's mean.

Run directory (``--out``, default ``runs/<spec name>_mae``): as ``hfactory train``'s, plus
``encoder/`` at the end, the pretrained encoder alone (a ``save_pretrained`` directory of the spec
with ``num_classes: 0``); ``model/`` holds the whole autoencoder; ``run.json`` records
``task: mae_pretrain`` and the mask ratio. ``metrics.jsonl`` has per epoch the train loss and
``test_loss``, the reconstruction loss on the test split with fixed masks. Fine-tune with
``hfactory train SPEC --init-from RUN_DIR`` (:func:`.pretrained.load_pretrained_encoder`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import UsageError
from ..mae import MaskedAutoencoder, mae_spec_of, random_mask
from ..plan import resolve
from ..spec.mae import check_mask_ratio, mae_geometry
from . import checkpoint as ckpt
from .config import PretrainConfig
from .data import DataBundle
from .distributed import DistContext, GlobalBatchSampler, shard_positions
from .loop import Share, Task, fit
from .pretrained import ENCODER_DIR, load_pretrained_encoder

__all__ = ["PretrainConfig", "pretrain", "evaluate_mae", "MAEPretrainTask", "load_pretrained_encoder",
           "ENCODER_DIR", "TASK"]

#: ``run.json``'s ``task`` of a pretraining run (a training run has none).
TASK = "mae_pretrain"


def pretrain(spec, out: str | os.PathLike, config: Optional[PretrainConfig] = None, resume: bool = False) -> dict:
    """Pretrain ``spec``'s encoder as a sparse masked autoencoder and write the run into ``out``.

    Returns:
        the final metrics (``test_loss``, ``params``, ``epochs``, ``steps``, ``elapsed_s``, ...);
        with ``stopped: True`` when ``config.stop_at_step`` ended it early.

    Raises:
        PlanError: the spec is not MAE-compatible (names the first offending stage and component).
        UsageError (a ValueError): bad options (e.g. ``mask_ratio`` outside ``(0, 1)``), ``out``
            holds another run or a training run, an unusable checkpoint.
        FileNotFoundError: the data directory is missing.
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    config = config or PretrainConfig()
    config.validate()
    spec = mae_spec_of(spec)
    geo = mae_geometry(resolve(spec), spec.mae)  # refuses an incompatible spec before anything is written
    ratio = spec.mae.mask_ratio if config.mask_ratio is None else config.mask_ratio
    check_mask_ratio(ratio, geo.units)
    return fit(MAEPretrainTask(spec, config, ratio), out, config, resume)


class MAEPretrainTask(Task):
    """``hfactory pretrain``'s task (see :class:`.loop.Task`); ``spec`` already has its ``mae``
    section (:func:`hfactory.mae.mae_spec_of`)."""

    command = "pretrain"
    rng_key, rng_offset = "mask_rng", 2
    betas = (0.9, 0.95)  # the MAE reference's
    metric_keys = ("test_loss",)

    def __init__(self, spec, config: PretrainConfig, ratio: float):
        self.spec, self.config, self.ratio = spec, config, ratio
        self.run_fields = {"task": TASK, "mask_ratio": ratio}

    def check_out(self, out: Path) -> None:
        run = ckpt.read_run(out) if out.is_dir() else None
        if run is not None and run.get("task") != TASK:
            raise UsageError(f"{out} holds a training run, not a pretraining run; choose another --out")

    def build(self) -> nn.Module:
        return MaskedAutoencoder(self.spec)

    def start(self, model: nn.Module, data: DataBundle, ctx: DistContext) -> None:
        self.units = model.num_mask_units()

    def loss(self, model: nn.Module, share: Share, gen: torch.Generator) -> torch.Tensor:
        mask = _mask_rows(gen, share.n_global, self.units, self.ratio, share.rows).to(share.images.device)
        return model(share.images, mask=mask)[0].float()

    def evaluate(self, model: nn.Module, data: DataBundle, device: torch.device, ctx: DistContext) -> dict:
        c = self.config
        return evaluate_mae(model, data.test, c.eval_batch_size, self.ratio, c.seed + 7, c.amp, c.workers, device, ctx)

    def final_metrics(self, metrics: dict) -> dict:
        return {"test_loss": metrics["test_loss"], "mask_ratio": self.ratio}

    def save(self, out: Path, model: nn.Module, weights: Optional[dict]) -> None:
        whole = model
        if weights is not None:  # FSDP: this process's model holds shards; save a whole copy
            with torch.device("meta"):
                whole = MaskedAutoencoder(model.spec)
            whole.load_state_dict(weights, strict=True, assign=True)
        whole.save_pretrained(out / ckpt.MODEL_DIR)
        whole.encoder.save_pretrained(out / ENCODER_DIR)


def _mask_rows(gen: torch.Generator, n_global: int, units: int, ratio: float, rows: slice) -> torch.Tensor:
    """Keep-masks of a whole global batch from ``gen`` (as one process draws them), this share's rows."""
    return random_mask(n_global, units, ratio, generator=gen)[rows]


@torch.no_grad()
def evaluate_mae(model: nn.Module, dataset, batch_size: int, mask_ratio: float, seed: int, amp: bool = False,
                 workers: int = 0, device: Optional[torch.device] = None, ctx: Optional[DistContext] = None) -> dict:
    """Mean reconstruction loss of ``model`` (a :class:`~hfactory.mae.MaskedAutoencoder`) on ``dataset``
    with fixed masks (drawn from a generator seeded by ``seed`` for each call), per image.

    With ``ctx`` of several processes each evaluates its share of every batch and the sums are
    all-reduced (a collective). Returns ``{"test_loss": float, "images": int}``.

    Raises:
        UsageError (a ValueError): the test set is empty.
    """
    ctx = ctx or DistContext()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    units = model.num_mask_units()
    loss_sum, n = 0.0, 0
    for batch in GlobalBatchSampler(range(len(dataset)), batch_size, ctx).global_batches():
        rows = shard_positions(len(batch), ctx)
        mask = _mask_rows(gen, len(batch), units, mask_ratio, rows)
        own = batch[rows]
        real = bool(own)
        if not real:  # a sharded model's forward is collective: run a placeholder, uncounted
            own, mask = batch[:1], _mask_rows(torch.Generator().manual_seed(0), 1, units, mask_ratio, slice(None))
        if isinstance(dataset, torch.utils.data.TensorDataset):
            images = dataset.tensors[0][torch.as_tensor(own, device=dataset.tensors[0].device)]
        else:
            images = torch.stack([dataset[i][0] for i in own])
        images = images.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(images, mask=mask.to(device))[0]
        if real:
            loss_sum += float(loss) * len(own)
            n += len(own)
    model.train(was_training)
    loss_sum, n = ctx.all_reduce_sum([loss_sum, n], device)
    if n == 0:
        raise UsageError("the test set is empty")
    return {"test_loss": loss_sum / n, "images": int(n)}
