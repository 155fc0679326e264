"""What ``hfactory train`` and ``hfactory pretrain`` share on the command line: the run-config
flags, the config of an invocation (defaults, then a resumed run's record, then the flags given),
the check for the ``train`` extra, and how a run ends (exit status and messages).

Torch-free: the training library is imported only when a run starts.
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
from typing import Callable

from ..errors import NonFiniteLossError, UsageError
from .args import spec_argument_text

__all__ = ["add_run_options", "config_from_args", "require_extras", "finish_run", "is_main_process"]


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or the only process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


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


def config_from_args(args: argparse.Namespace, out: Path, config_cls):
    """The config (a ``config_cls`` instance: :class:`~hfactory.train.TrainConfig` or
    :class:`~hfactory.train.PretrainConfig`) of an invocation: defaults, then (on ``--resume``)
    the run's recorded config, then the flags given. Warns on stderr when a resume changes the
    trajectory."""
    from ..train.checkpoint import read_run
    from ..train.config import RUNTIME_FIELDS

    names = [f.name for f in fields(config_cls)]
    values = asdict(config_cls())
    recorded = (read_run(out) or {}).get("config", {}) if args.resume and out.is_dir() else {}
    values.update({k: v for k, v in recorded.items() if k in names and k not in RUNTIME_FIELDS})
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    changed = [k for k, v in given.items() if k in recorded and k not in RUNTIME_FIELDS and recorded[k] != v]
    if changed and is_main_process():
        print("warning: resuming with changed " + ", ".join(f"{k} ({recorded[k]} -> {given[k]})" for k in changed)
              + "; the result will differ from an uninterrupted run", file=sys.stderr)
    values.update(given)
    return config_cls(**values)


def require_extras(data: str, progress: bool) -> None:
    """Check that the ``train`` extra's packages a run needs are importable.

    Raises:
        UsageError: the first missing ones, with the install command.
    """
    needed = ["sklearn" if data == "digits" else "torchvision"] + (["tqdm"] if progress else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed; install the training extra: "
                         f"pip install 'hfactory[train]'")


def finish_run(args: argparse.Namespace, out: Path, run: Callable[[], dict], done: Callable[[dict], str]) -> int:
    """Run a training invocation and end it as the commands document: exit 1 on a non-finite loss
    (its message on stderr), 130 on Ctrl-C (with the command that resumes), else 0; rank 0
    prints ``done(result)`` (unless ``--stop-at-step`` stopped the run) and the result as JSON."""
    try:
        result = run()
    except NonFiniteLossError as err:  # a user error with its own status: the run stopped, nothing is wrong
        print(f"hfactory {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main_process():
            print(f"\nhfactory {args.command}: interrupted; continue with: hfactory {args.command} "
                  f"{spec_argument_text(args)} --out {shlex.quote(str(out))} --resume", file=sys.stderr)
        return 130
    if not is_main_process():
        return 0
    if not result.get("stopped"):
        print(done(result))
    print(json.dumps(result))
    return 0
