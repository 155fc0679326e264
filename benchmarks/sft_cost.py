"""Cost of SFT (the thesis repo's iteratively refined hierarchical RAM) as levels and passes grow.

The geometry of the thesis's ImageNet ``no_rec/base-4`` config at 224x224 (patch 4: level grids
56^2 -> 32^2 -> 16^2 -> 8^2 -> 4^2, groups 7x7 then 8x8, 4x4 queries per group) at a quarter of its
widths (64, 128, 256, 512, 512; head width 32) and one self- plus one cross-attention block per
step, with the first ``L`` transitions (levels 0..L) and ``n_passes`` P. Each case in a fresh
subprocess: parameters, GMACs per image (:func:`hfactory.summary.count_macs`), peak resident-memory
growth of the first train step; then, all models in one process, ``--rounds`` interleaved rounds
(the order rotates each round) of one train step and one inference forward per model; ratios to
the first case are medians of per-round ratios.
A train step backpropagates ``cross_entropy(logits) + 1e-3 * sum(mean(level^2))`` over every level,
so that the codecs of a backward sweep (which the top level does not depend on when P is even)
are differentiated too.

Reproduce (from the repository root): ``.venv/bin/python benchmarks/sft_cost.py`` (prints a
Markdown table; ``--batch``, ``--rounds``, ``--threads``, ``--levels 1,2,3,4``, ``--passes 1,2,3``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import ROOT, interleaved_train_infer, load_average, machine_line
WIDTHS = [64, 128, 256, 512, 512]
GROUPS = [7, 8, 8, 8]


def sft_spec(levels: int, passes: int) -> dict:
    return {"name": f"sft_L{levels}_P{passes}", "img_size": 224, "patch_size": 4, "embedding": WIDTHS[0],
            "n_passes": passes, "num_classes": 1000,
            "levels": [{"group_size": GROUPS[i], "queries": 4, "embedding": WIDTHS[i + 1],
                        "num_heads": WIDTHS[i] // 32, "forward_layers": [1, 1]} for i in range(levels)]}


def train_step(model, x, y) -> None:
    import torch.nn.functional as F

    lv = model.forward_levels(x)
    loss = F.cross_entropy(model.forward_head(lv[-1].permute(0, 3, 1, 2)), y)
    (loss + 1e-3 * sum(t.square().mean() for t in lv)).backward()
    model.zero_grad(set_to_none=True)


def static(levels: int, passes: int, batch: int, threads: int) -> dict:
    """Child process: parameters, GMACs, peak RSS growth of the first train step."""
    import torch

    from hfactory.sft import build_sft
    from hfactory.summary import count_macs

    torch.set_num_threads(threads)
    spec = sft_spec(levels, passes)
    with torch.device("meta"):
        macs = count_macs(build_sft(spec), torch.empty(1, 3, 224, 224))["total"]
    torch.manual_seed(0)
    model = build_sft(spec)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, x, y)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    grids = " -> ".join(f"{lv.grid[0]}^2" for lv in model.plan.levels)
    return {"grids": grids, "params": sum(p.numel() for p in model.parameters()), "gmacs": macs / 1e9,
            "peak_bytes": peak}


def timed(cases: list[tuple[int, int]], batch: int, rounds: int, threads: int) -> dict:
    """All models in this process, timed in interleaved rounds (the order rotates every round)."""
    import torch

    from hfactory.sft import build_sft

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {c: build_sft(sft_spec(*c)) for c in cases}
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    return interleaved_train_infer(models, x, y, rounds, train_step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levels", default="1,2,3,4")
    ap.add_argument("--passes", default="1,2,3")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child: "L,P"
    args = ap.parse_args(argv)
    if args.case is not None:
        lv, p = (int(v) for v in args.case.split(","))
        print(json.dumps(static(lv, p, args.batch, args.threads)))
        return 0
    cases = [(int(lv), int(p)) for lv in args.levels.split(",") for p in args.passes.split(",")]
    load0 = load_average()
    info = {}
    for lv, p in cases:
        out = subprocess.run([sys.executable, __file__, "--case", f"{lv},{p}", "--batch", str(args.batch),
                              "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT, check=True)
        info[(lv, p)] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# L={lv} P={p}: measured", file=sys.stderr)
    times = timed(cases, args.batch, args.rounds, args.threads)
    load1 = load_average()

    first = cases[0]
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, "
          f"{machine_line(args.threads)}; no GPU; `torch.set_num_threads({args.threads})`; batch {args.batch} at 224x224, fp32; {args.rounds} interleaved "
          "rounds after one warm-up call of each model")
    print(f"- Load average (1/5/15 min) at start {load0}, at end "
          f"{load1} (other jobs share this machine)")
    print()
    print(f"| levels (grids) | passes | params | GMACs/img | train step, median (min-max) | / L={first[0]} P={first[1]} "
          "| inference, median | / L={} P={} | peak RSS growth, 1st train step |".format(*first))
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        t, i, r = times[c]["train"], times[c]["infer"], info[c]
        rt = statistics.median(a / b for a, b in zip(t, times[first]["train"]))
        ri = statistics.median(a / b for a, b in zip(i, times[first]["infer"]))
        print(f"| {c[0]} ({r['grids']}) | {c[1]} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.3f} | "
              f"{1e3 * statistics.median(t):,.0f} ms ({1e3 * min(t):,.0f}-{1e3 * max(t):,.0f}) | {rt:.2f} | "
              f"{1e3 * statistics.median(i):,.0f} ms | {ri:.2f} | {r['peak_bytes'] / 1e6:,.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
