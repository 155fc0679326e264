"""``hfactory pretrain``: sparse masked-autoencoder pretraining, with ``hfactory train``'s machinery.

The same data (:mod:`.data`: embedded digits or an ImageFolder; labels unused), run directory,
checkpoints and exact resume (:mod:`.checkpoint`), progress bar, warmup + cosine AdamW schedule,
weight-decay groups, non-finite-loss stop, bf16 autocast and torchrun DDP / FSDP2
(:mod:`.distributed`) as :mod:`.loop`, around :class:`hfactory.mae.MaskedAutoencoder`.

Reproducible like ``hfactory train``: masks are drawn for the whole global batch from a generator
seeded by the run seed (its state is checkpointed) and each process takes its rows, so a resumed
run, and N processes, see the masks one uninterrupted process sees. Each process's loss is its
share of the global batch's mean (every sample hides the same number of units), so DDP's averaged
gradient is the global batch's.

Run directory (``--out``, default ``runs/<spec name>_mae``): as ``hfactory train``'s, plus
``encoder/`` at the end, the pretrained encoder alone (a ``save_pretrained`` directory of the spec
with ``num_classes: 0``); ``model/`` holds the whole autoencoder. ``metrics.jsonl`` has per epoch
the train loss and ``test_loss``, the reconstruction loss on the test split with fixed masks.
Fine-tune with ``hfactory train SPEC --init-from RUN_DIR`` (:func:`load_pretrained_encoder`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

__all__ = ["PretrainConfig", "add_pretrain_command", "cmd_pretrain", "pretrain", "evaluate_mae",
           "load_pretrained_encoder", "ENCODER_DIR"]

ENCODER_DIR = "encoder"
TASK = "mae_pretrain"


@dataclass
class PretrainConfig:
    """Pretraining options (``hfactory pretrain --help``); the defaults pretrain
    ``examples/mae_digits.yaml`` on digits in about two minutes on two CPU cores.

    ``mask_ratio=None`` uses the spec's ``mae.mask_ratio``; the other fields mean what they mean
    in :class:`hfactory.train.TrainConfig`. ``batch_size`` is the global batch.
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
        """Raises ValueError naming the first out-of-range option."""
        from . import check_ranges

        check_ranges(self, [
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0 (or unset)"),
            ("mask_ratio", self.mask_ratio is None or 0 < self.mask_ratio < 1, "in (0, 1)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"), ("workers", self.workers >= 0, ">= 0"),
            ("threads", self.threads is None or self.threads >= 1, ">= 1"),
            ("stop_at_step", self.stop_at_step is None or self.stop_at_step >= 1, ">= 1")])


_OPTIONS = [
    ("--epochs", "epochs", int, "pretraining epochs"),
    ("--batch-size", "batch_size", int, "images per optimizer step, global (shared by torchrun processes)"),
    ("--lr", "lr", float, "peak learning rate of AdamW (after warmup, then cosine decay to 0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (not on biases, norms, position embeddings, "
     "mask token)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup length in epochs"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this value (default: no clipping)"),
    ("--seed", "seed", int, "seed of initialisation, data order and masks"),
    ("--mask-ratio", "mask_ratio", float, "fraction of mask units hidden, in (0, 1) (default: the spec's "
     "mae.mask_ratio, else 0.6)"),
    ("--eval-batch-size", "eval_batch_size", int, "images per evaluation batch"),
    ("--workers", "workers", int, "DataLoader worker processes for ImageFolder data"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores available to the process)"),
    ("--device", "device", str, "torch device (default: cuda if available, else cpu)"),
    ("--stop-at-step", "stop_at_step", int, "stop after this many optimizer steps in total, leaving a "
     "checkpoint to --resume"),
]


def add_pretrain_command(subparsers) -> None:
    """Add ``pretrain`` to the ``hfactory`` argparse subparsers."""
    from ..cli import add_spec_argument
    from .cli import add_run_options

    defaults = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain", help="sparse masked-autoencoder (MAE) pretraining of an MAE-compatible spec",
        description="Pretrain the encoder of SPEC (YAML path or preset name) as a sparse masked autoencoder "
        "(Hiera's MAE: masked mask units are deleted, not zeroed). The decoder, default mask ratio and loss come "
        "from the spec's mae: section (default: 8 blocks of width 512, 16 heads, mask ratio 0.6, normalised "
        "pixel targets). The spec must be MAE-compatible (hfactory.resolve(spec).mae_compatible): an "
        "incompatible one is refused, naming the first component that mixes tokens across mask units. "
        "Data, checkpoints, --resume, progress, --amp and torchrun (DDP, or FSDP2 with --fsdp) work as in "
        "hfactory train. Fine-tune with: hfactory train SPEC --init-from RUN_DIR.")
    add_spec_argument(p)
    p.add_argument("--data", help=f"'digits' or an ImageFolder directory with train/ and val/ (labels are "
                   f"ignored; default: {defaults.data})")
    p.add_argument("--out", help="run directory (default: runs/<spec name>_mae)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_run_options(p, _OPTIONS, defaults)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain; exit 0 when done (or stopped by --stop-at-step), 1 on a non-finite loss, 130 on Ctrl-C."""
    from ..cli import _load, spec_argument_stem, spec_argument_text
    from .cli import _missing_extra, config_from_args

    spec = _load(args.spec)
    out = Path(args.out) if args.out else Path("runs") / f"{spec.name or spec_argument_stem(args)}_mae"
    config = config_from_args(args, out, PretrainConfig)
    problem = _missing_extra(config.data, config.progress)
    if problem:
        raise ValueError(problem)
    from .loop import NonFiniteLossError

    try:
        result = pretrain(spec, out, config, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"hfactory pretrain: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"\nhfactory pretrain: interrupted; continue with: hfactory pretrain {spec_argument_text(args)} "
                  f"--out {shlex.quote(str(out))} --resume", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":
        return 0
    if not result.get("stopped"):
        print(f"test reconstruction loss {result['test_loss']:.4f} after {result['epochs']} epochs in "
              f"{result['elapsed_s']:.1f}s; encoder saved to {out / ENCODER_DIR}")
    print(json.dumps(result))
    return 0


def _mask_rows(gen, n_global: int, units: int, ratio: float, rows: slice):
    """Keep-masks of a whole global batch from ``gen`` (as one process draws them), this share's rows."""
    from ..mae import random_mask

    return random_mask(n_global, units, ratio, generator=gen)[rows]


def evaluate_mae(model, dataset, batch_size: int, mask_ratio: float, seed: int, amp: bool = False,
                 workers: int = 0, device=None, ctx=None) -> dict:
    """Mean reconstruction loss of ``model`` (a :class:`~hfactory.mae.MaskedAutoencoder`) on ``dataset``
    with fixed masks (drawn from a generator seeded by ``seed`` for each call), per image.

    With ``ctx`` of several processes each evaluates its share of every batch and the sums are
    all-reduced (a collective). Returns ``{"test_loss": float, "images": int}``.
    """
    import torch

    from .distributed import DistContext, GlobalBatchSampler, shard_positions

    ctx = ctx or DistContext()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    units = model.num_mask_units()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for batch in GlobalBatchSampler(range(len(dataset)), batch_size, ctx).global_batches():
            rows = shard_positions(len(batch), ctx)
            mask = _mask_rows(gen, len(batch), units, mask_ratio, rows)
            own = batch[rows]
            if not own:  # a sharded model's forward is collective: run a placeholder, uncounted
                own, mask, real = batch[:1], _mask_rows(torch.Generator().manual_seed(0), 1, units, mask_ratio,
                                                        slice(None)), False
            else:
                real = True
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
        raise ValueError("the test set is empty")
    return {"test_loss": loss_sum / n, "images": int(n)}


def pretrain(spec, out, config: Optional[PretrainConfig] = None, resume: bool = False) -> dict:
    """Pretrain ``spec``'s encoder as a sparse masked autoencoder and write the run into ``out``.

    Returns:
        the final metrics (``test_loss``, ``params``, ``epochs``, ``steps``, ``elapsed_s``, ...);
        with ``stopped: True`` when ``config.stop_at_step`` ended it early.

    Raises:
        PlanError: the spec is not MAE-compatible (names the first offending stage and component).
        ValueError: bad options (e.g. ``mask_ratio`` outside ``(0, 1)``), ``out`` holds another run,
            an unusable checkpoint.
        FileNotFoundError: the data directory is missing.
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    from . import distributed as D
    from ..mae import mae_spec_of
    from ..plan import resolve
    from ..spec.mae import check_mask_ratio, mae_geometry

    config = config or PretrainConfig()
    config.validate()
    spec = mae_spec_of(spec)
    geo = mae_geometry(resolve(spec), spec.mae)  # refuses an incompatible spec before anything is written
    ratio = spec.mae.mask_ratio if config.mask_ratio is None else config.mask_ratio
    check_mask_ratio(ratio, geo.units)
    with D.session(config.device) as (ctx, device):
        return _pretrain(spec, Path(out), config, ratio, resume, ctx, device)


def _pretrain(spec, out: Path, config: PretrainConfig, ratio: float, resume: bool, ctx, device) -> dict:
    import torch

    from . import checkpoint as ckpt
    from . import distributed as D
    from ..encoder import spec_hash
    from ..mae import MaskedAutoencoder
    from .data import load_data
    from .loop import (NonFiniteLossError, _batches, _close, _epoch_order, _nonfinite_message, _optimizer_step,
                       _progress_bar, _restore, _save, _schedule, _threads, _truncate_metrics, param_groups)

    if config.batch_size < ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch; with {ctx.world_size} processes "
                         f"it must be at least {ctx.world_size}")
    if config.fsdp and not ctx.enabled:
        raise ValueError("--fsdp needs several processes: torchrun --nproc_per_node=N -m hfactory pretrain ...")

    def prepare():
        run = ckpt.read_run(out) if out.is_dir() else None
        if run is not None and run.get("task") != TASK:
            raise ValueError(f"{out} holds a training run, not a pretraining run; choose another --out")
        resuming = ckpt.check_out_dir(out, spec, resume)
        return resuming, load_data(config.data, spec.img_hw, spec.in_chans)

    resuming, data = D.agree(ctx, prepare)
    torch.set_num_threads(_threads(config))
    if data.in_memory:
        data.train.tensors = tuple(t.to(device) for t in data.train.tensors)
        data.test.tensors = tuple(t.to(device) for t in data.test.tensors)

    torch.manual_seed(config.seed)
    model = MaskedAutoencoder(spec).to(device)
    hash_ = spec_hash(model.spec)
    units = model.num_mask_units()
    n_params = sum(p.numel() for p in model.parameters())
    found = ckpt.find_checkpoint(out) if resuming else None
    state = D.agree(ctx, lambda: ckpt.load_checkpoint(found, model, hash_)) if found is not None else None
    wrapped = D.wrap_model(model, ctx, device, config.fsdp)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler, schedule = _schedule(optimizer, config, len(data.train))
    mask_gen = torch.Generator().manual_seed(config.seed + 2)
    if ctx.rank > 0:
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank)

    epoch, step, step_in_epoch, elapsed, partial = _restore(state, resuming, out, model, optimizer, scheduler,
                                                            schedule, config, ctx, mask_gen, "mask_rng")

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / ckpt.RUN_FILE, {"task": TASK, "spec_hash": hash_, "spec_name": spec.name,
                                              "params": n_params, "world_size": ctx.world_size,
                                              "mask_ratio": ratio, "config": asdict(config)})
        _truncate_metrics(out / "metrics.jsonl", epoch)

    def save() -> None:  # a collective: every process calls it
        _save(out, model, optimizer, scheduler, config, ctx, hash_, mask_gen, "mask_rng",
              {"epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "elapsed_s": elapsed,
               "partial": partial})

    def evaluate() -> dict:
        metrics = evaluate_mae(model, data.test, config.eval_batch_size, ratio, config.seed + 7, config.amp,
                               config.workers, device, ctx)
        if not math.isfinite(metrics["test_loss"]):
            message = _nonfinite_message("test loss", metrics["test_loss"], epoch, step, out)
            raise NonFiniteLossError(message) if ctx.is_main else D.QuietAbort(message, status=1)
        return metrics

    last = None
    run_start = time.perf_counter() - elapsed
    while epoch < config.epochs:
        wrapped.train()
        order = _epoch_order(len(data.train), config.seed, epoch)[step_in_epoch * config.batch_size:]
        bar = _progress_bar(config, len(order), epoch) if ctx.is_main else None
        tick = time.perf_counter()
        for images, _, n_global, rows, real in _batches(data, order, config, epoch, ctx):
            images = images.to(device, non_blocking=True)
            mask = _mask_rows(mask_gen, n_global, units, ratio, rows if real else slice(0, 1)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss = wrapped(images, mask=mask)[0].float()
            if ctx.enabled:  # this share of the global batch's mean, scaled for DDP's averaging
                loss = loss * (len(images) / n_global * ctx.world_size if real else 0.0)
            tick = _optimizer_step(loss, n_global, model, optimizer, scheduler, config, ctx, device, bar, partial,
                                   tick, (epoch, step, out))
            step, step_in_epoch = step + 1, step_in_epoch + 1
            if config.stop_at_step is not None and step >= config.stop_at_step:
                _close(bar)
                elapsed = time.perf_counter() - run_start
                save()
                D.log_main(ctx, f"stopped at step {step} (--stop-at-step); continue with --resume")
                return {"stopped": True, "epoch": epoch, "step": step, "elapsed_s": elapsed}
        _close(bar)
        metrics = evaluate()
        epoch += 1
        elapsed = time.perf_counter() - run_start
        last = {"epoch": epoch, "step": step, "train_loss": partial["loss_sum"] / max(1, partial["images"]),
                "test_loss": metrics["test_loss"], "lr": scheduler.get_last_lr()[0],
                "images_per_s": partial["images"] / max(partial["train_s"], 1e-9), "elapsed_s": elapsed}
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(last) + "\n")
        D.log_main(ctx, f"epoch {epoch}/{config.epochs}  train_loss {last['train_loss']:.4f}  "
                   f"test_loss {last['test_loss']:.4f}  lr {last['lr']:.2e}  {last['images_per_s']:.0f} img/s  "
                   f"{elapsed:.1f}s")
        step_in_epoch, partial = 0, {"loss_sum": 0.0, "images": 0, "train_s": 0.0}
        save()

    metrics = last or evaluate()  # resumed a finished run: report its result again
    weights = D.full_state_dict(model, ctx, config.fsdp) if config.fsdp else None
    final = {"test_loss": metrics["test_loss"], "mask_ratio": ratio, "params": n_params, "epochs": epoch,
             "steps": step, "elapsed_s": time.perf_counter() - run_start, "train_images": len(data.train),
             "data": data.name, "spec_hash": hash_, "seed": config.seed, "world_size": ctx.world_size}
    if ctx.is_main:
        whole = model
        if weights is not None:  # FSDP: this process's model holds shards; save a whole copy
            with torch.device("meta"):
                whole = MaskedAutoencoder(model.spec)
            whole.load_state_dict(weights, strict=True, assign=True)
        whole.save_pretrained(out / ckpt.MODEL_DIR)
        whole.encoder.save_pretrained(out / ENCODER_DIR)
        ckpt.write_json(out / "metrics.json", final)
    ctx.barrier()
    return final


def load_pretrained_encoder(model, source) -> dict:
    """Load pretrained encoder weights from ``source`` into ``model`` (a
    :class:`~hfactory.encoder.HierarchicalEncoder`), for fine-tuning (``hfactory train --init-from``).

    ``source`` is a pretraining run directory (its ``encoder/``, else its ``model/`` or checkpoint: the
    autoencoder's ``encoder.*`` weights), a ``save_pretrained`` directory (encoder or autoencoder), or
    a ``model.safetensors`` file. Everything but the classifier (``head.*``) must fit; position
    embeddings are resized to the model's resolution. The classifier keeps its initialisation.

    Returns:
        ``{"source": path, "loaded": n tensors, "skipped": [keys not loaded]}``.

    Raises:
        FileNotFoundError: no weights at ``source``.
        ValueError: the weights do not fit the model's spec (names the keys and shapes).
    """
    from safetensors.torch import load_file

    from ..convert.core import mismatch_report
    from ..convert.resize import resize_to_model
    from ..encoder import WEIGHTS_NAME
    from .checkpoint import MODEL_DIR, find_checkpoint

    source = Path(source)
    if source.is_file():
        path = source
    else:
        candidates = [source / ENCODER_DIR / WEIGHTS_NAME, source / WEIGHTS_NAME, source / MODEL_DIR / WEIGHTS_NAME]
        checkpoint = find_checkpoint(source) if source.is_dir() else None
        if checkpoint is not None:
            candidates.append(checkpoint / WEIGHTS_NAME)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"--init-from {source}: no weights found; expected a pretraining run directory "
                                    f"(with {ENCODER_DIR}/ or a checkpoint) or a save_pretrained directory")
    state = load_file(str(path))
    if any(k.startswith("encoder.") for k in state):  # a whole autoencoder: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    target = model.state_dict()
    skipped = sorted(k for k in state if k.startswith("head."))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = resize_to_model(state, target, model)
    expected = {k: v for k, v in target.items() if not k.startswith("head.")}
    report = mismatch_report(expected, state)
    if report:
        raise ValueError(f"--init-from {path}: the weights do not fit this spec ({getattr(model.spec, 'name', '')}); "
                         f"{report}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith("head.") for k in missing):  # mismatch_report should have caught it
        raise ValueError(f"--init-from {path}: unexpected keys {unexpected[:5]}, missing non-head keys "
                         f"{[k for k in missing if not k.startswith('head.')][:5]}")
    return {"source": str(path), "loaded": len(state), "skipped": skipped}
