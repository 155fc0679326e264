"""Wall-clock time and peak memory of ``hfactory summary`` on a ~700M-parameter all-attention
spec (4 stages, widths 256/512/1024/2048, depths 2/6/36/4, 224x224; roughly hiera_huge-sized),
as a markdown snippet.

Each command runs in a fresh subprocess; its peak RSS is the child's ``ru_maxrss``. The
baseline is a process that only imports torch and ``hfactory.encoder`` (what any summary pays),
so "summary - baseline" is what building and measuring the model on the meta device costs.
The fp32 weights alone would be 2.6 GiB: a peak far below that shows nothing was allocated.

Usage (from the repository root)::

    .venv/bin/python benchmarks/summary_large.py [--batch 8] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys

from common import ROOT, append_results, load_average, machine_line

#: The spec, shared with tests/test_cli.py.
LARGE = ROOT / "benchmarks" / "specs" / "large_attention.yaml"

_MEASURE = """\
import json, resource, subprocess, sys, time
tick = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - tick
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "stdout": proc.stdout, "stderr": proc.stderr[-2000:],
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure(command: list[str]) -> dict:
    """Run ``command`` in a child of a fresh helper process; wall time and the child's peak RSS."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="--batch of the summary (activation memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the snippet to benchmarks/RESULTS.md")
    args = parser.parse_args()

    spec = LARGE
    load_start = load_average()
    started = _dt.datetime.now(_dt.timezone.utc)
    base = [measure([sys.executable, "-c", "import torch, hfactory.encoder"]) for _ in range(args.repeats)]
    runs = [measure([sys.executable, "-m", "hfactory", "summary", str(spec), "--batch", str(args.batch), "--json"])
            for _ in range(args.repeats)]
    load_end = load_average()
    for r in runs:
        if r["rc"] != 0:
            raise SystemExit(f"summary failed: {r['stderr']}")
    summary = json.loads(runs[-1]["stdout"])
    text_run = measure([sys.executable, "-m", "hfactory", "summary", str(spec), "--batch", str(args.batch)])

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    import torch

    wall = med([r["wall_s"] for r in runs])
    rss = med([r["maxrss_kib"] for r in runs]) / 1024
    base_wall = med([r["wall_s"] for r in base])
    base_rss = med([r["maxrss_kib"] for r in base]) / 1024
    inner = med([json.loads(r["stdout"])["seconds"] for r in runs])
    lines = [
        "## hfactory summary of a ~700M-parameter spec (meta device)",
        "",
        "`hfactory summary large_attention.yaml` for 4 stages of global attention, widths 256/512/1024/2048, "
        f"depths 2/6/36/4, 224x224 (the spec is `benchmarks/specs/large_attention.yaml`), `--batch {args.batch}`. Each "
        "command runs in a fresh process; peak RSS is the process's `ru_maxrss`; the baseline process only "
        f"imports torch and `hfactory.encoder`. Median of {args.repeats}.",
        "",
        "Reproduce (from the repository root): `.venv/bin/python benchmarks/summary_large.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {len(os.sched_getaffinity(0))} CPUs, {machine_line(torch.get_num_threads())}; no GPU; "
        f"Python {platform.python_version()}",
        f"- Load average (1/5/15 min) at start {load_start}, at end "
        f"{load_end} (other jobs share this machine)",
        "",
        "| params | fp32 weights | GMACs | act. memory (batch "
        f"{args.batch}) | summary wall-clock | of which build + count | peak RSS | baseline (import only) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['total']['params']:,} | {summary['param_bytes'] / 2**30:.2f} GiB | {summary['total']['gmacs']:.1f} | "
        f"{summary['total']['activation_bytes'] / 2**20:.0f} MiB | {wall:.2f} s | {inner:.2f} s | {rss:.0f} MiB | "
        f"{base_wall:.2f} s, {base_rss:.0f} MiB |",
        "",
        "```",
        text_run["stdout"].rstrip(),
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        print(f"appended to {append_results(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
