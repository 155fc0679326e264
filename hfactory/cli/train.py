"""``hfactory train`` and ``hfactory eval``: the command line of :mod:`hfactory.train.classify`.

Torch and the data libraries are imported when a command runs, not when the parser is built,
so ``hfactory summary``/``schema`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import UsageError
from ..train.config import TrainConfig, check_ranges
from .args import add_spec_argument, load_spec_arg, spec_argument_stem
from .run import add_run_options, config_from_args, finish_run, require_extras

__all__ = ["add_commands", "cmd_train", "cmd_eval"]

# (flag, TrainConfig field, type, help). Flags default to None so that we can tell which ones
# the user gave: on --resume, the rest come from the run's recorded config, not from defaults.
TRAIN_OPTIONS = [
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "images per optimizer step, global: under torchrun each of N "
     "processes takes its share (about 1/N) of every batch, so N processes train like one"),
    ("--lr", "lr", float, "peak learning rate of AdamW (after warmup, then cosine decay to 0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (not on biases, norms, position embeddings)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup length in epochs"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the training loss"),
    ("--layer-decay", "layer_decay", float, "layer-wise learning-rate decay for fine-tuning, e.g. 0.75 (MAE / "
     "Hiera recipes): layer i of L blocks (stem 0, head L+1) trains at lr * decay^(L+1-i) (default: off)"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this value (default: no clipping)"),
    ("--seed", "seed", int, "seed of initialisation, data order and augmentation"),
    ("--shift", "shift", float, "random translation of digits training images, as a fraction of the side"),
    ("--eval-batch-size", "eval_batch_size", int, "images per evaluation batch"),
    ("--workers", "workers", int, "DataLoader worker processes for ImageFolder data"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores available to the process)"),
    ("--device", "device", str, "torch device (default: cuda if available, else cpu)"),
    ("--stop-at-step", "stop_at_step", int, "stop after this many optimizer steps in total, leaving a "
     "checkpoint to --resume (the schedule still spans --epochs)"),
]


def add_commands(subparsers) -> None:
    """Add ``train`` and ``eval`` to the ``hfactory`` argparse subparsers."""
    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a spec on digits or an ImageFolder directory",
        description="Train a spec; the defaults train examples/digits_hybrid.yaml on the embedded digits data. "
        "Several processes: torchrun --nproc_per_node=N -m hfactory train SPEC ... (DDP, or FSDP2 with --fsdp; "
        "gloo on CPU, nccl on CUDA); --batch-size stays the global batch and only rank 0 prints and writes.")
    add_spec_argument(p)
    p.add_argument("--data", help=f"'digits' (scikit-learn's bundled 8x8 digits, fixed 80/20 split) or a "
                   f"directory with train/ and val/ ImageFolder subfolders (default: {defaults.data})")
    p.add_argument("--out", help="run directory (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from pretrained encoder weights (an hfactory "
                   "pretrain run directory, or a save_pretrained directory); the classifier keeps its init")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="SOURCE",
                   help="fine-tune: start from pretrained weights. Alone: the preset's timm weights (downloaded "
                   "into the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only). SOURCE: a weights file or "
                   "directory (timm format, an official Hiera checkpoint, an hfactory save), hf-hub:ORG/NAME or "
                   "timm:MODEL[.TAG]. The classifier follows the data's classes (a new one when they differ) and "
                   "ImageFolder preprocessing follows the weights' config")
    add_run_options(p, TRAIN_OPTIONS, defaults)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="test accuracy of a trained model (prints one JSON line)")
    p.add_argument("model", help="run directory (its model/ or checkpoint/) or a save_pretrained directory")
    p.add_argument("--data", help="'digits' or an ImageFolder directory (its val/ split is used); "
                   "default: the run's data, else digits")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for ImageFolder data (default: 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all available cores)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    """Train; exit 0 when done (or stopped by --stop-at-step), 1 on a non-finite loss, 130 on Ctrl-C.

    Under torchrun only rank 0 prints (and writes the run directory)."""
    spec = load_spec_arg(args.spec, any_kind=True)  # an encoder spec, or an SFT spec
    out = Path(args.out) if args.out else Path("runs") / (spec.name or spec_argument_stem(args))
    config = config_from_args(args, out, TrainConfig)
    require_extras(config.data, config.progress)
    from ..train.classify import train

    return finish_run(
        args, out, lambda: train(spec, out, config, resume=args.resume, init_from=args.init_from),
        lambda r: (f"test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs in {r['elapsed_s']:.1f}s; "
                   f"model saved to {out / 'model'}"))


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved model on the test split; prints ``{"test_accuracy": ..., ...}``.

    Raises:
        UsageError: out-of-range options, a model of another spec than its run, data whose class
            count differs from the model's; FileNotFoundError: no saved model.
    """
    from ..train.checkpoint import checked_model_dir, load_saved_model, read_run

    check_ranges(args, [("batch_size", args.batch_size >= 1, ">= 1"), ("workers", args.workers >= 0, ">= 0"),
                        ("threads", args.threads is None or args.threads >= 1, ">= 1")])
    model_dir = checked_model_dir(Path(args.model))
    run_config = (read_run(Path(args.model)) or {}).get("config", {})
    data_arg = args.data or run_config.get("data") or "digits"
    require_extras(data_arg, progress=False)

    import torch

    from ..train.classify import evaluate, pretrained_preprocessing
    from ..train.data import load_data

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_saved_model(model_dir).to(device)  # an encoder or an SFT, as its spec.yaml says
    # a run fine-tuned from pretrained weights is evaluated with the preprocessing it trained with
    preprocess = pretrained_preprocessing(model.spec, run_config.get("pretrained"))
    data = load_data(data_arg, model.spec.img_hw, model.spec.in_chans, preprocess)
    if data.num_classes != model.num_classes:
        raise UsageError(f"the data {data.name} has {data.num_classes} classes but the model predicts "
                         f"{model.num_classes}")
    metrics = evaluate(model, data.test, args.batch_size, args.amp, args.workers, device)
    print(json.dumps({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
                      "images": metrics["images"], "data": data.name, "model": str(model_dir)}))
    return 0
