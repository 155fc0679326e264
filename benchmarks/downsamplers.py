"""Cost of each downsampler of the thesis study in the CAFormer-S18-like base at 224x224.

For every downsampler (``examples/caformer_s18_downsamplers.yaml`` with ``defaults.downsample``
swapped for stages 1-3, or ``stages.3.downsample`` for geme / att0, which the thesis uses for the
last pooling only), in a fresh subprocess each: parameters, GMACs per image
(:func:`hfactory.summary.count_macs`, FlopCounterMode FLOPs / 2, attention counted), the peak
resident-memory growth of the first train step (``ru_maxrss`` after minus before; the model and
the batch already exist); then, with every model in one process, ``--rounds`` interleaved rounds
(the order rotates each round) of one train step (forward + cross-entropy + backward) and one
inference forward (``torch.inference_mode``) per model, fp32, random init; ratios to the conv
base are medians of per-round ratios, so load changes on a shared machine hit every case alike.

Reproduce (from the repository root): ``.venv/bin/python benchmarks/downsamplers.py`` (prints a
Markdown table; ``--batch``, ``--rounds``, ``--threads``, ``--only avg,geme``).
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
EXAMPLE = ROOT / "examples" / "caformer_s18_downsamplers.yaml"
CONV_INIT = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1, "pre_norm": True,
             "norm": {"kind": "layernorm", "eps": 1e-6, "bias": False}}
#: name -> (spec path to change, value)
CASES = {
    "conv (base)": None,
    "avg": ("defaults.downsample", {"kind": "avg"}),
    "max": ("defaults.downsample", {"kind": "max"}),
    "rand_conv": ("defaults.downsample", {"kind": "rand_conv"}),
    "sp_lin": ("defaults.downsample", {"kind": "sp_lin"}),
    "sp_mlp": ("defaults.downsample", {"kind": "sp_mlp"}),
    "rand": ("defaults.downsample", {"kind": "rand"}),
    "geme (stage 3)": ("stages.3.downsample", {"kind": "geme"}),
    "att0 nn (stage 3)": ("stages.3.downsample", {"kind": "att0"}),
    "att0 ss (stage 3)": ("stages.3.downsample", {"kind": "att0", "assignment": "soft", "last_assignment": "soft"}),
    "att0 hh (stage 3)": ("stages.3.downsample", {"kind": "att0", "assignment": "hard", "last_assignment": "hard"}),
    "att0 ns + conv init (stage 3)": ("stages.3.downsample", {"kind": "att0", "last_assignment": "soft",
                                                             "clusters_init": CONV_INIT}),
}


def build(case: str):
    from hfactory import load_spec
    from hfactory.encoder import build_encoder

    spec = load_spec(EXAMPLE)
    if CASES[case] is not None:
        path, value = CASES[case]
        data = spec.model_dump(mode="json", exclude_none=True)
        if path == "defaults.downsample":
            data["defaults"]["downsample"] = value
        else:
            data["stages"][3]["downsample"] = value
        spec = load_spec(data)
    return spec, build_encoder


def train_step(model, x, y) -> None:
    import torch.nn.functional as F

    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def static(case: str, batch: int, threads: int) -> dict:
    """Child process: parameters, GMACs, peak RSS growth of the first train step."""
    import torch

    from hfactory.summary import count_macs

    torch.set_num_threads(threads)
    spec, build_encoder = build(case)
    with torch.device("meta"):
        macs = count_macs(build_encoder(spec), torch.empty(1, 3, 224, 224))["total"]
    torch.manual_seed(0)
    model = build_encoder(spec)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, x, y)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"params": sum(p.numel() for p in model.parameters()), "gmacs": macs / 1e9, "peak_bytes": peak}


def timed(cases: list[str], batch: int, rounds: int, threads: int) -> dict:
    """All models in this process, timed in interleaved rounds (the order rotates every round), so
    that load changes on a shared machine hit every case alike; ratios are per round."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {}
    for case in cases:
        spec, build_encoder = build(case)
        models[case] = build_encoder(spec)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    return interleaved_train_infer(models, x, y, rounds, train_step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated case names (prefix match)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.case is not None:
        print(json.dumps(static(args.case, args.batch, args.threads)))
        return 0
    cases = [c for c in CASES if args.only is None or any(c.startswith(o) for o in args.only.split(","))]
    load0 = load_average()
    info = {}
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--batch", str(args.batch), "--threads",
                              str(args.threads)], capture_output=True, text=True, cwd=ROOT, check=True)
        info[case] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {case}: measured", file=sys.stderr)
    times = timed(cases, args.batch, args.rounds, args.threads)
    load1 = load_average()

    base = "conv (base)" if "conv (base)" in cases else None
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, "
          f"{machine_line(args.threads)}; no GPU; `torch.set_num_threads({args.threads})`; batch {args.batch} at 224x224, fp32; {args.rounds} interleaved "
          "rounds after one warm-up call of each model")
    print(f"- Load average (1/5/15 min) at start {load0}, at end "
          f"{load1} (other jobs share this machine)")
    print()
    print("| downsampler | params | GMACs/img | train step, median (min-max) | / base | inference, median "
          "(min-max) | / base | peak RSS growth, 1st train step |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cases:
        t, i, r = times[c]["train"], times[c]["infer"], info[c]
        if base:
            rt = statistics.median(a / b for a, b in zip(t, times[base]["train"]))
            ri = statistics.median(a / b for a, b in zip(i, times[base]["infer"]))
            rel_t, rel_i = f"{rt:.2f}", f"{ri:.2f}"
        else:
            rel_t = rel_i = "-"
        print(f"| {c} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.3f} | {1e3 * statistics.median(t):,.0f} ms "
              f"({1e3 * min(t):,.0f}-{1e3 * max(t):,.0f}) | {rel_t} | {1e3 * statistics.median(i):,.0f} ms "
              f"({1e3 * min(i):,.0f}-{1e3 * max(i):,.0f}) | {rel_i} | {r['peak_bytes'] / 1e6:,.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
