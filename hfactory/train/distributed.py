"""Many processes for ``hfactory train`` and ``pretrain``: torchrun, DDP or FSDP2, one global batch.

Launch::

    torchrun --nproc_per_node=N -m hfactory train SPEC [--fsdp] ...

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`session` initialises the default process group from them (``gloo`` on CPU, ``nccl`` on
CUDA, each process on ``cuda:LOCAL_RANK``) unless one exists, and destroys it at the end.

What makes N processes train like one (``tests/test_distributed.py`` checks it):

- ``--batch-size`` is the *global* batch. Every process walks the same global sample order
  (seeded, as in one process) and takes the positions ``rank, rank + N, ...`` of each global
  batch (:class:`GlobalBatchSampler`: the rank-strided split of ``DistributedSampler``, but per
  global batch and without padding, so the last, shorter batch holds each sample once).
- Each process's loss is ``sum of its per-sample losses / global batch * N``; DDP (and FSDP)
  average gradients over the N processes, so the gradient is the global batch's mean, also
  when the batch does not split evenly.
- The digits ``--shift`` augmentation draws the offsets of the whole global batch from the same
  generator in every process and each applies its own rows, so augmentation is identical too.
- Stochastic depth and dropout draw from torch's RNG, which process ``r > 0`` re-seeds with
  ``(seed, r)`` after the (identical) initialisation; these masks are not those of a one-process
  run (equally random, not identical). Compare runs with ``drop_path_rate: 0`` and
  ``drop_rate: 0``.
- Evaluation splits every test batch the same way and all-reduces loss sums, correct counts
  and image counts.
- Only rank 0 prints, shows the progress bar and writes ``metrics.jsonl``, checkpoints and the
  model; every process checks the run directory and data first, and if any fails all exit
  (rank 0 prints the message).

FSDP2 (``--fsdp``): :mod:`.fsdp` (sharding, shard-by-shard initialisation, sharded checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import QuietAbort, UsageError, is_user_error

__all__ = ["DistContext", "session", "GlobalBatchSampler", "shard_positions", "agree", "is_user_error", "QuietAbort"]


@dataclass
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over processes (float64); identity for one process."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


@contextlib.contextmanager
def session(device_arg: Optional[str]) -> Iterator[tuple[DistContext, torch.device]]:
    """The process group of a torchrun job (or none) and this process's device.

    Without ``WORLD_SIZE > 1`` in the environment this is one process on ``device_arg``
    (default: CUDA if available, else CPU). Under torchrun it initialises the default group
    from the environment (``gloo`` for CPU, ``nccl`` for CUDA with ``cuda:LOCAL_RANK``) unless
    one is already initialised, and destroys the group it created on exit.

    Raises:
        UsageError (a ValueError): bad torchrun environment, or ``--device cuda`` without CUDA.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    want_cuda = device_arg.startswith("cuda") if device_arg else torch.cuda.is_available()
    if want_cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg}: CUDA is not available; use --device cpu")
    if world <= 1:
        yield DistContext(), torch.device(device_arg or ("cuda" if want_cuda else "cpu"))
        return
    if not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device(device_arg or "cpu")
    created = False
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": device} if want_cuda else {}))
        created = True
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    try:
        yield ctx, device
    finally:
        if created:
            dist.destroy_process_group()


def shard_positions(n: int, ctx: DistContext) -> slice:
    """The positions of a global batch of ``n`` samples that process ``ctx.rank`` takes:
    ``rank, rank + world_size, ...`` (DistributedSampler's split). Returns a slice."""
    return slice(ctx.rank, n, ctx.world_size)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yield this process's share of each global batch of ``order`` (a batch sampler).

    ``order`` is the global sample order of the epoch (the same in every process);
    consecutive runs of ``batch_size`` of it are the global batches, and each process takes
    :func:`shard_positions` of every one. All processes yield the same number of batches (a
    process may get an empty share of a last batch smaller than the world size).
    """

    def __init__(self, order: Sequence[int], batch_size: int, ctx: DistContext):
        self.order = list(order)
        self.batch_size = batch_size
        self.ctx = ctx

    def global_batches(self) -> Iterator[list[int]]:
        for i in range(0, len(self.order), self.batch_size):
            yield self.order[i:i + self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[shard_positions(len(batch), self.ctx)]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def agree(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in every process; if it raised in any, raise in all.

    The process that failed (rank 0 first) re-raises its own exception; the others raise
    :class:`QuietAbort`, so a refused run directory or a bad data directory is reported once
    and no process waits forever for the others. When rank 0 passed but another process failed,
    rank 0 raises a :class:`UsageError` naming that process and its message if the error was a
    user error (:func:`is_user_error`), else a ``RuntimeError`` (a bug, reported as one).
    Returns ``fn()``'s value.
    """
    error: Optional[BaseException] = None
    try:
        value = fn()
    except Exception as err:  # any failure: a process that raised alone would leave the others waiting
        error, value = err, None
    if not ctx.enabled:
        if error is not None:
            raise error
        return value
    report = None if error is None else (f"{type(error).__name__}: {error}", is_user_error(error))
    failed = ctx.gather_objects(report)
    first = next((r for r, msg in enumerate(failed) if msg is not None), None)
    if first is None:
        return value
    if ctx.rank == first:
        raise error
    message, user = failed[first]
    if ctx.is_main:  # rank 0 passed but another process failed: say which and why
        raise (UsageError if user else RuntimeError)(f"process {first} of {ctx.world_size} failed: {message}")
    raise QuietAbort(f"process {first} failed", status=2 if user else 1)


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around ``model`` (already on ``device``); ``model`` itself for one process. (FSDP runs
    build their model sharded instead: :mod:`.fsdp`.)"""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Depthwise conv weights (C, 1, k, k) get gradients whose stride on the size-1 dimension
    # differs from the bucket's; strides of size-1 dimensions are meaningless, so the warning
    # ("may impair performance") does not apply.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no second copy)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def full_state_dict(model: nn.Module, ctx: DistContext, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU; a collective under FSDP (call it in every
    process), where only rank 0 gets it (the others get ``{}``)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a one-process-format optimizer state (``optimizer.state_dict()``: parameter indices as
    keys), also into a sharded (FSDP) model's optimizer."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {i: name for name, i in _fqn_index(model, optimizer).items()}
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model: nn.Module, path) -> None:
    """Load the full state dict of the safetensors file ``path`` (a checkpoint of a run without
    ``--fsdp``) into a sharded model: each process reads the file and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, load_file(str(path)), options=StateDictOptions(full_state_dict=True))


def _fqn_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name -> its index in ``optimizer.state_dict()`` (param groups in order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {name: i for i, name in enumerate(order)}


def log_main(ctx: DistContext, message: str) -> None:
    """Print on rank 0 only."""
    if ctx.is_main:
        print(message, flush=True)


def warn_main(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)
