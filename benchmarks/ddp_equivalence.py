"""One process vs two (torchrun, DDP and FSDP2 on gloo): same weights and metrics, as markdown.

Trains ``examples/digits_hybrid.yaml`` with ``drop_path_rate: 0`` (stochastic-depth masks are
drawn per process, see hfactory/train/distributed.py) for ``--epochs`` epochs with the CLI
defaults otherwise (global batch 32, ``--shift 0.1`` on): once in one process, once under
``torchrun --standalone --nproc_per_node=2`` with DDP and once with ``--fsdp``. Reports the
largest absolute weight difference to the one-process run, the metrics, and the wall-clock of
each command (torchrun's start-up included; 2 processes on 2 cores share the CPU, so this is
not a speed-up measurement).

Usage (from the repository root)::

    .venv/bin/python benchmarks/ddp_equivalence.py [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, append_results, load_average, machine_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="append the snippet to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="hfactory-ddp-"))
    spec = work / "digits_hybrid_nodp.yaml"
    text = (ROOT / "examples" / "digits_hybrid.yaml").read_text(encoding="utf-8")
    spec.write_text(text.replace("drop_path_rate: 0.1", "drop_path_rate: 0.0"), encoding="utf-8")
    common = ["train", str(spec), "--epochs", str(args.epochs), "--no-progress"]
    runs = {
        "1 process": [sys.executable, "-m", "hfactory", *common, "--out", str(work / "single")],
        "2 processes, DDP": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "hfactory", *common, "--out", str(work / "ddp")],
        "2 processes, FSDP2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "hfactory", *common, "--fsdp", "--out", str(work / "fsdp")],
    }
    dirs = {"1 process": "single", "2 processes, DDP": "ddp", "2 processes, FSDP2": "fsdp"}
    load_start = load_average()
    started = _dt.datetime.now(_dt.timezone.utc)
    wall = {}
    for name, command in runs.items():
        tick = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall[name] = time.perf_counter() - tick
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    load_end = load_average()

    ref = load_file(str(work / "single" / "model" / "model.safetensors"))
    scale = max(v.abs().max().item() for v in ref.values())
    rows = []
    for name, sub in dirs.items():
        weights = load_file(str(work / sub / "model" / "model.safetensors"))
        diff = max((weights[k] - ref[k]).abs().max().item() for k in ref)
        m = json.loads((work / sub / "metrics.json").read_text())
        rows.append(f"| {name} | {diff:.2e} | {m['test_accuracy'] * 100:.2f}% | {m['test_loss']:.6f} | "
                    f"{m['steps']} | {wall[name]:.1f} s |")
    lines = [
        "## One process vs two (torchrun: DDP and FSDP2, gloo)",
        "",
        f"`hfactory train` of `examples/digits_hybrid.yaml` with `drop_path_rate: 0`, {args.epochs} epochs, CLI "
        "defaults (global batch 32, `--shift 0.1` on), in one process and under "
        "`torchrun --standalone --nproc_per_node=2` (DDP, then `--fsdp`). Weight difference = the largest absolute "
        f"difference of any weight to the one-process run (weights up to {scale:.2f} in magnitude). Wall-clock = "
        "the whole command, torchrun start-up included; two processes on two cores share the CPU, so this is not "
        "a speed-up measurement.",
        "",
        "Reproduce (from the repository root): `.venv/bin/python benchmarks/ddp_equivalence.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {len(os.sched_getaffinity(0))} CPUs, {machine_line(torch.get_num_threads())} in this "
        f"process (each torchrun process sets its own); no GPU; Python {platform.python_version()}",
        f"- Load average (1/5/15 min) at start {load_start}, at end "
        f"{load_end} (other jobs share this machine)",
        "",
        "| run | max weight difference | test accuracy | test loss | steps | wall-clock |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        print(f"appended to {append_results(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
