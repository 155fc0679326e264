"""Time the README's main command and report its test accuracy, as a markdown snippet.

Runs ``hfactory train examples/digits_hybrid.yaml --out <DIR>`` (the README command, with the
run directory in a temporary folder unless ``--out`` is given) as a subprocess with the CLI
defaults, measures its wall-clock time from process start to exit (imports, data preparation,
training, per-epoch evaluation and checkpoints included), then reads the run's
``metrics.json`` and ``metrics.jsonl``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_digits.py            # prints the markdown snippet
    .venv/bin/python benchmarks/train_digits.py --out runs/digits-bench   # keep the run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_model, load_average, vector_extensions
SPEC = "examples/digits_hybrid.yaml"
TARGET = 0.98


def _hfactory_command() -> list[str]:
    """The ``hfactory`` console script next to this Python, else ``python -m hfactory``."""
    script = Path(sys.executable).parent / "hfactory"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hfactory"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run directory to create and keep (default: a temporary one)")
    args = parser.parse_args()

    import torch

    workdir = None if args.out else Path(tempfile.mkdtemp(prefix="hfactory-digits-"))
    out = Path(args.out) if args.out else workdir / "digits"
    command = _hfactory_command() + ["train", SPEC, "--out", str(out)]
    load_start = load_average()
    started = _dt.datetime.now(_dt.timezone.utc)
    tick = time.perf_counter()
    # The progress bar (stderr) is on, as for a user; it is discarded here.
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - tick
    load_end = load_average()
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr[-4000:], file=sys.stderr)
        print(f"command failed with exit code {proc.returncode}: {' '.join(command)}", file=sys.stderr)
        return 1
    final = json.loads((out / "metrics.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_ok = next((m for m in epochs if m["test_accuracy"] >= TARGET), None)
    rates = sorted(m["images_per_s"] for m in epochs)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)

    reached = (f"epoch {first_ok['epoch']} ({first_ok['elapsed_s']:.1f} s into training)" if first_ok
               else "not reached")
    device = (f"trained on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()  # the CLI's default device
              else "no GPU")
    correct = round(final["test_accuracy"] * final["test_images"])
    load = [load_start, load_end]
    row = [f"{wall:.1f} s", f"{final['elapsed_s']:.1f} s",
           f"{final['test_accuracy']:.2%} ({correct}/{final['test_images']})", f"{final['test_loss']:.4f}",
           reached, f"{rates[len(rates) // 2]:.0f}"]
    print(f"""## Digits training (README main command)

`hfactory train examples/digits_hybrid.yaml --out runs/digits` with the CLI defaults
({final['epochs']} epochs, {final['steps']} steps), {final['params']:,} parameters, scikit-learn digits
upsampled to 32x32, fixed split {final['train_images']} train / {final['test_images']} test images,
seed {final['seed']}. Wall-clock = the whole command (start-up, data preparation, training,
per-epoch evaluation and checkpoints, final save); training = the loop's own elapsed time.

Reproduce (from the repository root): `.venv/bin/python benchmarks/train_digits.py`

- Date: {started:%Y-%m-%d %H:%M} UTC
- Machine: {os.cpu_count()} CPUs ({cpu_model()}; {vector_extensions()}; torch CPU capability
  {torch.backends.cpu.get_cpu_capability()}), {device}; torch threads = CPUs available to the process
- torch {torch.__version__}, Python {platform.python_version()}
- Load average (1/5/15 min) at start {load[0]}, at end {load[1]} (other jobs may share this machine)

| wall-clock | training | final test accuracy | test loss | first epoch >= {TARGET:.0%} | train images/s (median of epochs) |
|---|---|---|---|---|---|
| {" | ".join(row)} |
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
