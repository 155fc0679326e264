"""The run directory of ``hfactory train`` and ``pretrain``: ownership checks and resumable checkpoints.

Layout of ``--out DIR``::

    run.json            spec hash + name and the run's config (written when the run starts);
                        a pretraining run adds task: mae_pretrain and its mask_ratio
    checkpoint/         the last good checkpoint (replaced as a whole, see save_checkpoint)
        model.safetensors   weights; metadata: spec_hash, step            (runs without --fsdp)
        dcp/                sharded weights + optimizer states, a          (--fsdp runs)
                            torch.distributed.checkpoint directory: .metadata and one
                            __<rank>_0.distcp per process that wrote it
        spec.yaml           the spec
        state.pt            scheduler, RNG states, epoch, step, ... (plain tensors/dicts); the
                            optimizer state too without --fsdp; format: "dcp" with --fsdp
    metrics.jsonl       one JSON line per finished epoch
    metrics.json        final metrics (written at the end)
    model/              the final model: save_pretrained(), loadable with hfactory.models.load
    encoder/            (pretraining only) the pretrained encoder alone, for --init-from

Either kind of checkpoint resumes with any number of processes, with or without ``--fsdp``
(a ``dcp/`` checkpoint is read by one process with ``no_dist``; see :mod:`.distributed`).
``hfactory eval`` and ``--init-from`` read either kind too (:func:`read_sharded_weights`).

Every file is written atomically (a temporary file in the same directory, then ``os.replace``),
and a checkpoint is first written complete into ``checkpoint.new/`` and then swapped in, so a
crash at any moment leaves one complete checkpoint (see :func:`find_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..atomic import atomic_path
from ..errors import UsageError
from ..io import SPEC_NAME, WEIGHTS_NAME, load_checked, spec_hash, spec_hashes
from ..spec.io import dump_spec, load_any_spec

__all__ = ["RUN_FILE", "CHECKPOINT_DIR", "MODEL_DIR", "STATE_NAME", "DCP_DIR", "atomic_path", "write_json",
           "check_out_dir", "read_run", "save_checkpoint", "save_sharded_checkpoint", "save_model_dir",
           "find_checkpoint", "load_checkpoint", "is_sharded", "checked_model_dir", "load_saved_model",
           "read_sharded_weights"]

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
STATE_NAME = "state.pt"
DCP_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint directory
DCP_METADATA = ".metadata"  # written last by DCP: its presence marks the shards complete
METRIC_FILES = ("metrics.jsonl", "metrics.json")

def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_run(out: Path) -> Optional[dict]:
    """The ``run.json`` of ``out`` (None when there is none)."""
    path = out / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _recorded_hash(out: Path) -> Optional[str]:
    """The spec hash of whatever run ``out`` holds: run.json, else a checkpoint or model spec."""
    run = read_run(out)
    if run is not None:
        return run["spec_hash"]
    for sub in (CHECKPOINT_DIR, MODEL_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".new"):
        if (out / sub / SPEC_NAME).is_file():
            return spec_hash(load_any_spec(out / sub / SPEC_NAME))
    if any((out / name).exists() for name in METRIC_FILES):
        return "unknown"
    return None


def check_out_dir(out: Path, spec, resume: bool) -> bool:
    """Refuse to write a run of ``spec`` into ``out`` when that would overwrite another run.

    Returns:
        True when ``out`` already holds a run of this spec (and ``resume`` is set).

    Raises:
        UsageError (a ValueError): ``out`` is a file; it holds a run of another spec (different spec hash);
            it holds a run of this spec and ``resume`` is False; ``resume`` is set but ``out``
            holds no run. Nothing is written in any of these cases.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    recorded = _recorded_hash(out) if out.is_dir() else None
    want = spec_hash(spec)
    if recorded is None:
        if resume:
            raise UsageError(f"--resume: {out} holds no run to resume; leave out --resume to start one")
        return False
    if recorded != want and recorded not in spec_hashes(spec):
        raise UsageError(f"{out} already holds a run of another spec (spec hash {recorded}, this spec is {want}); "
                         "choose another --out; nothing was overwritten")
    if not resume:
        raise UsageError(f"{out} already holds a run of this spec; add --resume to continue it from its last "
                         "checkpoint, or choose another --out")
    return True


def save_checkpoint(out: Path, model: torch.nn.Module, state: dict,
                    weights: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write ``out/checkpoint`` (weights, spec, ``state``) so that a crash never leaves it half-written.

    ``state`` holds plain tensors, numbers, strings, lists and dicts only (it is loaded with
    ``torch.load(weights_only=True)``); it must contain ``step`` and ``spec_hash``. ``weights``
    (default: ``model.state_dict()``) is the full state dict to save, e.g. gathered from FSDP
    shards; ``model.spec`` is saved with it.

    The checkpoint is written complete into ``checkpoint.new/``; then ``checkpoint`` becomes
    ``checkpoint.old``, ``checkpoint.new`` becomes ``checkpoint`` and ``checkpoint.old`` is
    deleted. Returns the checkpoint directory.
    """
    from safetensors.torch import save_file

    new = out / (CHECKPOINT_DIR + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    with atomic_path(new / WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp), metadata={"spec_hash": state["spec_hash"], "step": str(state["step"]),
                                               "format": "pt"})
    return _finish_checkpoint(out, model.spec, state)


def _finish_checkpoint(out: Path, spec, state: dict) -> Path:
    """Write the spec and ``state`` into ``checkpoint.new`` (the state last: it marks the
    checkpoint complete) and swap it in for ``checkpoint``."""
    final, new, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".new"), out / (CHECKPOINT_DIR + ".old")
    with atomic_path(new / SPEC_NAME) as tmp:
        tmp.write_text(dump_spec(spec), encoding="utf-8")
    with atomic_path(new / STATE_NAME) as tmp:  # last: its presence marks the checkpoint complete
        torch.save(state, tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(out: Path, spec, state: Optional[dict], write_shards: Callable[[Path], None],
                            barrier: Callable[[], None], is_main: bool) -> Optional[Path]:
    """Write ``out/checkpoint`` of a sharded (FSDP) run, as :func:`save_checkpoint` does but with
    ``dcp/`` instead of ``model.safetensors``; a collective: every process calls it.

    Rank 0 (``is_main``) empties ``checkpoint.new/``; after ``barrier()`` every process calls
    ``write_shards(checkpoint.new/dcp)`` (:func:`.fsdp.save_sharded`: each writes its
    shards, rank 0 the metadata); then rank 0 writes the spec and ``state`` (which must hold
    ``step``, ``spec_hash``; ``format: "dcp"`` is added) and swaps the checkpoint in. The
    directory must be on a file system every process sees. Returns the checkpoint directory
    (rank 0) or None.
    """
    new = out / (CHECKPOINT_DIR + ".new")
    if is_main:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
    barrier()
    write_shards(new / DCP_DIR)
    barrier()
    final = _finish_checkpoint(out, spec, {**state, "format": "dcp"}) if is_main else None
    barrier()
    return final


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint directory ``path`` holds DCP shards (an FSDP run's) rather than
    ``model.safetensors``."""
    return (path / DCP_DIR / DCP_METADATA).is_file() and not (path / WEIGHTS_NAME).is_file()


def save_model_dir(directory: Path, spec, weights: dict[str, torch.Tensor]) -> Path:
    """Write ``weights`` (a full state dict) and ``spec`` as the spec's model's ``save_pretrained``
    does (an encoder, or an SFT for an SFT spec), for a model whose own ``state_dict`` is sharded
    (FSDP): the weights are loaded into a model built on the meta device (checked against the
    spec, nothing allocated twice) and saved with ``save_pretrained``. Returns the directory."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.save_pretrained(directory)


def find_checkpoint(out: Path) -> Optional[Path]:
    """The complete checkpoint directory in ``out``, or None.

    ``checkpoint`` normally; after a crash in the middle of :func:`save_checkpoint`'s swap,
    ``checkpoint.new`` (if complete, it is the newer) or else ``checkpoint.old``.
    """
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".new", CHECKPOINT_DIR + ".old"):
        path = out / name
        if all((path / f).is_file() for f in (SPEC_NAME, STATE_NAME)) and (
                (path / WEIGHTS_NAME).is_file() or (path / DCP_DIR / DCP_METADATA).is_file()):
            return path
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, expected_hash: str, weights: bool = True) -> dict:
    """Load the checkpoint at ``path`` into ``model`` and return its state dict (``state.pt``).

    Without ``weights`` (``model`` is sharded), and for a sharded checkpoint (``dcp/``, see
    :func:`is_sharded`), the weights are only checked against ``model`` (names and shapes), not
    loaded: :func:`.fsdp.load_sharded` (or, for ``model.safetensors`` into a sharded model,
    ``set_model_state_dict``) loads them once the optimizer exists.

    Raises:
        UsageError (a ValueError): the checkpoint's spec hash is not ``expected_hash``, its weights and state
            are from different steps, or the weights do not fit ``model``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    sharded = is_sharded(path)
    if sharded:
        meta = {"spec_hash": state.get("spec_hash"), "step": str(state["step"])}  # one writer: state.pt
    else:
        with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
            meta = f.metadata() or {}
    saved_spec = load_any_spec(path / SPEC_NAME)
    recorded = {state.get("spec_hash"), meta.get("spec_hash")}
    if spec_hash(saved_spec) != expected_hash or not recorded <= spec_hashes(saved_spec):
        found = sorted(map(str, recorded | {spec_hash(saved_spec)}))
        raise UsageError(f"checkpoint {path} was written for spec hash(es) {found}, "
                         f"but this spec hashes to {expected_hash}; it cannot be resumed with this spec")
    if meta.get("step") != str(state["step"]):
        raise UsageError(f"checkpoint {path}: weights are from step {meta.get('step')} but the optimizer state "
                         f"from step {state['step']}; the checkpoint is inconsistent")
    if sharded:
        _check_shapes(model, _dcp_shapes(path / DCP_DIR), str(path / DCP_DIR))
    elif weights:
        load_checked(model, load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
    else:
        with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
            _check_shapes(model, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, str(path / WEIGHTS_NAME))
    return state


def read_sharded_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors (CPU, name -> tensor, the unsharded ``state_dict`` names) from the
    DCP directory ``directory`` (an FSDP run's ``checkpoint/dcp``), read by one process without a
    process group (``no_dist``) whatever the number of processes that wrote it; the optimizer's
    states are not read. Used by ``hfactory eval`` and ``--init-from`` on an unfinished FSDP run.

    Raises:
        FileNotFoundError: ``directory`` holds no complete DCP checkpoint (no ``.metadata``).
    """
    import torch.distributed.checkpoint as dcp

    if not (Path(directory) / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{directory}: no sharded checkpoint there (no {DCP_METADATA})")
    # allocate each saved model tensor at its global size, then let DCP fill them from the shards
    weights = {name: torch.empty(tuple(item.size), dtype=item.properties.dtype)
               for name, item in _dcp_model_tensors(directory).items()}
    state = {"model": weights}
    with warnings.catch_warnings():  # no_dist is the intent here: one process reads every shard
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state["model"]


def load_saved_model(model_dir: Path) -> torch.nn.Module:
    """The model of :func:`checked_model_dir`'s result: a ``save_pretrained`` directory (or a
    checkpoint of a run without ``--fsdp``) via :func:`hfactory.models.load`, or an FSDP run's
    sharded checkpoint (built from its ``spec.yaml``, weights from :func:`read_sharded_weights`).

    Raises:
        UsageError (a ValueError): the weights do not fit the spec (keys and shapes named).
    """
    from ..models import build_model, load_model

    if not is_sharded(model_dir):
        return load_model(model_dir)
    model = build_model(load_any_spec(model_dir / SPEC_NAME))
    load_checked(model, read_sharded_weights(model_dir / DCP_DIR), source=str(model_dir / DCP_DIR))
    return model


def _dcp_model_tensors(directory: Path) -> dict:
    """Model-tensor name (the ``state_dict`` key) -> its DCP ``TensorStorageMetadata`` (global
    ``size``, ``properties.dtype``), from a DCP checkpoint's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    items = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key[len("model."):]: item for key, item in items.items()
            if key.startswith("model.") and hasattr(item, "size")}


def _dcp_shapes(directory: Path) -> dict[str, tuple]:
    """Name -> global shape of the model tensors in a DCP checkpoint (its ``.metadata``)."""
    return {name: tuple(item.size) for name, item in _dcp_model_tensors(directory).items()}


def _check_shapes(model: torch.nn.Module, saved: dict[str, tuple], source: str) -> None:
    """Refuse saved tensors whose names or shapes do not fit ``model``'s state dict (global shapes,
    also for a sharded model).

    Raises:
        UsageError: naming the missing, unexpected and mismatched keys.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    wrong = sorted(f"{k} {saved[k]} (model: {want[k]})" for k in want.keys() & saved.keys() if saved[k] != want[k])
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if items]
        raise UsageError(f"{source} does not fit the model: {'; '.join(parts)}")


def checked_model_dir(path: Path) -> Path:
    """Find the saved model for ``hfactory eval`` and check that its weights match its spec.

    ``path`` may be a ``save_pretrained`` directory, a run directory (its ``model/`` is used,
    or its checkpoint if the run has not finished, also an FSDP run's sharded one; load the
    result with :func:`load_saved_model`).

    Raises:
        FileNotFoundError: no saved model at ``path``.
        UsageError (a ValueError): the weights were saved for another spec than the ``spec.yaml`` next to them,
            or (for a run directory) than the run's spec.
    """
    from safetensors import safe_open

    path = Path(path)
    candidates = [path, path / MODEL_DIR]
    if find_checkpoint(path) is not None:
        candidates.append(find_checkpoint(path))
    model_dir = next((c for c in candidates if (c / SPEC_NAME).is_file() and (
        (c / WEIGHTS_NAME).is_file() or is_sharded(c))), None)
    if model_dir is None:
        raise FileNotFoundError(f"no saved model in {path}: expected {SPEC_NAME} and {WEIGHTS_NAME} there, "
                                f"or a run directory with {MODEL_DIR}/ or {CHECKPOINT_DIR}/")
    saved_spec = load_any_spec(model_dir / SPEC_NAME)
    actual, accepted = spec_hash(saved_spec), spec_hashes(saved_spec)
    if is_sharded(model_dir):  # an unfinished FSDP run: state.pt records the hash for the shards
        saved = torch.load(model_dir / STATE_NAME, map_location="cpu", weights_only=True).get("spec_hash")
    else:
        with safe_open(str(model_dir / WEIGHTS_NAME), "pt") as f:
            saved = (f.metadata() or {}).get("spec_hash")
    if saved is not None and saved not in accepted:
        raise UsageError(f"{model_dir / WEIGHTS_NAME} was saved for spec hash {saved}, but {model_dir / SPEC_NAME} "
                         f"hashes to {actual}: the spec was changed after saving; restore it or retrain")
    run = read_run(path)
    if run is not None and run["spec_hash"] not in accepted:
        raise UsageError(f"{model_dir} holds a model of spec hash {actual}, but the run in {path} is of spec "
                         f"hash {run['spec_hash']}")
    return model_dir
