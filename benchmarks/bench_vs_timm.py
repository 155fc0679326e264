"""Paired hfactory-vs-timm numbers for a spec: GMACs counted the same way, then ``hfactory bench``
timing (inference and training step), as a markdown snippet.

GMACs: :func:`hfactory.summary.count_macs` (FlopCounterMode FLOPs / 2, math attention) on the
meta device, for the spec's model and for ``timm.create_model(NAME, device="meta")``, in this
process. Timing: :func:`hfactory.bench.bench` (both models in this process, warm-up, then
interleaved rounds alternating which model goes first; ratio = paired median of timm time /
hfactory time, > 1 means hfactory is faster).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_vs_timm.py                       # poolformer_s12, prints
    .venv/bin/python benchmarks/bench_vs_timm.py --rounds 9 --write    # append to RESULTS.md
    .venv/bin/python benchmarks/bench_vs_timm.py --spec examples/poolformer_s12.yaml --vs poolformer_s12
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys

from common import ROOT, append_results, cpus, load_average, machine_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="examples/poolformer_s12.yaml")
    parser.add_argument("--vs", default="poolformer_s12", help="timm model name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=cpus())
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    parser.add_argument("--write", action="store_true", help="append the snippet to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import timm
    import torch

    import hfactory
    from hfactory.bench import bench
    from hfactory.summary import count_macs, summarize

    torch.set_num_threads(args.threads)
    spec = hfactory.load_spec(ROOT / args.spec)
    ours = summarize(spec)
    ref = timm.create_model(args.vs, pretrained=False, num_classes=spec.num_classes, device="meta")
    h, w = spec.img_hw
    ref_macs = count_macs(ref, torch.empty(1, spec.in_chans, h, w, device="meta"))["total"]
    ref_params = sum(p.numel() for p in ref.parameters())

    load_start = load_average()
    started = _dt.datetime.now(_dt.timezone.utc)
    runs = [("inference", bench(spec, vs=f"timm:{args.vs}", batch=args.batch, rounds=args.rounds, warmup=args.warmup))]
    if not args.no_train:
        runs.append(("train step", bench(spec, vs=f"timm:{args.vs}", batch=args.batch, rounds=args.rounds,
                                         warmup=args.warmup, train=True)))
    load_end = load_average()

    ref_key = f"timm:{args.vs}"
    lines = [
        f"## hfactory bench: {args.spec} vs timm {args.vs}",
        "",
        f"`hfactory bench {args.spec} --vs timm:{args.vs} --batch {args.batch} --rounds {args.rounds} "
        f"--threads {args.threads}` (and `--train`): both models built in one process (random init, fp32, "
        f"{h}x{w}, batch {args.batch}), {args.warmup} warm-up calls each, then {args.rounds} rounds timing one call "
        "of each, alternating which goes first. Ratio = median over rounds of (timm time / hfactory time) of the "
        "same round: > 1 means hfactory is faster. Inference under `torch.inference_mode()` in eval mode; a "
        "train step is zero_grad + forward + cross-entropy + backward (no optimizer step). GMACs: "
        "`hfactory.summary.count_macs` (FlopCounterMode FLOPs / 2 on the meta device, conv/matmul only) on both "
        "models in the same process.",
        "",
        "Reproduce (from the repository root): `.venv/bin/python benchmarks/bench_vs_timm.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpus()} CPUs, {machine_line(args.threads)}; no GPU; `torch.set_num_threads({args.threads})`",
        f"- timm {timm.__version__}, Python {platform.python_version()}",
        f"- Load average (1/5/15 min) at start {load_start}, at end "
        f"{load_end} (other jobs share this machine)",
        "",
        "| | params | GMACs | hfactory | timm | ratio hfactory/timm |",
        "|---|---|---|---|---|---|",
        f"| counted | {ours['total']['params']:,} vs {ref_params:,} | {ours['total']['gmacs']:.4f} vs "
        f"{ref_macs / 1e9:.4f} | | | |",
    ]
    for mode, result in runs:
        m, r = result["models"]["hfactory"], result["models"][ref_key]
        lines.append(
            f"| {mode} | | | {m['images_per_s']:.2f} img/s ({m['median_s'] * 1e3:.0f} ms, "
            f"{m['min_s'] * 1e3:.0f}-{m['max_s'] * 1e3:.0f}) | {r['images_per_s']:.2f} img/s "
            f"({r['median_s'] * 1e3:.0f} ms, {r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}) | {result['ratio']:.3f} |")
    per_round = "; ".join(f"{mode}: " + ", ".join(f"{t_r / t_h:.2f}" for t_h, t_r in zip(
        res["models"]["hfactory"]["times_s"], res["models"][ref_key]["times_s"])) for mode, res in runs)
    lines += ["", f"Per-round ratios (timm time / hfactory time): {per_round}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        print(f"appended to {append_results(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
