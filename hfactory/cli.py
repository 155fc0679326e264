"""The ``hfactory`` command line: summary | sweep | presets | schema | bench | train | eval | pretrain.

Every command that takes a spec accepts a YAML path or a preset name (``hfactory presets``
lists them). Bad input (a spec failing validation, an unknown preset, a missing or corrupt
dataset, a checkpoint or run directory of another spec) prints one located message on stderr
and exits with status 2, never a traceback, and overwrites nothing.

Exit statuses: 0 success; 1 a training run stopped on a non-finite loss, or ``presets
--pattern`` matched nothing; 2 bad input; 130 interrupted (Ctrl-C).

Under ``torchrun`` (``torchrun --nproc_per_node=N -m hfactory train ...``) only rank 0 prints;
see :mod:`hfactory.train.distributed`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from pydantic import ValidationError

from .spec.base import PlanError


class QuietAbort(Exception):
    """Raised in a torchrun process whose job failed in another process (which reports the
    error): exit with ``status`` without printing the same message once per process."""

    def __init__(self, message: str = "", status: int = 2):
        super().__init__(message)
        self.status = status

__all__ = ["main", "build_parser"]


#: Commands that take SFT specs as well as encoder specs.
SFT_COMMANDS = ("train", "summary")


def _load(spec_arg, sets: list[str] | None = None, sft: bool = False):
    """The validated spec of a command-line argument (a YAML/JSON path, else a preset name; an
    already loaded spec passes through), with ``--set PATH=VALUE`` overrides applied. With
    ``sft`` (commands that take SFT specs too: train, summary) a file with ``levels`` gives an
    :class:`~hfactory.spec.sft.SFTSpec`; other commands refuse it naming the ones that take it."""
    from .presets import resolve_spec_arg
    from .spec.io import load_any_spec
    from .spec.model import EncoderSpec
    from .spec.sft import SFTSpec
    from .spec.variants import parse_assignment

    if isinstance(spec_arg, (EncoderSpec, SFTSpec)):
        spec = spec_arg
    else:  # without sft, an SFT file fails naming the commands that take one (load_spec's SpecKindError)
        spec = resolve_spec_arg(spec_arg, loader=load_any_spec if sft else None)
    if sets:
        if isinstance(spec, SFTSpec):
            raise ValueError("--set changes encoder specs (stages.*); edit the SFT spec's YAML instead")
        spec = spec.with_changes(dict(parse_assignment(s) for s in sets))
    return spec


def spec_argument_text(args: argparse.Namespace) -> str:
    """SPEC as typed on the command line plus its ``--set`` flags, shell-quoted: for messages that
    repeat the command (a resumed run must rebuild the same spec, or its checkpoint is refused)."""
    typed = getattr(args, "spec_arg", args.spec)
    return " ".join([shlex.quote(str(typed))] + [f"--set {shlex.quote(s)}" for s in (getattr(args, "set", None) or [])])


def spec_argument_stem(args: argparse.Namespace) -> str:
    """The file stem (or preset name) of SPEC as typed, for default run directory names."""
    return Path(str(getattr(args, "spec_arg", args.spec))).stem


def add_spec_argument(p: argparse.ArgumentParser) -> None:
    """The SPEC positional and ``--set PATH=VALUE`` (repeatable), for every command taking a spec."""
    p.add_argument("spec", help="spec YAML path or preset name")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", default=None,
                   help="override a spec field by dotted path, e.g. --set stages.2.depth=9 --set "
                   "'stages.*.token_mixer.kind=attention' (repeatable; values are YAML)")


def cmd_sweep(args: argparse.Namespace) -> int:
    """One row per variant of the --grid combinations (params, GMACs, activations, tokens)."""
    from .sweep import format_sweep, parse_grid, sweep, write_variants

    if not args.grid:
        raise ValueError("give at least one --grid PATH=V1,V2,... (e.g. --grid stages.2.depth=6,9,12)")
    grid: dict = {}
    for text in args.grid:
        path, values = parse_grid(text)
        if path in grid:
            raise ValueError(f"--grid {path} is given twice; put all its values in one --grid {path}=V1,V2,...")
        grid[path] = values
    rows = sweep(_load(args.spec), grid, batch=args.batch)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "spec"} for r in rows], indent=2))
    else:
        print(format_sweep(rows))
    if args.out:
        paths = write_variants(rows, Path(args.out))
        print(f"wrote {len(paths)} variant specs to {args.out}", file=sys.stderr)
    return 0


def _img_size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--img-size {' '.join(map(str, values))}: give one size or H W, each >= 1")
    return (values[0], values[-1])


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the per-stage table (or ``--json``): grids, tokens, widths, heads, depth, mixer,
    downsampler, parameters, GMACs and activation memory, measured on the meta device."""
    from .summary import format_summary, summarize

    from .spec.sft import SFTSpec

    spec = _load(args.spec, sft=True)
    if isinstance(spec, SFTSpec):
        from .sft import format_sft_summary, summarize_sft

        summary = summarize_sft(spec, batch=args.batch)
        print(json.dumps(summary, indent=2) if args.json else format_sft_summary(summary))
        return 0
    summary = summarize(spec, batch=args.batch)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """Print the preset names (one per line) matching ``--pattern``."""
    from .presets import list_models

    names = list_models(args.pattern)
    if not names:
        where = f" matching {args.pattern!r}" if args.pattern else ""
        print(f"hfactory presets: no presets{where}", file=sys.stderr)
        return 1 if args.pattern else 0
    print("\n".join(names))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print or write the spec's JSON Schema."""
    from .atomic import atomic_path
    from .spec.schema import spec_json_schema_text

    text = spec_json_schema_text()
    if args.out:
        with atomic_path(Path(args.out)) as tmp:  # a checked-in file: never left half-written
            tmp.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Paired, interleaved timing against ``--vs timm:<name>`` (see :mod:`hfactory.bench`)."""
    spec = _load(args.spec)
    img_size = _img_size(args.img_size)
    if args.rounds < 5:
        raise ValueError(f"--rounds {args.rounds}: use at least 5 (the median of fewer is not robust)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    if args.vs is not None and (not args.vs.startswith("timm:") or len(args.vs) <= 5):
        raise ValueError(f"--vs {args.vs!r}: expected timm:<model name>, e.g. timm:poolformer_s12")
    import torch

    from .bench import bench, format_bench

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    result = bench(spec, vs=args.vs, batch=args.batch, img_size=img_size, train=args.train, rounds=args.rounds,
                   warmup=args.warmup, device=args.device or "cpu")
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfactory", description="Declarative hierarchical vision transformers. SPEC is a YAML path or a "
        "preset name (see `hfactory presets`).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "summary", help="per-stage table: grids, widths, params, GMACs, activation memory",
        description="Build the spec on the meta device (nothing is allocated) and print one row per stage: "
        "input/output grid, tokens, width, heads, depth, mixer, downsampler, parameters, GMACs per image "
        "(FlopCounterMode FLOPs/2 with math attention: conv and matmuls, as timm reports) and the activation "
        "memory of a training forward of --batch images (bytes of the distinct tensors autograd saves for "
        "backward, parameters excluded; fused attention). Then the head and the totals.")
    add_spec_argument(p)
    p.add_argument("--batch", type=int, default=1, help="images for the activation-memory estimate (default: 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "sweep", help="variants of a spec from a grid of changes, measured on the meta device",
        description="Every combination of the --grid values is a variant (keys: spec paths, '*' for every "
        "stage, or depth_scale / embedding_scale / pooling_stages for the scaling rule's fields). Prints one row per "
        "variant: parameters, GMACs, activation memory (as `summary`) and tokens per stage; --out DIR "
        "writes each variant's YAML, with its lineage.")
    add_spec_argument(p)
    p.add_argument("--grid", action="append", metavar="PATH=V1,V2", help="values of one key (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="images for the activation-memory estimate (default: 1)")
    p.add_argument("--out", help="directory for the variants' YAML files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("presets", help="list the preset names, one per line")
    p.add_argument("--pattern", help="shell wildcard filter, e.g. 'caformer*'")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("schema", help="print (or --out FILE write) the spec JSON Schema")
    p.add_argument("--out", help="file to write")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "bench", help="paired timing of a spec against a timm model",
        description="Time the spec's model (random weights, fp32) and, with --vs, a reference model in one "
        "process, interleaved: warm-up, then --rounds rounds each timing one call of each model, alternating "
        "which goes first. Prints images/s (median) of both and the speed ratio hfactory/reference (the "
        "median over rounds of reference time / hfactory time; > 1 means hfactory is faster). --train times "
        "forward + cross-entropy + backward steps instead of inference.")
    add_spec_argument(p)
    p.add_argument("--vs", metavar="timm:NAME", help="reference: timm.create_model(NAME, pretrained=False, "
                   "num_classes=<the spec's>)")
    p.add_argument("--batch", type=int, default=8, help="images per call (default: 8)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="input size: N or H W (default: the spec's)")
    p.add_argument("--train", action="store_true", help="time training steps (forward + backward)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds, >= 5 (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first (default: 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores available)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output (includes every round's time)")
    p.set_defaults(func=cmd_bench)

    try:
        from .train import cli as train_cli
    except ImportError:  # the train extra is not installed
        train_cli = None
    if train_cli is not None:
        train_cli.add_commands(sub)
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
    try:
        if getattr(args, "set", None):  # --set applies to every command that takes a spec
            args.spec_arg, args.spec = args.spec, _load(args.spec, args.set, sft=args.command in SFT_COMMANDS)
        return args.func(args)
    except QuietAbort as err:  # another process of a torchrun job failed and rank 0 printed why
        return err.status
    except (ValidationError, PlanError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"hfactory {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
