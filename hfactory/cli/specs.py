"""The commands that read specs without training: ``summary``, ``sweep``, ``presets``, ``schema``.

Measurements happen on the meta device; torch is imported when a command runs, not when the
parser is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from .args import add_spec_argument, load_spec_arg

__all__ = ["add_commands", "cmd_summary", "cmd_sweep", "cmd_presets", "cmd_schema"]


def add_commands(sub) -> None:
    """Add ``summary``, ``sweep``, ``presets`` and ``schema`` to the ``hfactory`` subparsers."""
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
        "writes each variant's YAML, with its lineage; --plot FILE draws parameters against GMACs with the Pareto "
        "front (and, with --bench, CPU images/s of one image).")
    add_spec_argument(p)
    p.add_argument("--grid", action="append", metavar="PATH=V1,V2", help="values of one key (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="images for the activation-memory estimate (default: 1)")
    p.add_argument("--out", help="directory for the variants' YAML files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE", help="plot parameters (millions) against GMACs with the Pareto front "
                   "to FILE (.svg, .png or .pdf)")
    p.add_argument("--bench", action="store_true", help="also time each variant: one image on the CPU, random "
                   "weights (images/s; colours the --plot points and adds a params-vs-speed panel)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("presets", help="list the preset names, one per line")
    p.add_argument("--pattern", help="shell wildcard filter, e.g. 'caformer*'")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("schema", help="print (or --out FILE write) the spec JSON Schema")
    p.add_argument("--out", help="file to write")
    p.set_defaults(func=cmd_schema)


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the per-stage table (or ``--json``): grids, tokens, widths, heads, depth, mixer,
    downsampler, parameters, GMACs and activation memory, measured on the meta device."""
    from ..models import kind_of

    spec = load_spec_arg(args.spec, any_kind=True)
    kind = kind_of(spec)  # encoder or SFT: the table knows how each is summarised
    summary = kind.summarize(spec, batch=args.batch)
    print(json.dumps(summary, indent=2) if args.json else kind.format_summary(summary))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """One row per variant of the --grid combinations (params, GMACs, activations, tokens; with
    ``--bench`` images/s, see :func:`hfactory.sweep.bench_rows`); ``--plot FILE`` draws params
    against GMACs with the Pareto front (:func:`hfactory.sweep.plot_sweep`).

    Raises:
        UsageError: no ``--grid``, or one key given twice; a ``--plot`` file not ending in .svg,
            .png or .pdf (checked before measuring; see also :func:`hfactory.sweep.sweep`).
    """
    from ..sweep import PLOT_FORMATS, bench_rows, format_sweep, parse_grid, plot_sweep, sweep, write_variants

    if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:  # before any measuring
        raise UsageError(f"--plot {args.plot!r}: use a file ending in one of {', '.join(PLOT_FORMATS)}")
    if not args.grid:
        raise UsageError("give at least one --grid PATH=V1,V2,... (e.g. --grid stages.2.depth=6,9,12)")
    grid: dict = {}
    for text in args.grid:
        path, values = parse_grid(text)
        if path in grid:
            raise UsageError(f"--grid {path} is given twice; put all its values in one --grid {path}=V1,V2,...")
        grid[path] = values
    rows = sweep(load_spec_arg(args.spec), grid, batch=args.batch)
    if args.bench:
        rows = bench_rows(rows)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "spec"} for r in rows], indent=2))
    else:
        print(format_sweep(rows))
    if args.out:
        paths = write_variants(rows, Path(args.out))
        print(f"wrote {len(paths)} variant specs to {args.out}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_sweep(rows, args.plot)}", file=sys.stderr)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """Print the preset names (one per line) matching ``--pattern``; exit 1 when a pattern
    matches nothing."""
    from ..presets import list_models

    names = list_models(args.pattern)
    if not names:
        where = f" matching {args.pattern!r}" if args.pattern else ""
        print(f"hfactory presets: no presets{where}", file=sys.stderr)
        return 1 if args.pattern else 0
    print("\n".join(names))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print or write the spec's JSON Schema."""
    from ..atomic import atomic_path
    from ..spec.schema import spec_json_schema_text

    text = spec_json_schema_text()
    if args.out:
        with atomic_path(Path(args.out)) as tmp:  # a checked-in file: never left half-written
            tmp.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
