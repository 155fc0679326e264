"""``hfactory export``: an encoder as a ``torch.export`` program (``.pt2``) or ONNX
(:mod:`hfactory.export`). The parser is torch-free; torch is imported when an export runs."""

from __future__ import annotations

import argparse

from .args import add_spec_argument, load_spec_arg, parse_img_size

__all__ = ["add_commands", "cmd_export"]


def add_commands(sub) -> None:
    """Add ``export`` to the ``hfactory`` subparsers:
    ``hfactory export SPEC --format onnx|pt2 [--dynamic batch|batch,hw] [--out FILE]
    [--img-size H W] [--weights DIR] [--no-check]``."""
    from ..export import DYNAMIC_OPTIONS, FORMATS

    p = sub.add_parser(
        "export", help="export an encoder as a torch.export program (.pt2) or ONNX",
        description="Trace the encoder with torch.export (dynamic batch; with --dynamic batch,hw also any "
        "image size the plan accepts), check the graph at other sizes, and write it. Prints the sizes "
        "the written graph accepts. ONNX uses torch.onnx.export(..., dynamo=True) (pip install "
        "'hfactory[export]').")
    add_spec_argument(p)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="pt2: torch.export program (torch.export.load reads it); onnx: ONNX (dynamo exporter)")
    p.add_argument("--dynamic", default="batch", choices=[",".join(d) for d in DYNAMIC_OPTIONS],
                   help="dynamic dimensions: batch (default), or batch,hw for any image size the plan allows "
                   "(multiples of the stride product; refused, naming the reason, for specs whose plan fixes "
                   "the size)")
    p.add_argument("--out", help="file to write (default: <spec name>.pt2 / .onnx in the current folder)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="example image size N or H W traced "
                   "(default: the spec's img_size); with --dynamic batch, the only size the graph takes")
    p.add_argument("--weights", metavar="DIR", help="a save_pretrained() directory of this spec whose weights "
                   "to export (default: freshly initialised weights)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the graph on fake tensors at the smallest and other accepted sizes")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export SPEC as :func:`hfactory.export.export_model` does, write ``--out`` and print what the
    graph accepts. Returns 0.

    Raises:
        UsageError / PlanError / pydantic.ValidationError: as :func:`~hfactory.export.export_model`;
            also ``--weights`` saved for another spec, or an ``--img-size`` of not one or two sizes.
    """
    from ..errors import UsageError
    from ..export import SUFFIXES, export_model

    spec = load_spec_arg(args.spec)
    model = spec
    if args.weights:
        from ..encoder import from_pretrained
        from ..io import spec_hash

        model = from_pretrained(args.weights)
        if spec_hash(model.spec) != spec_hash(spec):
            raise UsageError(f"--weights {args.weights} holds a model of another spec ({model.spec.name!r}) than "
                             f"SPEC ({spec.name!r}); give the spec it was saved with (its spec.yaml)")
    out = args.out or f"{spec.name or 'encoder'}{SUFFIXES[args.format]}"
    result = export_model(model, format=args.format, dynamic=args.dynamic, img_size=parse_img_size(args.img_size),
                          path=out, check=not args.no_check)
    print(result.describe())
    return 0
