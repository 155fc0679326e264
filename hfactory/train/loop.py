"""The one training engine of ``hfactory train`` and ``hfactory pretrain``.

:func:`fit` runs a :class:`Task` (what is learned: :mod:`.classify`, :mod:`.pretrain`) through
everything the two commands share: the run directory and its checks (:mod:`.checkpoint`), data
(:mod:`.data`), AdamW with per-step warmup + cosine, gradient clipping, bf16 autocast, a progress
bar, ``metrics.jsonl``, checkpoints, exact resume, the non-finite-loss stop and torchrun (DDP or
FSDP2, :mod:`.distributed`). A task supplies only its model, its loss on one batch, its
evaluation and its final save.

Reproducible: with the same seed (and thread count), a run gives the same weights, and a run
stopped and resumed from its checkpoint gives the same weights as one that never stopped:

- the model is initialised after ``torch.manual_seed(seed)``;
- the order of epoch ``e`` is a permutation drawn from a generator seeded with
  ``seed * 10_000 + e``, so it needs no saved state (a resume mid-epoch skips the batches done);
- the task's own randomness (augmentation offsets, MAE masks) draws from its generator, stochastic
  depth from torch's global RNG; both states go into the checkpoint with the optimizer and
  scheduler states.

Exact resumption holds for in-memory data (digits) and, for ImageFolder data, at epoch
boundaries (each epoch's DataLoader is seeded from the run seed and the epoch).

Under torchrun the same loop runs in every process with ``--batch-size`` as the global batch
(:mod:`.distributed` explains how N processes reproduce one: same order, rank-strided shares
of each global batch, loss scaled to the global mean, the same random draws).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from ..errors import NonFiniteLossError, UsageError
from ..io import spec_hash
from . import checkpoint as ckpt
from . import distributed as D
from . import fsdp
from .data import DataBundle, load_data
from .distributed import DistContext, GlobalBatchSampler, agree, shard_positions

__all__ = ["Task", "Share", "fit", "param_groups", "WarmupCosine"]


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


#: timm's MATCH_PREV_GROUP: a group_matcher ordinal ending in it joins the group before it.
_MATCH_PREV_GROUP = 99999


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter for layer-wise LR decay, from ``model.group_matcher(coarse=False)``
    read as timm reads it (timm 1.0.31 ``models/_manipulate.group_with_matcher``): each name takes
    the ordinal ``(group index, *captured numbers, *suffix)`` of the first regex that matches it,
    unmatched names (the classifier) take the largest; distinct ordinals sorted are layers 0, 1, ...,
    and an ordinal ending in 99999 joins the layer before it.

    For a :class:`~hfactory.encoder.HierarchicalEncoder`: the stem (stage 0's downsampler and
    position embedding) is layer 0; block ``k`` in block order (stage by stage) is layer ``k + 1``,
    a later stage's downsampler sharing the layer of that stage's first block (as in timm's Hiera,
    whose q-pooling projection is part of the stage's first block); the final norm shares the last
    block's layer; the classifier head is the last layer, ``num_blocks + 1``.

    Raises:
        UsageError: the model has no ``group_matcher``.
    """
    if not hasattr(model, "group_matcher"):
        raise UsageError(f"layer-wise learning-rate decay needs a model with group_matcher(); "
                         f"{type(model).__name__} has none")
    compiled = []
    for index, rules in enumerate(model.group_matcher(coarse=False).values()):
        if rules is None:
            continue
        for rule, suffix in (rules if isinstance(rules, (list, tuple)) else [(rules, None)]):
            compiled.append((re.compile(rule), index, tuple(suffix or ())))

    def ordinal(name: str) -> tuple:
        for rule, index, suffix in compiled:
            m = rule.match(name)
            if m:
                return (float(index), *(float(g) for g in m.groups() if g is not None), *map(float, suffix))
        return (math.inf,)

    ordinals = {name: ordinal(name) for name, _ in model.named_parameters()}
    layer, ids = -1, {}
    for key in sorted(set(ordinals.values())):
        if layer < 0 or key[-1] != _MATCH_PREV_GROUP:
            layer += 1
        ids[key] = layer
    return {name: ids[key] for name, key in ordinals.items()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 lr: Optional[float] = None) -> list[dict]:
    """AdamW groups by timm's rule: decay only parameters with ``ndim >= 2`` (weights of linear
    and conv layers) that are not in ``model.no_weight_decay()``; biases, norm and scale vectors
    and position embeddings are not decayed. Frozen parameters (``requires_grad=False``) are left out.

    Without ``layer_decay``: two groups, ``[decayed, not decayed]``.

    With ``layer_decay`` (layer-wise learning-rate decay for fine-tuning; BEiT, MAE's
    ``util/lr_decay.py``, Hiera's fine-tuning recipe: arXiv 2106.08254, 2111.06377, 2306.00989; timm
    ``optim/_param_groups.param_groups_layer_decay``): one group per (layer, decayed or not), in
    layer order, each with ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` where the layer
    ids are :func:`layer_ids` (stem 0, blocks 1..num_layers, head num_layers + 1, so the head
    keeps the full rate and the stem gets ``layer_decay ** (num_layers + 1)``; as in timm, the
    last layer keeps the full rate also when it is not a classifier, for ``num_classes=0``), ``layer_id``,
    ``decays`` and, when ``lr`` is given, ``lr = lr * lr_scale`` (the rate a scheduler built
    afterwards scales).

    Raises:
        UsageError: ``layer_decay`` not in (0, 1], or a model without ``group_matcher``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is None:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if not 0 < layer_decay <= 1:
        raise UsageError(f"layer_decay {layer_decay} must be in (0, 1]")
    ids = layer_ids(model)
    last = max(ids.values())  # the head: num_layers + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or name in skip)
        key = (ids[name], decays)
        if key not in groups:
            scale = layer_decay ** (last - ids[name])
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale,
                           "layer_id": ids[name], "decays": decays, **({"lr": lr * scale} if lr is not None else {})}
        groups[key]["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


class Share(NamedTuple):
    """This process's share of one global batch: ``images``/``labels`` (on the device), the global
    batch size ``n_global``, the ``rows`` of the global batch held here, and ``real=False`` for a
    placeholder (a share that would be empty still runs one sample, since DDP and FSDP
    synchronise in forward and backward; its loss counts zero)."""

    images: torch.Tensor
    labels: torch.Tensor
    n_global: int
    rows: slice
    real: bool


class Task:
    """What a run learns; :func:`fit` does the rest. Subclasses set the attributes and override
    :meth:`build`, :meth:`loss`, :meth:`evaluate` and :meth:`save`; the other hooks default to
    doing nothing.

    Attributes:
        spec: the spec of the run (hashed into run.json and every checkpoint).
        command: the ``hfactory`` command, for messages (``train``, ``pretrain``).
        rng_key: the checkpoint key of the task's generator (the random draws of :meth:`loss`).
        rng_offset: that generator is seeded with ``config.seed + rng_offset``.
        betas: AdamW's betas.
        run_fields: extra ``run.json`` fields (e.g. ``{"task": "mae_pretrain"}``).
        metric_keys: keys of :meth:`evaluate`'s result that go into ``metrics.jsonl`` (after
            ``train_loss``) and the epoch line; ``test_loss`` must be one (a non-finite one stops).
        initial_weights: :meth:`init_weights` loads weights into a new run's model.
        preprocess: ImageFolder preprocessing (``mean``, ``std``, ``crop_pct``, ``crop_mode``,
            ``interpolation``; :func:`.data.image_transform`), e.g. the pretrained config of the
            weights a fine-tuning run starts from; None: the defaults.
    """

    spec: Any
    command: str = "train"
    rng_key: str = "aug_rng"
    rng_offset: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    run_fields: dict = {}
    metric_keys: tuple[str, ...] = ("test_loss",)
    preprocess: Optional[dict] = None
    #: a new run loads initial weights in :meth:`init_weights` (then ``--fsdp`` builds the model
    #: whole before sharding it, since weight loaders need the whole model)
    initial_weights: bool = False

    def check_out(self, out: Path) -> None:
        """Refuse ``out`` for task-specific reasons before :func:`.checkpoint.check_out_dir` runs
        (in every process, before anything is written). Raises UsageError."""

    def check_data(self, data: DataBundle) -> None:
        """Refuse data this task cannot learn from (before anything is written). Raises UsageError."""

    def build(self) -> nn.Module:
        """The model, built right after ``torch.manual_seed(config.seed)``."""
        raise NotImplementedError

    def start(self, model: nn.Module, data: DataBundle, ctx: DistContext) -> None:
        """Prepare the per-batch work once the model (on its device) and data exist."""

    def init_weights(self, model: nn.Module, ctx: DistContext) -> None:
        """Load initial weights into a new run's model (not called when resuming a checkpoint)."""

    def loss(self, model: nn.Module, share: Share, gen: torch.Generator) -> torch.Tensor:
        """The mean loss of ``share`` (a 0-d tensor, autocast active). Random draws come from ``gen``
        and cover the whole global batch (``share.n_global``), of which this share takes
        ``share.rows``, so every process draws alike and N processes draw as one does."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: DataBundle, device: torch.device, ctx: DistContext) -> dict:
        """Test metrics (a collective under torchrun); must hold ``test_loss``."""
        raise NotImplementedError

    def final_metrics(self, metrics: dict) -> dict:
        """The task's part of ``metrics.json`` from the last :meth:`evaluate`."""
        return {k: metrics[k] for k in self.metric_keys}

    def save(self, out: Path, model: nn.Module, weights: Optional[dict]) -> None:
        """Save the trained model into ``out`` (main process only). ``weights`` is the full state
        dict under FSDP (``model`` then holds shards), else None."""
        raise NotImplementedError


def fit(task: Task, out: str | os.PathLike, config, resume: bool = False) -> dict:
    """Run ``task`` with ``config`` (a validated :class:`~.config.TrainConfig` or
    :class:`~.config.PretrainConfig`) into the run directory ``out``; see the module docstring.

    Every process of a torchrun job calls this; only rank 0 writes and prints, and every process
    returns the same metrics.

    Returns:
        the final metrics (``metrics.json``); with ``stopped: True`` (and ``epoch``, ``step``,
        ``elapsed_s`` only) when ``config.stop_at_step`` ended the invocation early.

    Raises:
        UsageError: a global batch smaller than the world size, ``--fsdp`` without torchrun,
            ``out`` holds another run (:func:`.checkpoint.check_out_dir`), data the task refuses,
            an unusable checkpoint, ``--stop-at-step`` already reached, a bad torchrun
            environment or device.
        FileNotFoundError: the data directory is missing.
        NonFiniteLossError: the loss or test loss became NaN/inf; the last good checkpoint is kept.
    """
    with D.session(config.device) as (ctx, device):
        return _fit(task, Path(out), config, resume, ctx, device)


def _fit(task: Task, out: Path, config, resume: bool, ctx: DistContext, device: torch.device) -> dict:
    if config.batch_size < ctx.world_size:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch; with {ctx.world_size} processes "
                         f"it must be at least {ctx.world_size}")
    if config.fsdp and not ctx.enabled:
        raise UsageError(f"--fsdp needs several processes: torchrun --nproc_per_node=N -m hfactory {task.command} ...")
    spec = task.spec

    def prepare():  # every check before anything is written, in every process
        task.check_out(out)
        resuming = ckpt.check_out_dir(out, spec, resume)
        data = load_data(config.data, spec.img_hw, spec.in_chans, task.preprocess)
        task.check_data(data)
        return resuming, data

    resuming, data = agree(ctx, prepare)
    torch.set_num_threads(_threads(config))
    if device.type == "cpu" and ctx.world_size == 1:  # (under torchrun the processes share the cores by design)
        from .contention import contention_warning

        warning = contention_warning(torch.get_num_threads())
        if warning:
            D.log_main(ctx, warning)
    if data.in_memory:  # move once; batches are then slices on the device
        data.train.tensors = tuple(t.to(device) for t in data.train.tensors)
        data.test.tensors = tuple(t.to(device) for t in data.test.tensors)

    torch.manual_seed(config.seed)
    found = ckpt.find_checkpoint(out) if resuming else None
    # --fsdp: built shard by shard, never whole (fsdp.build_sharded); a new run from other weights
    # (--pretrained, --init-from) has rank 0 alone build it whole for the loaders, then broadcast
    if not config.fsdp:
        model = task.build().to(device)
    elif found is None and task.initial_weights:
        model = fsdp.build_sharded_from_rank0(task.build, lambda whole: task.init_weights(whole, DistContext()),
                                              device, ctx)
    else:
        model = fsdp.build_sharded(task.build, device, init=found is None)
    task.start(model, data, ctx)
    hash_ = spec_hash(spec)
    n_params = sum(p.numel() for p in model.parameters())  # global counts, also of sharded parameters
    state = (agree(ctx, lambda: ckpt.load_checkpoint(found, model, hash_, weights=not config.fsdp))
             if found is not None else None)
    if state is None and not config.fsdp:  # (sharded: the initial weights are in already)
        task.init_weights(model, ctx)
    wrapped = model if config.fsdp else D.wrap_model(model, ctx, device)  # FSDP: `model` is sharded itself
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, getattr(config, "layer_decay", None),
                                               lr=config.lr), lr=config.lr, betas=task.betas)
    scheduler, schedule = _schedule(optimizer, config, len(data.train))
    gen = torch.Generator().manual_seed(config.seed + task.rng_offset)
    if ctx.rank > 0:  # own stochastic-depth / dropout masks per process (weights are already identical)
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank)

    # Progress of the run: where the loop starts, and the running sums of a partly done epoch.
    epoch, step, step_in_epoch, elapsed, partial = _restore(state, resuming, out, model, optimizer, scheduler,
                                                            schedule, config, ctx, gen, task.rng_key, found)

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / ckpt.RUN_FILE, {**task.run_fields, "spec_hash": hash_, "spec_name": spec.name,
                                              "params": n_params, "world_size": ctx.world_size,
                                              "config": asdict(config)})
        _truncate_metrics(out / "metrics.jsonl", epoch)  # drop epochs past the checkpoint (a crash after logging)
    if ctx.enabled:
        D.log_main(ctx, f"{ctx.world_size} processes ({'FSDP2' if config.fsdp else 'DDP'}, "
                   f"{torch.distributed.get_backend()}), global batch {config.batch_size}")

    def save() -> None:  # a collective: every process calls it
        _save(out, model, optimizer, scheduler, config, ctx, hash_, gen, task.rng_key,
              {"epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "elapsed_s": elapsed,
               "partial": partial})

    def evaluate() -> dict:
        metrics = task.evaluate(model, data, device, ctx)
        if not math.isfinite(metrics["test_loss"]):  # e.g. weights overflowed on the last step
            _stop_nonfinite(ctx, _nonfinite_message("test loss", metrics["test_loss"], epoch, step, out))
        return metrics

    last = None
    run_start = time.perf_counter() - elapsed
    while epoch < config.epochs:
        wrapped.train()
        order = _epoch_order(len(data.train), config.seed, epoch)[step_in_epoch * config.batch_size:]
        bar = _progress_bar(config, len(order), epoch) if ctx.is_main else None
        tick = time.perf_counter()
        for share in _batches(data, order, config, epoch, ctx, device):
            # Autocast covers the task's random draws too; they (randint, rand, pad, indexing) keep
            # their dtypes under it.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss = task.loss(wrapped, share, gen)
            if ctx.enabled:  # this share's part of the global batch's mean, times N for DDP's averaging
                loss = loss * (len(share.images) / share.n_global * ctx.world_size if share.real else 0.0)
            tick = _optimizer_step(loss, share.n_global, model, optimizer, scheduler, config, ctx, device, bar,
                                   partial, tick, (epoch, step, out))
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
                **{k: metrics[k] for k in task.metric_keys}, "lr": max(scheduler.get_last_lr()),
                "images_per_s": partial["images"] / max(partial["train_s"], 1e-9), "elapsed_s": elapsed}
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(last) + "\n")
        shown = "  ".join(f"{_SHORT.get(k, k)} {last[k]:.4f}" for k in task.metric_keys)
        D.log_main(ctx, f"epoch {epoch}/{config.epochs}  train_loss {last['train_loss']:.4f}  {shown}  "
                   f"lr {last['lr']:.2e}  {last['images_per_s']:.0f} img/s  {elapsed:.1f}s")
        step_in_epoch, partial = 0, {"loss_sum": 0.0, "images": 0, "train_s": 0.0}
        save()

    if last is None:  # resumed a finished run: report its result again
        metrics = evaluate()
    weights = D.full_state_dict(model, ctx, config.fsdp) if config.fsdp else None  # a collective
    final = {**task.final_metrics(metrics), "params": n_params, "epochs": epoch, "steps": step,
             "elapsed_s": time.perf_counter() - run_start, "train_images": len(data.train), "data": data.name,
             "spec_hash": hash_, "seed": config.seed, "world_size": ctx.world_size}
    if ctx.is_main:
        task.save(out, model, weights)
        ckpt.write_json(out / "metrics.json", final)
    ctx.barrier()
    return final


_SHORT = {"test_accuracy": "test_acc"}  # names in the epoch line


def _threads(config) -> int:
    """``--threads``, else the cores available to this process shared by the local processes."""
    if config.threads:
        return config.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, local))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a function of (seed, epoch) only, so resuming needs no state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_000 + epoch))


def _batches(data: DataBundle, order: torch.Tensor, config, epoch: int, ctx: DistContext,
             device: torch.device) -> Iterator[Share]:
    """This process's :class:`Share` of each global batch of ``order`` (already cut to the
    remaining part of the epoch), on ``device``."""
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
            yield Share(x[idx], y[idx], n, rows, real)
    else:
        loader = torch.utils.data.DataLoader(
            data.train, batch_sampler=[idx for _, _, idx, _ in shares], num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed * 10_000 + epoch), persistent_workers=False)
        for (n, rows, _, real), (images, labels) in zip(shares, loader):
            yield Share(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), n, rows, real)


def _schedule(optimizer, config, n_train: int):
    """Per-step warmup + cosine over the whole run: ``(LambdaLR scheduler, its WarmupCosine)``."""
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    schedule = WarmupCosine(round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule


def _apply_config(optimizer, scheduler, schedule: WarmupCosine, config, fresh: Optional[list[dict]] = None) -> None:
    """After loading a checkpoint, make this invocation's lr, weight decay, layer-wise lr scales
    (``fresh``: each group's ``lr_scale`` / ``decays`` as :func:`param_groups` made them) and
    schedule govern the remaining steps (the loaded states carry the old ones). With an unchanged
    config this sets the very values that were loaded, so an exact resume stays exact."""
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        if fresh is not None:
            group.update(fresh[i])
        scale = group.get("lr_scale", 1.0)
        decays = group.get("decays", i == 0)  # without layer decay: [decayed, not decayed] (param_groups)
        group["initial_lr"] = config.lr * scale
        group["weight_decay"] = config.weight_decay if decays else 0.0
        group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
    scheduler.lr_lambdas = [schedule] * len(groups)
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def _recorded(out: Path, key: str):
    """A field of the run's recorded config (``run.json``), or None."""
    return ((ckpt.read_run(out) or {}).get("config") or {}).get(key)


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


def _restore(state: Optional[dict], resuming: bool, out: Path, model: nn.Module, optimizer, scheduler,
             schedule: WarmupCosine, config, ctx: DistContext, gen: torch.Generator, rng_key: str,
             found: Optional[Path] = None):
    """Where a run starts: ``(epoch, step, step_in_epoch, elapsed_s, partial sums)``, from the
    checkpoint ``state`` read from ``found`` (optimizer, schedule, RNGs and the task's generator
    ``gen`` restored; the weights too where :func:`.checkpoint.load_checkpoint` could not load
    them: a sharded checkpoint, or a sharded model) or from the beginning.

    Raises:
        UsageError: ``--stop-at-step`` at or before the step the run has already reached.
    """
    epoch, step, step_in_epoch, elapsed = 0, 0, 0, 0.0
    partial = {"loss_sum": 0.0, "images": 0, "train_s": 0.0}
    if state is not None:
        # This config's schedule, copied first: load_state_dict overwrites `schedule`'s numbers with the run's.
        fresh = WarmupCosine(schedule.warmup, schedule.total)
        saved_groups = (len(state["optimizer"].get("param_groups", ())) if "optimizer" in state
                        else state["optimizer_groups"])
        groups = len(optimizer.param_groups)
        if saved_groups != groups:
            raise UsageError(f"the checkpoint's optimizer has {saved_groups} parameter groups but this configuration "
                             f"makes {groups}: --layer-decay was switched on or off since the run started; resume "
                             f"with the run's setting (layer_decay {_recorded(out, 'layer_decay')})")
        scales = [{k: g[k] for k in ("lr_scale", "decays", "layer_id") if k in g} for g in optimizer.param_groups]
        if ckpt.is_sharded(found):  # weights and optimizer from the DCP shards, any process count
            fsdp.load_sharded(found / ckpt.DCP_DIR, model, optimizer, config.fsdp)
        else:
            if config.fsdp:  # a full checkpoint (a run without --fsdp) into a sharded model
                D.load_full_weights(model, found / ckpt.WEIGHTS_NAME)
            D.load_optimizer_state(model, optimizer, state["optimizer"], config.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        _apply_config(optimizer, scheduler, fresh, config, scales)
        _restore_rng(state, ctx, config.seed)
        gen.set_state(state[rng_key])
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        elapsed, partial = state["elapsed_s"], state["partial"]
        D.log_main(ctx, f"resuming {out} at epoch {epoch + 1}, step {step}")
    elif resuming:
        D.log_main(ctx, f"{out} has no checkpoint yet; starting the run from the beginning")
    if config.stop_at_step is not None and config.stop_at_step <= step:
        raise UsageError(f"--stop-at-step {config.stop_at_step}: the run is already at step {step}")
    return epoch, step, step_in_epoch, elapsed, partial


def _save(out: Path, model: nn.Module, optimizer, scheduler, config, ctx: DistContext, hash_: str,
          gen: torch.Generator, rng_key: str, progress: dict) -> None:
    """Write a checkpoint (weights, optimizer, schedule, RNGs, the task's generator under
    ``rng_key``, and ``progress``); a collective: every process calls it, rank 0 writes (under
    FSDP every process writes its shards, :func:`.checkpoint.save_sharded_checkpoint`)."""
    rng_states = ctx.gather_objects(torch.get_rng_state())
    snapshot = {"spec_hash": hash_, **progress, "scheduler": scheduler.state_dict(), "torch_rng": rng_states[0],
                rng_key: gen.get_state()}  # plain tensors and values only
    if ctx.enabled:
        snapshot["torch_rng_ranks"] = rng_states
    if config.fsdp:  # sharded: every process writes its shards (weights and optimizer states)
        ckpt.save_sharded_checkpoint(out, model.spec, {**snapshot, "optimizer_groups": len(optimizer.param_groups)},
                                     lambda path: fsdp.save_sharded(path, model, optimizer, ctx.enabled), ctx.barrier, ctx.is_main)
        return
    if ctx.is_main:
        ckpt.save_checkpoint(out, model, {**snapshot, "optimizer": optimizer.state_dict()})
    ctx.barrier()


def _optimizer_step(loss: torch.Tensor, n_global: int, model: nn.Module, optimizer, scheduler, config,
                    ctx: DistContext, device: torch.device, bar, partial: dict, tick: float, where: tuple) -> float:
    """One optimizer step on ``loss`` (already scaled for DDP).

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
        _stop_nonfinite(ctx, _nonfinite_message("loss", loss_value, *where))
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
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{max(scheduler.get_last_lr()):.1e}", refresh=False)
    return now


def _stop_nonfinite(ctx: DistContext, message: str):
    """Every process sees the same (all-reduced) non-finite value: rank 0 reports it, the others
    exit with the same status without repeating it."""
    raise NonFiniteLossError(message) if ctx.is_main else D.QuietAbort(message, status=1)


def _progress_bar(config, images: int, epoch: int):
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
