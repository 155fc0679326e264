"""``hfactory train`` and ``hfactory eval`` (added to the main CLI by :func:`add_commands`).

Torch and the data libraries are imported when a command runs, not when the parser is built,
so ``hfactory summary``/``schema`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

__all__ = ["add_commands", "cmd_train", "cmd_eval", "config_from_args"]

# (flag, TrainConfig field, type, help). Flags default to None so that we can tell which ones
# the user gave: on --resume, the rest come from the run's recorded config, not from defaults.
_TRAIN_OPTIONS = [
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "images per optimizer step, global: under torchrun each of N "
     "processes takes its share (about 1/N) of every batch, so N processes train like one"),
    ("--lr", "lr", float, "peak learning rate of AdamW (after warmup, then cosine decay to 0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (not on biases, norms, position embeddings)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup length in epochs"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the training loss"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this value (default: no clipping)"),
    ("--seed", "seed", int, "seed of initialisation, data order and augmentation"),
    ("--shift", "shift", float, "random translation of digits training images, as a fraction of the side"),
    ("--eval-batch-size", "eval_batch_size", int, "images per evaluation batch"),
    ("--workers", "workers", int, "DataLoader worker processes for ImageFolder data"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores available to the process)"),
    ("--device", "device", str, "torch device (default: cuda if available, else cpu)"),
    ("--stop-at-step", "stop_at_step", int, "stop after this many optimizer steps in total, leaving a "
     "checkpoint to --resume (the schedule still spans --epochs)"),
]


def add_commands(subparsers) -> None:
    """Add ``train`` and ``eval`` to the ``hfactory`` argparse subparsers."""
    from ..cli import add_spec_argument
    from . import TrainConfig

    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a spec on digits or an ImageFolder directory",
        description="Train a spec; the defaults train examples/digits_hybrid.yaml on the embedded digits data. "
        "Several processes: torchrun --nproc_per_node=N -m hfactory train SPEC ... (DDP, or FSDP2 with --fsdp; "
        "gloo on CPU, nccl on CUDA); --batch-size stays the global batch and only rank 0 prints and writes.")
    add_spec_argument(p)
    p.add_argument("--data", help=f"'digits' (scikit-learn's bundled 8x8 digits, fixed 80/20 split) or a "
                   f"directory with train/ and val/ ImageFolder subfolders (default: {defaults.data})")
    p.add_argument("--out", help="run directory (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from pretrained encoder weights (an hfactory "
                   "pretrain run directory, or a save_pretrained directory); the classifier keeps its init")
    add_run_options(p, _TRAIN_OPTIONS, defaults)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="test accuracy of a trained model (prints one JSON line)")
    p.add_argument("model", help="run directory (its model/ or checkpoint/) or a save_pretrained directory")
    p.add_argument("--data", help="'digits' or an ImageFolder directory (its val/ split is used); "
                   "default: the run's data, else digits")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for ImageFolder data (default: 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all available cores)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_eval)

    from .pretrain import add_pretrain_command

    add_pretrain_command(subparsers)


def add_run_options(p: argparse.ArgumentParser, options: list, defaults) -> None:
    """The run-config flags shared by ``train`` and ``pretrain``: ``options`` rows (flag, config
    field, type, help) with default None, so that a ``--resume`` can tell which flags were given,
    then ``--amp``, ``--no-progress`` and ``--fsdp``."""
    for flag, name, type_, help_ in options:
        default = getattr(defaults, name)
        p.add_argument(flag, dest=name, type=type_, default=None,
                       help=help_ if default is None or "default:" in help_ else f"{help_} (default: {default})")
    p.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar (epoch lines are still printed)")
    p.add_argument("--fsdp", dest="fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer states with FSDP2 "
                   "(fully_shard per stage) instead of replicating them with DDP")


def _missing_extra(data: str, progress: bool) -> str | None:
    """Name the first train-extra package a command needs but cannot import, else None."""
    needed = ["sklearn" if data == "digits" else "torchvision"] + (["tqdm"] if progress else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{', '.join(missing)} not installed; install the training extra: pip install 'hfactory[train]'")
    return None


def config_from_args(args: argparse.Namespace, out: Path, config_cls=None):
    """The config of a ``train`` (``TrainConfig``, the default) or ``pretrain`` (``config_cls``)
    invocation: defaults, then (on ``--resume``) the run's recorded config, then the flags given.
    Warns on stderr when a resume changes the trajectory."""
    from . import RUNTIME_FIELDS, TrainConfig
    from .checkpoint import read_run

    config_cls = config_cls or TrainConfig
    names = [f.name for f in fields(config_cls)]
    values = asdict(config_cls())
    recorded = (read_run(out) or {}).get("config", {}) if args.resume and out.is_dir() else {}
    values.update({k: v for k, v in recorded.items() if k in names and k not in RUNTIME_FIELDS})
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    changed = [k for k, v in given.items() if k in recorded and k not in RUNTIME_FIELDS and recorded[k] != v]
    if changed and os.environ.get("RANK", "0") == "0":
        print("warning: resuming with changed " + ", ".join(f"{k} ({recorded[k]} -> {given[k]})" for k in changed)
              + "; the result will differ from an uninterrupted run", file=sys.stderr)
    values.update(given)
    return config_cls(**values)


def cmd_train(args: argparse.Namespace) -> int:
    """Train; exit 0 when done (or stopped by --stop-at-step), 1 on a non-finite loss, 130 on Ctrl-C.

    Under torchrun only rank 0 prints (and writes the run directory)."""
    from ..cli import _load, spec_argument_stem, spec_argument_text

    main_process = os.environ.get("RANK", "0") == "0"

    spec = _load(args.spec, sft=True)  # an encoder spec, or an SFT spec
    out = Path(args.out) if args.out else Path("runs") / (spec.name or spec_argument_stem(args))
    config = config_from_args(args, out)
    problem = _missing_extra(config.data, config.progress)
    if problem:
        raise ValueError(problem)

    from .loop import NonFiniteLossError, train

    try:
        result = train(spec, out, config, resume=args.resume, init_from=getattr(args, "init_from", None))
    except NonFiniteLossError as err:
        print(f"hfactory train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if main_process:
            print(f"\nhfactory train: interrupted; continue with: hfactory train {spec_argument_text(args)} "
                  f"--out {shlex.quote(str(out))} --resume",
                  file=sys.stderr)
        return 130
    if not main_process:
        return 0
    if not result.get("stopped"):
        print(f"test accuracy {result['test_accuracy']:.4f} after {result['epochs']} epochs in "
              f"{result['elapsed_s']:.1f}s; model saved to {out / 'model'}")
    print(json.dumps(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved model on the test split; prints ``{"test_accuracy": ..., ...}``."""

    from .checkpoint import checked_model_dir, read_run

    from . import check_ranges

    check_ranges(args, [("batch_size", args.batch_size >= 1, ">= 1"), ("workers", args.workers >= 0, ">= 0"),
                        ("threads", args.threads is None or args.threads >= 1, ">= 1")])
    model_dir = checked_model_dir(Path(args.model))
    data_arg = args.data or ((read_run(Path(args.model)) or {}).get("config", {}).get("data")) or "digits"
    problem = _missing_extra(data_arg, progress=False)
    if problem:
        raise ValueError(problem)

    import torch

    from ..encoder import load_model
    from .data import load_data
    from .loop import evaluate

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_dir).to(device)  # an encoder or an SFT, as its spec.yaml says
    data = load_data(data_arg, model.spec.img_hw, model.spec.in_chans)
    if data.num_classes != model.num_classes:
        raise ValueError(f"the data {data.name} has {data.num_classes} classes but the model predicts "
                         f"{model.num_classes}")
    metrics = evaluate(model, data.test, args.batch_size, args.amp, args.workers, device)
    print(json.dumps({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
                      "images": metrics["images"], "data": data.name, "model": str(model_dir)}))
    return 0
