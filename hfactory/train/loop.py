"""The training loop of ``hfactory train``: AdamW, warmup + cosine per step, label smoothing.

Reproducible: with the same seed (and thread count), a run gives the same weights, and a run
stopped and resumed from its checkpoint gives the same weights as one that never stopped:

- the model is initialised after ``torch.manual_seed(seed)``;
- the order of epoch ``e`` is a permutation drawn from a generator seeded with
  ``seed * 10_000 + e``, so it needs no saved state (a resume mid-epoch skips the batches done);
- augmentation draws from its own generator, stochastic depth from torch's global RNG; both
  states go into the checkpoint with the optimizer and scheduler states.

Exact resumption holds for in-memory data (digits) and, for ImageFolder data, at epoch
boundaries (each epoch's DataLoader is seeded from the run seed and the epoch).

Under torchrun the same loop runs in every process with ``--batch-size`` as the global batch
(:mod:`.distributed` explains how N processes reproduce one: same order, rank-strided shares
of each global batch, loss scaled to the global mean, the same augmentation draws).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import build_model, spec_hash
from ..spec.model import EncoderSpec
from . import checkpoint as ckpt
from . import TrainConfig
from . import distributed as D
from .data import DataBundle, load_data
from .distributed import DistContext, GlobalBatchSampler, agree, shard_positions

__all__ = ["NonFiniteLossError", "train", "evaluate", "param_groups", "WarmupCosine"]


class NonFiniteLossError(RuntimeError):
    """The loss (or the test loss) became NaN or infinite; the run stopped without saving."""


class WarmupCosine:
    """LR factor for ``LambdaLR``, per optimizer step: linear warmup from ``1/warmup`` to 1 over
    ``warmup`` steps, then cosine decay to 0 at ``total`` steps. A class (not a closure) so the
    scheduler's state_dict holds its numbers."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups by timm's rule: decay only parameters with ``ndim >= 2`` (weights of linear
    and conv layers) that are not in ``model.no_weight_decay()``; biases, norm and scale vectors
    and position embeddings are not decayed."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a function of (seed, epoch) only, so resuming needs no state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_000 + epoch))


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


def _batches(data: DataBundle, order: torch.Tensor, config: TrainConfig, epoch: int, ctx: DistContext):
    """Yield ``(images, labels, global_batch_size, positions, real)`` for this process's share of
    each global batch of ``order`` (already cut to the remaining part); ``positions`` is the slice
    of the global batch this process holds. A process whose share of a last batch smaller than
    the world size is empty gets the batch's first sample with ``real=False``: it must still run
    forward and backward (DDP and FSDP synchronise there) but contribute nothing."""
    sampler = GlobalBatchSampler(order.tolist(), config.batch_size, ctx)
    shares = []
    for batch in sampler.global_batches():
        rows = shard_positions(len(batch), ctx)
        real = bool(batch[rows])
        shares.append((len(batch), rows if real else slice(0, 1), batch[rows] if real else batch[:1], real))
    if data.in_memory:
        x, y = data.train.tensors
        for n, rows, idx, real in shares:
            idx = torch.as_tensor(idx, dtype=torch.long)
            yield x[idx], y[idx], n, rows, real
    else:
        loader = torch.utils.data.DataLoader(
            data.train, batch_sampler=[idx for _, _, idx, _ in shares], num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed * 10_000 + epoch), persistent_workers=False)
        for (n, rows, _, real), (images, labels) in zip(shares, loader):
            yield images, labels, n, rows, real


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
        ValueError: the test set is empty.
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
        raise ValueError("the test set is empty")
    return {"test_loss": loss_sum / n, "test_accuracy": correct / n, "images": int(n)}


def train(spec: EncoderSpec, out: str | os.PathLike, config: Optional[TrainConfig] = None,
          resume: bool = False, init_from: Optional[str | os.PathLike] = None) -> dict:
    """Train ``spec`` on ``config.data`` and write the run into ``out`` (layout: :mod:`.checkpoint`).
    ``spec`` is an :class:`EncoderSpec`, or an :class:`~hfactory.spec.sft.SFTSpec` (the model is
    :func:`hfactory.encoder.build_model`'s).

    Evaluates on the test split after every epoch, appends a line to ``out/metrics.jsonl``,
    and saves a checkpoint; at the end saves the model to ``out/model`` (``save_pretrained``)
    and the final metrics to ``out/metrics.json``.

    Under torchrun (``WORLD_SIZE > 1``) every process calls this; ``config.batch_size`` is the
    global batch, only rank 0 writes and prints, and every process returns the same metrics
    (see :mod:`.distributed`; ``config.fsdp`` shards the model with FSDP2).

    Returns:
        the final metrics (``test_accuracy``, ``test_loss``, ``params``, ``epochs``, ``steps``,
        ``elapsed_s``, ...); with ``stopped: True`` when ``config.stop_at_step`` ended it early.

    Raises:
        ValueError: bad options, ``out`` holds another run (see :func:`.checkpoint.check_out_dir`),
            the data's class count differs from ``spec.num_classes``, or an unusable checkpoint.
        FileNotFoundError: the data directory is missing.
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.

    ``init_from`` (a pretraining run or save_pretrained directory) starts a new run from those
    encoder weights (:func:`hfactory.train.pretrain.load_pretrained_encoder`); a resumed run
    continues from its checkpoint instead.
    """
    config = config or TrainConfig()
    config.validate()
    with D.session(config.device) as (ctx, device):
        return _train(spec, Path(out), config, resume, ctx, device, init_from)


def _threads(config: TrainConfig) -> int:
    """``--threads``, else the cores available to this process shared by the local processes."""
    if config.threads:
        return config.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, local))


def _train(spec: EncoderSpec, out: Path, config: TrainConfig, resume: bool, ctx: DistContext,
           device: torch.device, init_from: Optional[str | os.PathLike] = None) -> dict:
    if config.batch_size < ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch; with {ctx.world_size} processes "
                         f"it must be at least {ctx.world_size}")
    if config.fsdp and not ctx.enabled:
        raise ValueError("--fsdp needs several processes: torchrun --nproc_per_node=N -m hfactory train ...")

    def prepare():  # every check before anything is written, in every process
        resuming = ckpt.check_out_dir(out, spec, resume)
        data = load_data(config.data, spec.img_hw, spec.in_chans)
        if data.num_classes != spec.num_classes:
            raise ValueError(f"the data {data.name} has {data.num_classes} classes but the spec's num_classes is "
                             f"{spec.num_classes}; set num_classes: {data.num_classes} in the spec")
        return resuming, data

    resuming, data = agree(ctx, prepare)
    torch.set_num_threads(_threads(config))
    fill = None
    if data.in_memory:  # move once; batches are then slices on the device
        data.train.tensors = tuple(t.to(device) for t in data.train.tensors)
        data.test.tensors = tuple(t.to(device) for t in data.test.tensors)
        # the background value the shift pads with: the training set's minimum (for digits every
        # image's own minimum, so the same as each batch's minimum in one process)
        fill = float(data.train.tensors[0].min())

    def log(message: str) -> None:
        D.log_main(ctx, message)

    torch.manual_seed(config.seed)
    model = build_model(spec).to(device)  # an encoder, or an SFT for an SFT spec
    hash_ = spec_hash(spec)
    n_params = sum(p.numel() for p in model.parameters())
    found = ckpt.find_checkpoint(out) if resuming else None
    state = agree(ctx, lambda: ckpt.load_checkpoint(found, model, hash_)) if found is not None else None
    if init_from is not None and state is None:  # fine-tuning: pretrained encoder weights, new classifier
        from .pretrain import load_pretrained_encoder

        loaded = agree(ctx, lambda: load_pretrained_encoder(model, init_from))
        log(f"initialised {loaded['loaded']} tensors from {loaded['source']}")
    wrapped = D.wrap_model(model, ctx, device, config.fsdp)  # FSDP shards `model` itself
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scheduler, schedule = _schedule(optimizer, config, len(data.train))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing,
                                    reduction="sum" if ctx.enabled else "mean")
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    max_shift = round(config.shift * min(spec.img_hw))
    if ctx.rank > 0:  # own stochastic-depth / dropout masks per process (weights are already identical)
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank)

    # Progress of the run: where the loop starts, and the running sums of a partly done epoch.
    epoch, step, step_in_epoch, elapsed, partial = _restore(state, resuming, out, model, optimizer, scheduler,
                                                            schedule, config, ctx, aug_gen, "aug_rng")

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / ckpt.RUN_FILE, {"spec_hash": hash_, "spec_name": spec.name, "params": n_params,
                                              "world_size": ctx.world_size, "config": asdict(config)})
        _truncate_metrics(out / "metrics.jsonl", epoch)  # drop epochs past the checkpoint (a crash after logging)
    if ctx.enabled:
        log(f"{ctx.world_size} processes ({'FSDP2' if config.fsdp else 'DDP'}, "
            f"{torch.distributed.get_backend()}), global batch {config.batch_size}")

    def save() -> None:  # a collective: every process calls it
        _save(out, model, optimizer, scheduler, config, ctx, hash_, aug_gen, "aug_rng",
              {"epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "elapsed_s": elapsed,
               "partial": partial})

    last = None
    run_start = time.perf_counter() - elapsed
    while epoch < config.epochs:
        wrapped.train()
        order = _epoch_order(len(data.train), config.seed, epoch)[step_in_epoch * config.batch_size:]
        bar = _progress_bar(config, len(order), epoch) if ctx.is_main else None
        tick = time.perf_counter()
        for images, labels, n_global, rows, real in _batches(data, order, config, epoch, ctx):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if data.in_memory:
                images = _random_shift(images, max_shift, aug_gen, fill, rows, n_global)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss = criterion(wrapped(images), labels)
            if ctx.enabled:  # the sum of this share; scaled so DDP's average is the global mean
                loss = loss * (ctx.world_size / n_global if real else 0.0)
            tick = _optimizer_step(loss, n_global, model, optimizer, scheduler, config, ctx, device, bar, partial,
                                   tick, (epoch, step, out))
            step, step_in_epoch = step + 1, step_in_epoch + 1
            if config.stop_at_step is not None and step >= config.stop_at_step:
                _close(bar)
                elapsed = time.perf_counter() - run_start
                save()
                log(f"stopped at step {step} (--stop-at-step); continue with --resume")
                return {"stopped": True, "epoch": epoch, "step": step, "elapsed_s": elapsed}
        _close(bar)

        metrics = evaluate(model, data.test, config.eval_batch_size, config.amp, config.workers, device, ctx)
        if not math.isfinite(metrics["test_loss"]):  # e.g. weights overflowed on the last step
            message = _nonfinite_message("test loss", metrics["test_loss"], epoch, step, out)
            raise NonFiniteLossError(message) if ctx.is_main else D.QuietAbort(message, status=1)
        epoch += 1
        elapsed = time.perf_counter() - run_start
        last = {"epoch": epoch, "step": step, "train_loss": partial["loss_sum"] / max(1, partial["images"]),
                "test_loss": metrics["test_loss"], "test_accuracy": metrics["test_accuracy"],
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": partial["images"] / max(partial["train_s"], 1e-9), "elapsed_s": elapsed}
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(last) + "\n")
        log(f"epoch {epoch}/{config.epochs}  train_loss {last['train_loss']:.4f}  "
            f"test_loss {last['test_loss']:.4f}  test_acc {last['test_accuracy']:.4f}  lr {last['lr']:.2e}  "
            f"{last['images_per_s']:.0f} img/s  {elapsed:.1f}s")
        step_in_epoch, partial = 0, {"loss_sum": 0.0, "images": 0, "train_s": 0.0}
        save()

    if last is None:  # resumed a finished run: report its recorded result again
        metrics = evaluate(model, data.test, config.eval_batch_size, config.amp, config.workers, device, ctx)
    weights = D.full_state_dict(model, ctx, config.fsdp) if config.fsdp else None
    final = {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"], "params": n_params,
             "epochs": epoch, "steps": step, "elapsed_s": time.perf_counter() - run_start,
             "train_images": len(data.train), "test_images": metrics["images"], "data": data.name,
             "spec_hash": hash_, "seed": config.seed, "world_size": ctx.world_size}
    if ctx.is_main:
        if weights is None:
            model.save_pretrained(out / ckpt.MODEL_DIR)
        else:
            ckpt.save_model_dir(out / ckpt.MODEL_DIR, spec, weights)
        ckpt.write_json(out / "metrics.json", final)
    ctx.barrier()
    return final


def _restore_rng(state: dict, ctx: DistContext, seed: int) -> None:
    """Set torch's RNG to the checkpoint's state of this process (stochastic depth continues
    exactly when the world size is unchanged; otherwise processes > 0 start fresh streams)."""
    per_rank = state.get("torch_rng_ranks")
    if per_rank is not None and len(per_rank) == ctx.world_size:
        torch.set_rng_state(per_rank[ctx.rank])
    elif ctx.rank == 0:
        torch.set_rng_state(state["torch_rng"])
    else:
        torch.manual_seed(seed + 1_000_003 * ctx.rank + state["step"])
    if per_rank is not None and len(per_rank) != ctx.world_size or per_rank is None and ctx.enabled:
        D.warn_main(ctx, f"the checkpoint was written by {len(per_rank) if per_rank else 1} process(es), this run "
                    f"has {ctx.world_size}: data order and weights continue exactly, stochastic-depth masks do not")


def _apply_config(optimizer, scheduler, schedule: WarmupCosine, config: TrainConfig) -> None:
    """After loading a checkpoint, make this invocation's lr, weight decay and schedule govern the
    remaining steps (the loaded states carry the old ones). With an unchanged config this sets
    the very values that were loaded, so an exact resume stays exact."""
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, decays in zip(optimizer.param_groups, (True, False)):  # the order of param_groups()
        group["initial_lr"] = config.lr
        group["weight_decay"] = config.weight_decay if decays else 0.0
        group["lr"] = config.lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def _schedule(optimizer, config, n_train: int):
    """Per-step warmup + cosine over the whole run: ``(LambdaLR scheduler, its WarmupCosine)``."""
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    schedule = WarmupCosine(round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule


def _restore(state: Optional[dict], resuming: bool, out: Path, model: nn.Module, optimizer, scheduler,
             schedule: WarmupCosine, config, ctx: DistContext, gen: torch.Generator, rng_key: str):
    """Where a run starts: ``(epoch, step, step_in_epoch, elapsed_s, partial sums)``, from the
    checkpoint ``state`` (optimizer, schedule, RNGs and the run's own generator ``gen`` restored)
    or from the beginning. Shared by ``train`` and ``pretrain``.

    Raises:
        ValueError: ``--stop-at-step`` at or before the step the run has already reached.
    """
    epoch, step, step_in_epoch, elapsed = 0, 0, 0, 0.0
    partial = {"loss_sum": 0.0, "images": 0, "train_s": 0.0}
    if state is not None:
        # This config's schedule, copied first: load_state_dict overwrites `schedule`'s numbers with the run's.
        fresh = WarmupCosine(schedule.warmup, schedule.total)
        D.load_optimizer_state(model, optimizer, state["optimizer"], config.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        _apply_config(optimizer, scheduler, fresh, config)
        _restore_rng(state, ctx, config.seed)
        gen.set_state(state[rng_key])
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        elapsed, partial = state["elapsed_s"], state["partial"]
        D.log_main(ctx, f"resuming {out} at epoch {epoch + 1}, step {step}")
    elif resuming:
        D.log_main(ctx, f"{out} has no checkpoint yet; starting the run from the beginning")
    if config.stop_at_step is not None and config.stop_at_step <= step:
        raise ValueError(f"--stop-at-step {config.stop_at_step}: the run is already at step {step}")
    return epoch, step, step_in_epoch, elapsed, partial


def _save(out: Path, model: nn.Module, optimizer, scheduler, config, ctx: DistContext, hash_: str,
          gen: torch.Generator, rng_key: str, progress: dict) -> None:
    """Write a checkpoint (weights, optimizer, schedule, RNGs, the run's generator under
    ``rng_key``, and ``progress``); a collective: every process calls it, rank 0 writes."""
    weights = D.full_state_dict(model, ctx, config.fsdp)
    optim_state = D.full_optimizer_state(model, optimizer, ctx, config.fsdp)
    rng_states = ctx.gather_objects(torch.get_rng_state())
    if ctx.is_main:  # plain tensors and values only
        snapshot = {"spec_hash": hash_, **progress, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "torch_rng": rng_states[0], rng_key: gen.get_state()}
        if ctx.enabled:
            snapshot["torch_rng_ranks"] = rng_states
        ckpt.save_checkpoint(out, model, snapshot, weights=weights)
    ctx.barrier()


def _optimizer_step(loss: torch.Tensor, n_global: int, model: nn.Module, optimizer, scheduler, config, ctx: DistContext,
                    device: torch.device, bar, partial: dict, tick: float, where: tuple) -> float:
    """One optimizer step on ``loss`` (already scaled for DDP), shared by ``train`` and ``pretrain``.

    The logged loss is the global mean (all-reduced under DDP); a non-finite one stops before
    the step, so the weights and the last checkpoint stay good. Adds the step to the epoch's
    ``partial`` sums (loss x images, images, seconds since ``tick``), updates the progress bar,
    and returns the new ``tick``.

    Raises:
        NonFiniteLossError: (main process; other ranks exit quietly) the loss is NaN or inf;
            ``where`` = (epoch, step, out) names it in the message.
    """
    loss_value = ctx.all_reduce_sum([loss.item()], device)[0] / ctx.world_size if ctx.enabled else loss.item()
    if not math.isfinite(loss_value):
        _close(bar)
        message = _nonfinite_message("loss", loss_value, *where)
        raise NonFiniteLossError(message) if ctx.is_main else D.QuietAbort(message, status=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    optimizer.step()
    scheduler.step()
    now = time.perf_counter()
    partial["loss_sum"] += loss_value * n_global
    partial["images"] += n_global
    partial["train_s"] += now - tick
    if bar is not None:
        bar.update(n_global)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
    return now


def _progress_bar(config: TrainConfig, images: int, epoch: int):
    """A tqdm bar counting images (so its rate is images/s), or None when progress is off."""
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=images, desc=f"epoch {epoch + 1}/{config.epochs}", unit="img", leave=False,
                dynamic_ncols=True)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def _nonfinite_message(what: str, value: float, epoch: int, step: int, out: Path) -> str:
    found = ckpt.find_checkpoint(out)
    kept = (f"the last good checkpoint {found} is kept (resume with --resume after lowering --lr, or add "
            f"--clip-grad)") if found else "no checkpoint had been written yet"
    return (f"non-finite {what} ({value}) in epoch {epoch + 1} after step {step}; stopped without saving; "
            f"{kept}")


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep only the metrics lines of the first ``epochs_done`` epochs (atomically)."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                lines.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            pass
    with ckpt.atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
