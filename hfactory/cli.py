"""The ``hfactory`` command line: summary | schema | train | eval.

Every command that takes a spec accepts a YAML path (or a preset name once presets exist).
Errors in the spec print the located message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from .spec.base import PlanError

__all__ = ["main"]


def _load(spec_arg: str):
    from .presets import resolve_spec_arg

    return resolve_spec_arg(spec_arg)


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the plan (one row per stage) and parameter counts, built on the meta device."""
    from .plan import resolve

    spec = _load(args.spec)
    plan = resolve(spec)
    import torch

    from .encoder import HierarchicalEncoder

    with torch.device("meta"):
        model = HierarchicalEncoder(spec, plan)
    per_stage = [sum(p.numel() for p in stage.parameters()) for stage in model.stages]
    total = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"plan": plan.model_dump(mode="json"), "params_per_stage": per_stage,
                          "params": total}, indent=2))
        return 0
    print(plan)
    print("params per stage: " + ", ".join(f"{n / 1e6:.3f}M" for n in per_stage))
    print(f"params total: {total:,} ({total / 1e6:.2f}M)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print or write the spec's JSON Schema."""
    from .spec.schema import spec_json_schema_text

    text = spec_json_schema_text()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfactory", description="Declarative hierarchical vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="print the resolved plan and parameter counts of a spec")
    p.add_argument("spec", help="spec YAML path or preset name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("schema", help="print (or --out FILE write) the spec JSON Schema")
    p.add_argument("--out", help="file to write")
    p.set_defaults(func=cmd_schema)

    try:
        from .train import cli as train_cli
    except ImportError:  # the train extra is not installed
        train_cli = None
    if train_cli is not None:
        train_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValidationError, PlanError, ValueError, FileNotFoundError) as err:
        print(f"hfactory {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
