"""``hfactory pretrain``: the command line of :mod:`hfactory.train.pretrain` (sparse MAE)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train.config import PretrainConfig
from .args import add_spec_argument, load_spec_arg, spec_argument_stem
from .run import add_run_options, config_from_args, finish_run, require_extras

__all__ = ["add_commands", "cmd_pretrain"]

# (flag, PretrainConfig field, type, help); default None as in TRAIN_OPTIONS (see config_from_args)
PRETRAIN_OPTIONS = [
    ("--epochs", "epochs", int, "pretraining epochs"),
    ("--batch-size", "batch_size", int, "images per optimizer step, global (shared by torchrun processes)"),
    ("--lr", "lr", float, "peak learning rate of AdamW (after warmup, then cosine decay to 0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (not on biases, norms, position embeddings, "
     "mask token)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup length in epochs"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this value (default: no clipping)"),
    ("--seed", "seed", int, "seed of initialisation, data order and masks"),
    ("--mask-ratio", "mask_ratio", float, "fraction of mask units hidden, in (0, 1) (default: the spec's "
     "mae.mask_ratio, else 0.6)"),
    ("--eval-batch-size", "eval_batch_size", int, "images per evaluation batch"),
    ("--workers", "workers", int, "DataLoader worker processes for ImageFolder data"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores available to the process)"),
    ("--device", "device", str, "torch device (default: cuda if available, else cpu)"),
    ("--stop-at-step", "stop_at_step", int, "stop after this many optimizer steps in total, leaving a "
     "checkpoint to --resume"),
]


def add_commands(subparsers) -> None:
    """Add ``pretrain`` to the ``hfactory`` argparse subparsers."""
    defaults = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain", help="sparse masked-autoencoder (MAE) pretraining of an MAE-compatible spec",
        description="Pretrain the encoder of SPEC (YAML path or preset name) as a sparse masked autoencoder "
        "(Hiera's MAE: masked mask units are deleted, not zeroed). The decoder, default mask ratio and loss come "
        "from the spec's mae: section (default: 8 blocks of width 512, 16 heads, mask ratio 0.6, normalised "
        "pixel targets). The spec must be MAE-compatible (hfactory.resolve(spec).mae_compatible): an "
        "incompatible one is refused, naming the first component that mixes tokens across mask units. "
        "Data, checkpoints, --resume, progress, --amp and torchrun (DDP, or FSDP2 with --fsdp) work as in "
        "hfactory train. Fine-tune with: hfactory train SPEC --init-from RUN_DIR.")
    add_spec_argument(p)
    p.add_argument("--data", help=f"'digits' or an ImageFolder directory with train/ and val/ (labels are "
                   f"ignored; default: {defaults.data})")
    p.add_argument("--out", help="run directory (default: runs/<spec name>_mae)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_run_options(p, PRETRAIN_OPTIONS, defaults)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain; exit 0 when done (or stopped by --stop-at-step), 1 on a non-finite loss, 130 on Ctrl-C."""
    spec = load_spec_arg(args.spec)
    out = Path(args.out) if args.out else Path("runs") / f"{spec.name or spec_argument_stem(args)}_mae"
    config = config_from_args(args, out, PretrainConfig)
    require_extras(config.data, config.progress)
    from ..train.pretrain import ENCODER_DIR, pretrain

    return finish_run(
        args, out, lambda: pretrain(spec, out, config, resume=args.resume),
        lambda r: (f"test reconstruction loss {r['test_loss']:.4f} after {r['epochs']} epochs in "
                   f"{r['elapsed_s']:.1f}s; encoder saved to {out / ENCODER_DIR}"))
