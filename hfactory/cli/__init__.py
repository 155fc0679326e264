"""The ``hfactory`` command line: summary | sweep | presets | schema | bench | train | eval | pretrain.

Every command that takes a spec accepts a YAML path or a preset name (``hfactory presets``
lists them). Bad input (a spec failing validation, an unknown preset, a missing or corrupt
dataset, a checkpoint or run directory of another spec) prints one located message on stderr
and exits with status 2, never a traceback, and overwrites nothing. Bad input is exactly the
errors in :data:`hfactory.errors.USER_ERRORS`; any other exception is a bug in hfactory (or a library): it prints
its traceback and a line asking to report it, and exits with status 1.

Exit statuses: 0 success; 1 a training run stopped on a non-finite loss, ``presets --pattern``
matched nothing, or an internal error (a bug); 2 bad input; 130 interrupted (Ctrl-C).

Under ``torchrun`` (``torchrun --nproc_per_node=N -m hfactory train ...``) only rank 0 prints;
see :mod:`hfactory.train.distributed`.

Modules: :mod:`.args` (SPEC and ``--set``, shared by every command), :mod:`.specs` (summary,
sweep, presets, schema), :mod:`.bench`, :mod:`.run` (what train and pretrain share),
:mod:`.train` (train, eval), :mod:`.pretrain`. The training library (:mod:`hfactory.train`) never
imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from pydantic import ValidationError

from ..errors import USER_ERRORS, QuietAbort
from ..train.contention import TRAINING_OMP_ENV
from . import bench, diagram, export, pretrain, specs, train
from .args import ANY_KIND_COMMANDS, load_spec_arg

__all__ = ["main", "build_parser", "USER_ERRORS", "TRAINING_COMMANDS"]

#: Commands that train or evaluate (OMP_WAIT_POLICY=PASSIVE by default, see main).
TRAINING_COMMANDS = ("train", "pretrain", "eval")

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (torch is not imported)."""
    parser = argparse.ArgumentParser(
        prog="hfactory", description="Declarative hierarchical vision transformers. SPEC is a YAML path or a "
        "preset name (see `hfactory presets`).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (specs, diagram, bench, train, pretrain, export):  # the order of `hfactory --help`
        module.add_commands(sub)
    return parser


def _message(err: Exception) -> str:
    """One readable message: pydantic errors as ``location: message`` lines."""
    if isinstance(err, ValidationError):
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<spec>'}: {e['msg']}" for e in err.errors()]
        return f"{len(lines)} error(s) in the spec:\n  " + "\n  ".join(lines)
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        # Before torch starts OpenMP: threads that sleep while they wait degrade gracefully when
        # other processes share the cores, and cost nothing on an idle machine (hfactory.train.contention).
        for key, value in TRAINING_OMP_ENV.items():
            os.environ.setdefault(key, value)
    try:
        if getattr(args, "set", None):  # --set applies to every command that takes a spec
            args.spec_arg, args.spec = args.spec, load_spec_arg(args.spec, args.set,
                                                                any_kind=args.command in ANY_KIND_COMMANDS)
        return args.func(args)
    except QuietAbort as err:  # another process of a torchrun job failed and rank 0 printed why
        return err.status
    except USER_ERRORS as err:
        print(f"hfactory {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # not the user's doing: keep everything a bug report needs
        traceback.print_exc()
        print(f"hfactory {args.command}: internal error (a bug; please report it with the traceback above): "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
