"""FSDP2 for ``hfactory train --fsdp`` (torchrun): sharding, shard-by-shard initialisation and
sharded checkpoints. :mod:`.distributed` has the process group, batches and DDP.

FSDP2 (``--fsdp``): ``torch.distributed.fsdp.fully_shard`` on every block, every stage, then on
the whole model (:func:`shard_model`); parameters, gradients and AdamW states are sharded over the
processes, gathered one unit (block) at a time for its forward and backward.

No process ever holds the whole model (:func:`build_sharded`). The model is constructed once,
for real, in every process, exactly as one process builds it after ``torch.manual_seed(seed)``,
under an *initialisation recorder*:

- a global parameter-registration hook notes the storage of every new parameter, and a
  ``TorchDispatchMode`` sees every aten op that touches one; it keeps, per storage, a *recipe*
  of its value: the in-place ops since the last op that overwrote the whole storage
  (``uniform_``, ``normal_``, ``fill_``, ``copy_``, ...), each random one with the RNG state it
  started from (``torch.get_rng_state()``, or its generator's), or the value itself when nothing
  overwrote it (one float when every element is equal, e.g. a layer scale);
- a storage is real only while ops use it: after each op the least recently used ones beyond a
  16 MiB cache are emptied (``untyped_storage().resize_(0)``) and, when an op needs one again,
  refilled by replaying its recipe (saving and restoring the RNG state around the replay).
  Every op runs on real values, so data-dependent initialisers (``trunc_normal_``'s rejection
  loop) and the RNG stream are exactly one process's: the RNG state after construction, the
  buffers, and every recipe's result are bit for bit those of an unsharded build.

Then the (emptied) parameters become meta tensors, :func:`shard_model` shards them, ``to_empty``
allocates this process's shards, and each parameter's recipe is replayed into a full-size
temporary whose ``torch.chunk(.., world_size, dim=0)[rank]`` (FSDP2's ``Shard(0)``) is copied into
the DTensor's local tensor. The peak of the build is the process's shards plus the cache plus one
parameter, never the whole model. A resumed run skips the replay (its checkpoint supplies the
values). Fine-tuning from other weights (``--pretrained``, ``--init-from``; their loaders resize
position tables and reset classifiers, which needs the whole model) builds the model whole in
rank 0 alone, loads the weights there and broadcasts them tensor by tensor into every process's
shards (:func:`build_sharded_from_rank0`): rank 0 holds the whole model and its shards while it
loads; the other processes only ever hold their shards.

Checkpoints of FSDP runs are sharded: ``torch.distributed.checkpoint`` (DCP) writes the model's
and the optimizer's sharded state dicts (:func:`save_sharded`, every process its own shards) into
``checkpoint/dcp/``; they load into any number of processes, with or without FSDP (one process
reads them with ``no_dist=True``; :func:`load_sharded`). Runs without ``--fsdp`` keep the full
``model.safetensors`` + optimizer-in-``state.pt`` format, which FSDP runs also resume from. The
final ``model/`` directory is gathered to rank 0 (full fp32 weights on rank 0, the optimizer
states stay sharded).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["shard_model", "build_sharded", "build_sharded_from_rank0", "save_sharded", "load_sharded"]

#: materialised parameter storages the initialisation recorder keeps beyond those an op uses
_CACHE_BYTES = 16 << 20

_OVERWRITES = frozenset({"uniform_", "normal_", "fill_", "zero_", "random_", "bernoulli_", "exponential_",
                         "geometric_", "cauchy_", "log_normal_", "copy_"})


def _storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class _Recipe:
    """How to remake one parameter storage's final value: a starting value (None: replay ``ops``
    from a full overwrite; a float: every element equal; else a tensor) and the in-place ops since."""

    __slots__ = ("storage", "dtype", "numel", "start", "ops", "overwritten")

    def __init__(self, storage, dtype: torch.dtype):
        self.storage, self.dtype = storage, dtype
        self.numel = storage.nbytes() // torch.empty((), dtype=dtype).element_size()
        self.start, self.ops, self.overwritten = None, [], False

    def base(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype).set_(self.storage, 0, (self.numel,), (1,))

    def replay_into(self, base: torch.Tensor) -> None:
        if isinstance(self.start, float):
            base.fill_(self.start)
        elif self.start is not None:
            base.copy_(self.start)
        for func, geometry, rest, kwargs, rng in self.ops:
            if rng is not None:
                gen = kwargs.get("generator")
                if gen is None:
                    torch.set_rng_state(rng)
                else:
                    kwargs = {**kwargs, "generator": torch.Generator(gen.device).set_state(rng)}
            func(base.as_strided(*geometry), *rest, **kwargs)


class _InitRecorder:
    """The registration hook, dispatch mode and recipes of one construction (module docstring)."""

    def __init__(self, cache_bytes: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.recipes: dict[int, _Recipe] = {}
        self.live: dict[int, None] = {}  # materialised storages, least recently used first
        self.cache_bytes = cache_bytes
        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return rec.dispatch(func, args, kwargs or {})
        self.mode = Mode()

    def register(self, module, name, param):
        if param is None or param.device.type != "cpu" or param.is_meta:
            return None
        key = _storage_key(param)
        if key is None or key in self.recipes:
            return None
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            self.recipes[key] = _Recipe(param.untyped_storage(), param.dtype)
            self.live[key] = None
            self._evict(pinned={key})
        return None

    def _materialise(self, key: int) -> None:
        if key in self.live:
            self.live[key] = self.live.pop(key)
            return
        recipe = self.recipes[key]
        recipe.storage.resize_(recipe.numel * recipe.base().element_size())
        state = torch.get_rng_state()
        try:
            recipe.replay_into(recipe.base())
        finally:
            torch.set_rng_state(state)
        self.live[key] = None

    def _evict(self, pinned=frozenset(), everything: bool = False) -> None:
        total = sum(self.recipes[k].storage.nbytes() for k in self.live)
        for key in list(self.live):
            if not everything and (total <= self.cache_bytes):
                break
            if key in pinned:
                continue
            recipe = self.recipes[key]
            if not recipe.overwritten:  # no recipe from a full overwrite: keep the value itself
                base = recipe.base()
                first = base[:1]
                constant = base.numel() > 0 and bool((base == first).all()) and bool(first.isfinite().all())
                recipe.start = float(first) if constant else base.clone()
                recipe.ops = []
            total -= recipe.storage.nbytes()
            recipe.storage.resize_(0)
            del self.live[key]

    def dispatch(self, func, args, kwargs):
        from torch.utils._pytree import tree_flatten
        flat, _ = tree_flatten((args, kwargs))
        keys = {k for t in flat if isinstance(t, torch.Tensor) and (k := _storage_key(t)) in self.recipes}
        if not keys:
            return func(*args, **kwargs)
        for key in keys:
            self._materialise(key)
        written = []
        if func._schema.is_mutable:
            for i, arg in enumerate(func._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = args[i] if i < len(args) else kwargs.get(arg.name)
                    if isinstance(value, torch.Tensor) and _storage_key(value) in keys:
                        written.append((i, value))
        if written:
            if len(written) != 1 or written[0][0] != 0:
                raise NotImplementedError(f"--fsdp: {func} writes several parameters at once, or one not in place; the "
                                          "sharded initialisation cannot replay it (train without --fsdp)")
            target = written[0][1]
            recipe = self.recipes[_storage_key(target)]
            rest = tuple(a.clone() if isinstance(a, torch.Tensor) and _storage_key(a) in keys else a for a in args[1:])
            rng = None
            if torch.Tag.nondeterministic_seeded in func.tags:
                gen = kwargs.get("generator")
                rng = torch.get_rng_state() if gen is None else gen.get_state()
            geometry = (tuple(target.shape), tuple(target.stride()), target.storage_offset())
            out = func(*args, **kwargs)
            op = (func, geometry, rest, dict(kwargs), rng)
            if (func.__name__.split(".")[0] in _OVERWRITES and target.storage_offset() == 0
                    and target.numel() == recipe.numel and target.is_contiguous()):
                recipe.start, recipe.ops, recipe.overwritten = None, [op], True
            else:
                recipe.ops.append(op)
        else:
            out = func(*args, **kwargs)
        self._evict(pinned=keys)
        return out


@contextlib.contextmanager
def _recording(cache_bytes: int = _CACHE_BYTES) -> Iterator[_InitRecorder]:
    """Record the initialisation of the parameters constructed inside (see the module docstring)."""
    from torch.nn.modules.module import register_module_parameter_registration_hook
    rec = _InitRecorder(cache_bytes)
    handle = register_module_parameter_registration_hook(rec.register)
    try:
        with rec.mode:
            yield rec
        rec._evict(everything=True)
    finally:
        handle.remove()




def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every :class:`~hfactory.layers.block.Block` and every
    :class:`~hfactory.builder.Stage` (inner modules first), then ``model`` itself (the rest:
    norms, heads, an MAE decoder's own parameters; a model without stages, such as SFT whose codecs
    run through ``forward_step``, is one unit). Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    from ..builder import Stage
    from ..layers.block import Block

    # reversed pre-order: every module comes after all of its descendants
    for module in reversed(list(model.modules())):
        if module is not model and isinstance(module, (Block, Stage)):
            fully_shard(module)
    fully_shard(model)
    return model


def build_sharded(build: Callable[[], nn.Module], device: torch.device, init: bool = True) -> nn.Module:
    """``build()`` sharded with :func:`shard_model` on ``device`` without ever holding the whole
    model (see the module docstring); with ``init`` every parameter's shard is bit for bit the
    unsharded ``build()``'s for the same RNG state, and torch's RNG ends where that build leaves
    it. Without ``init`` (a resumed run) the shards are left uninitialised. A collective-free
    function, but call it in every process of the group (``fully_shard`` uses the default group)."""
    with _recording() as recorder:
        model = build()
    end_state = torch.get_rng_state()
    recipes: dict[str, tuple[_Recipe, tuple]] = {}
    metas: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in metas:
                recipe = recorder.recipes.get(_storage_key(param))
                if recipe is None:  # not constructed on the CPU (e.g. already meta): cannot be remade
                    raise RuntimeError(f"--fsdp: parameter {prefix + '.' * bool(prefix) + name} was not created "
                                       "on the CPU during construction; it cannot be initialised shard by shard")
                metas[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                requires_grad=param.requires_grad)
                recipes[prefix + "." * bool(prefix) + name] = (
                    recipe, (tuple(param.shape), tuple(param.stride()), param.storage_offset()))
            module._parameters[name] = metas[id(param)]
    buffers = {name: b for name, b in model.named_buffers(remove_duplicate=False)}
    shard_model(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers(remove_duplicate=False):
            b.copy_(buffers[name])
        if init:
            for name, param in model.named_parameters():
                recipe, geometry = recipes[name]
                base = torch.empty(recipe.numel, dtype=recipe.dtype)
                recipe.replay_into(base)
                _copy_shard(param, base.as_strided(*geometry))
                del base
    torch.set_rng_state(end_state)
    return model


def build_sharded_from_rank0(build: Callable[[], nn.Module], load: Callable[[nn.Module], None],
                             device: torch.device, ctx) -> nn.Module:
    """``build()`` sharded with :func:`shard_model` on ``device``, holding the values rank 0 gets by
    ``load(whole)`` on its own unsharded ``build()`` (e.g. pretrained weights, a new classifier
    initialised from the seed). A collective: call it in every process of ``ctx``'s group.

    Rank 0 builds the model whole on the CPU from the current RNG state and runs ``load`` on it
    (inside :func:`~hfactory.train.distributed.agree`: an error there is raised in every process);
    then every process, from that same RNG state, builds its uninitialised shards
    (:func:`build_sharded` without ``init``) and ``set_model_state_dict`` broadcasts rank 0's full
    state dict into them one tensor at a time (``broadcast_from_rank0``). torch's RNG ends where an
    unsharded ``build()`` leaves it, in every process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .distributed import agree

    start = torch.get_rng_state()

    def whole_on_rank0() -> dict:
        if not ctx.is_main:
            return {}
        model = build()
        load(model)
        return model.state_dict()

    full = agree(ctx, whole_on_rank0)
    torch.set_rng_state(start)
    model = build_sharded(build, device, init=False)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's part of ``full`` into ``param`` (a DTensor sharded on dim 0 as FSDP2
    shards, or a plain tensor)."""
    local = param.to_local() if hasattr(param, "to_local") else param
    if local is param:
        param.copy_(full)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        part = chunks[rank]
        if tuple(local.shape) != tuple(part.shape):
            raise RuntimeError(f"shard of shape {tuple(local.shape)} where FSDP's dim-0 chunk is {tuple(part.shape)}")
        local.copy_(part)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": ..., "optim": ...}``: the (sharded, under FSDP) state dicts DCP saves and loads.
    The optimizer's states are created first (zero steps) when it has none, so DCP can fill them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> None:
    """Write the model's and optimizer's state into the DCP directory ``path``; with
    ``distributed`` (a process group exists) a collective: every process writes its own shards,
    rank 0 the metadata."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(path), no_dist=not distributed)


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> None:
    """Load a DCP checkpoint written by :func:`save_sharded` with any number of processes into
    ``model`` and ``optimizer``: sharded (a collective) under FSDP, else whole in each process
    (``no_dist``: one process, or each DDP process on its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state_dicts(model, optimizer)
    with warnings.catch_warnings():  # without FSDP, no_dist is the intent: torch warns about it anyway
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not fsdp)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
