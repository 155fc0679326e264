"""Training under CPU contention: how much slower a training step gets when another process uses
the cores, for three thread settings (2 threads, 2 threads with ``OMP_WAIT_POLICY=PASSIVE``,
1 thread).

Each case runs in a fresh child process (so ``OMP_WAIT_POLICY`` is read when OpenMP starts):
the model of ``examples/digits_hybrid.yaml`` (the README's main job), batch 32, AdamW; a few
warm-up steps, then the median of ``--steps`` timed steps. The competitor is a separate process
that keeps one core busy with a pure-Python loop (it holds no lock torch waits on, like an
unrelated job). Ratio = the case's median step / the idle 2-thread median step (> 1: slower).

Usage (from the repository root; run it on an otherwise idle machine)::

    .venv/bin/python benchmarks/contention.py [--steps 20] [--competitors 1] [--write]

``--write`` appends the section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, append_results, load_average, machine_line

CHILD = r"""
import json, sys, time, statistics, torch, hfactory
torch.set_num_threads(int(sys.argv[1]))
steps, warmup = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
spec = hfactory.load_spec("examples/digits_hybrid.yaml")
model = hfactory.build_encoder(spec.with_changes({"num_classes": 10})).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, spec.in_chans, 32, 32)
y = torch.randint(0, 10, (32,))
times = []
for i in range(warmup + steps):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""

CASES = [("2 threads", 2, {}), ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
         ("1 thread", 1, {})]


def _spin(stop) -> None:
    """Keep one core busy until ``stop`` is set (pure Python: no OpenMP, no lock shared with torch)."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_case(threads: int, env: dict, steps: int, warmup: int) -> list[float]:
    child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    child_env.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(warmup)], cwd=ROOT,
                         env=child_env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--competitors", type=int, default=1, help="busy processes beside the contended runs")
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args()

    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
    results = {}
    for contended in (False, True):
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.competitors * contended)]
        for p in spinners:
            p.start()
        try:
            for label, threads, env in CASES:
                results[(label, contended)] = run_case(threads, env, args.steps, args.warmup)
                print(f"{label}, {'contended' if contended else 'idle'}: "
                      f"{statistics.median(results[(label, contended)]) * 1e3:.0f} ms", file=sys.stderr)
        finally:
            stop.set()
            for p in spinners:
                p.join()

    base = statistics.median(results[(CASES[0][0], False)])
    rows = []
    for label, _, _ in CASES:
        cells = []
        for contended in (False, True):
            t = results[(label, contended)]
            med = statistics.median(t)
            cells.append(f"{med * 1e3:.0f} ms ({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}) | {med / base:.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    command = "`.venv/bin/python benchmarks/contention.py " + " ".join(sys.argv[1:]) + "`"
    text = "\n".join([
        "## Training under CPU contention (thread settings)",
        "",
        "One training step (forward, cross-entropy, backward, AdamW) of `examples/digits_hybrid.yaml`'s "
        "model, batch 32 at 32x32, each case in a fresh process: median of "
        f"{args.steps} steps after {args.warmup} warm-up steps (min-max in parentheses); *contended* = "
        f"{args.competitors} other process(es) each keeping one core busy (a pure-Python loop). "
        "Ratio = median step / the idle 2-thread median.",
        "",
        f"Reproduce (from the repository root): {command}",
        "",
        f"- Date: {started}",
        f"- Machine: {len(os.sched_getaffinity(0))} CPUs, {machine_line(2)} (threads per row below); no GPU",
        f"- Load average (1/5/15 min) at start {load_start}, at end {load_average()}",
        "",
        "| threads | idle: median step | ratio | contended: median step | ratio |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
