"""``hfactory diagram``: the architecture of a spec as a picture (:mod:`hfactory.diagram`),
drawn from its plan; torch is never imported."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_spec_argument, load_spec_arg, spec_argument_stem

__all__ = ["add_commands", "cmd_diagram"]


def add_commands(sub) -> None:
    """Add ``diagram`` to the ``hfactory`` subparsers."""
    p = sub.add_parser(
        "diagram", help="draw the architecture (stages, grids, widths, mixers, downsamplers) as SVG/PNG/PDF",
        description="Draw the spec's plan as a picture: stages left to right as boxes (grid, tokens, width, "
        "depth, mixer, downsampler, per-block overrides), an arrow into each stage labelled with its "
        "downsampler, and the token layout (grid, mask units, sequence) marked where it changes. Encoder "
        "specs only. Prints the path written.")
    add_spec_argument(p)
    p.add_argument("--out", metavar="FILE", help="output file, .svg (default: <spec name>.svg in the current "
                   "directory), .png or .pdf")
    p.set_defaults(func=cmd_diagram)


def cmd_diagram(args: argparse.Namespace) -> int:
    """Write the diagram of SPEC to ``--out`` (default ``<spec name>.svg``) and print its path.

    Raises:
        UsageError: an ``--out`` suffix other than .svg, .png, .pdf; an SFT spec (not drawn).
    """
    from ..diagram import check_path, draw
    from ..spec.model import EncoderSpec

    spec = load_spec_arg(args.spec, any_kind=True)
    if not isinstance(spec, EncoderSpec):
        from ..errors import UsageError

        raise UsageError(f"diagram draws encoder specs (with 'stages'), not a {type(spec).__name__} "
                         "(with 'levels'); use `hfactory summary` for it")
    out = check_path(args.out) if args.out else Path(f"{spec.name or spec_argument_stem(args)}.svg")
    draw(spec, out)
    print(out)
    return 0
