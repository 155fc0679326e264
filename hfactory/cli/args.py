"""Arguments shared by the ``hfactory`` commands: SPEC (a YAML/JSON path or a preset name) with
``--set PATH=VALUE`` overrides, and small parsers. Public, so that every command module (and a
program wrapping the CLI) reads specs the same way; torch-free, so building the parser is fast.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import UsageError

__all__ = ["ANY_KIND_COMMANDS", "SFT_COMMANDS", "load_spec_arg", "add_spec_argument", "spec_argument_text", "spec_argument_stem",
           "parse_img_size"]

#: Commands that take a spec of any model kind (hfactory.models), not only encoder specs.
ANY_KIND_COMMANDS = ("train", "summary")
SFT_COMMANDS = ANY_KIND_COMMANDS  # the earlier name


def load_spec_arg(spec_arg, sets: list[str] | None = None, any_kind: bool = False):
    """The validated spec of a command-line argument (a YAML/JSON path, else a preset name; an
    already loaded spec passes through), with ``--set PATH=VALUE`` overrides applied. With
    ``any_kind`` (the :data:`ANY_KIND_COMMANDS`) the document's keys decide its spec class
    (:func:`hfactory.spec.io.load_any_spec`: an SFT spec has ``levels``); other commands take
    encoder specs and refuse another kind naming the commands that take it.

    Raises:
        pydantic.ValidationError / PlanError: a bad spec (located).
        UsageError (a ValueError): an unknown preset, a missing file named like a path, ``--set``
            on an SFT spec; SpecKindError: an SFT spec where only encoder specs are taken;
            OverrideError: a ``--set`` path that matches nothing.
    """
    from ..presets import resolve_spec_arg
    from ..spec.io import SPEC_CLASSES, load_any_spec
    from ..spec.model import EncoderSpec
    from ..spec.variants import parse_assignment

    if isinstance(spec_arg, tuple(SPEC_CLASSES.values())):
        spec = spec_arg
    else:  # encoder-only commands: another kind fails naming the commands that take it (SpecKindError)
        spec = resolve_spec_arg(spec_arg, loader=load_any_spec if any_kind else None)
    if sets:
        if not isinstance(spec, EncoderSpec):  # the --set engine works on encoder specs' paths
            raise UsageError(f"--set changes encoder specs (stages.*); edit the {type(spec).__name__}'s YAML "
                             "instead")
        spec = spec.with_changes(dict(parse_assignment(s) for s in sets))
    return spec


def add_spec_argument(p: argparse.ArgumentParser) -> None:
    """The SPEC positional and ``--set PATH=VALUE`` (repeatable), for every command taking a spec.
    :func:`hfactory.cli.main` applies ``--set`` before the command runs (``args.spec`` is then the
    loaded spec and ``args.spec_arg`` what was typed)."""
    p.add_argument("spec", help="spec YAML path or preset name")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", default=None,
                   help="override a spec field by dotted path, e.g. --set stages.2.depth=9 --set "
                   "'stages.*.token_mixer.kind=attention' (repeatable; values are YAML)")


def spec_argument_text(args: argparse.Namespace) -> str:
    """SPEC as typed on the command line plus its ``--set`` flags, shell-quoted: for messages that
    repeat the command (a resumed run must rebuild the same spec, or its checkpoint is refused)."""
    typed = getattr(args, "spec_arg", args.spec)
    return " ".join([shlex.quote(str(typed))] + [f"--set {shlex.quote(s)}" for s in (getattr(args, "set", None) or [])])


def spec_argument_stem(args: argparse.Namespace) -> str:
    """The file stem (or preset name) of SPEC as typed, for default run directory names."""
    return Path(str(getattr(args, "spec_arg", args.spec))).stem


def parse_img_size(values: list[int] | None) -> tuple[int, int] | None:
    """``--img-size N`` or ``--img-size H W`` as ``(H, W)``; None when not given.

    Raises:
        UsageError (a ValueError): not one or two sizes, or a size < 1.
    """
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"--img-size {' '.join(map(str, values))}: give one size or H W, each >= 1")
    return (values[0], values[-1])
