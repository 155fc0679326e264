"""``hfactory bench``: paired, interleaved timing against ``--vs timm:<name>`` (the method is
:mod:`hfactory.bench`'s)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import UsageError
from .args import add_spec_argument, load_spec_arg, parse_img_size

__all__ = ["add_commands", "cmd_bench"]


def add_commands(sub) -> None:
    """Add ``bench`` to the ``hfactory`` subparsers."""
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the spec (and the reference); every option is checked before a model is built.

    Raises:
        UsageError: ``--rounds`` < 5, ``--threads`` < 1, a ``--vs`` that is not ``timm:<name>``,
            a bad ``--img-size`` (and see :func:`hfactory.bench.bench`).
    """
    spec = load_spec_arg(args.spec)
    img_size = parse_img_size(args.img_size)
    if args.rounds < 5:
        raise UsageError(f"--rounds {args.rounds}: use at least 5 (the median of fewer is not robust)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    if args.vs is not None and (not args.vs.startswith("timm:") or len(args.vs) <= 5):
        raise UsageError(f"--vs {args.vs!r}: expected timm:<model name>, e.g. timm:poolformer_s12")
    import torch

    from ..bench import bench, format_bench

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    result = bench(spec, vs=args.vs, batch=args.batch, img_size=img_size, train=args.train, rounds=args.rounds,
                   warmup=args.warmup, device=args.device or "cpu")
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0
