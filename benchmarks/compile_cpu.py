"""CPU inference: eager vs ``torch.compile`` (Inductor, ``freezing=True``), hfactory vs timm, with
hfactory's token-wise projections on ``F.linear`` (the default) and on the opt-in oneDNN route
(``hfactory.optimize``): the "TokenLinear / compile matrix" of issue 15.

Per preset, in one process with the same weights (timm's random init converted into hfactory):
five callables, each under ``torch.inference_mode()`` in eval mode on the same batch: timm eager,
timm compiled, hfactory eager, hfactory compiled, hfactory+oneDNN compiled. Compiling happens
before timing (its seconds are reported). Then ``--rounds`` rounds time one call of each, the
order rotated every round; medians. Ratios are to **timm eager** (timm time / case time: > 1
faster), the reference a user of timm runs today.

Usage (from the repository root; run it on an otherwise idle machine)::

    .venv/bin/python benchmarks/compile_cpu.py [--presets swin_tiny_patch4_window7_224 caformer_s18]
        [--batch 8] [--rounds 7] [--write]

``--write`` appends the section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

from common import append_results, load_average, machine_line, twin_pair

DEFAULT = ["swin_tiny_patch4_window7_224", "caformer_s18", "hiera_tiny_224"]


def bench(name: str, batch: int, rounds: int) -> dict:
    import torch
    import torch._inductor.config as inductor

    import hfactory

    inductor.freezing = True  # constant-fold the weights into the graph (inference only)
    torch.manual_seed(0)
    ours, ref, size = twin_pair(name)
    ours.eval()
    ref.eval()
    onednn = hfactory.optimize(hfactory.create_model(name).eval())
    onednn.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    cases = {"timm eager": ref, "timm compiled": torch.compile(ref), "hfactory eager": ours,
             "hfactory compiled": torch.compile(ours), "hfactory+oneDNN compiled": torch.compile(onednn)}
    compile_s, outputs = {}, {}
    with torch.inference_mode():
        for label, m in cases.items():
            t = time.perf_counter()
            outputs[label] = m(x)
            compile_s[label] = time.perf_counter() - t
            m(x)  # second warm-up call
        ref_out = outputs["timm eager"]
        agree = {k: ((v - ref_out).abs().max() / ref_out.abs().max()).item() for k, v in outputs.items()}
        times = {k: [] for k in cases}
        order = list(cases)
        for r in range(rounds):
            k = r % len(order)
            for label in order[k:] + order[:k]:
                t = time.perf_counter()
                cases[label](x)
                times[label].append(time.perf_counter() - t)
    return {"preset": name, "times": times, "compile_s": compile_s, "agree": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
    results = []
    for name in args.presets:
        results.append(bench(name, args.batch, args.rounds))
        print(f"{name}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in results[-1]["times"].items()),
              file=sys.stderr, flush=True)
    labels = list(results[0]["times"])
    lines = [
        "## CPU inference: eager vs torch.compile (Inductor, freezing)",
        "",
        "Each preset against its timm twin in one process, same weights, eval under "
        f"`torch.inference_mode()`, batch {args.batch}, fp32. Compiled = `torch.compile(model)` with "
        "`torch._inductor.config.freezing = True`; *+oneDNN* = `hfactory.optimize(model)` (token-wise "
        f"projections as 1x1 oneDNN convolutions) before compiling. {args.rounds} rounds after 2 warm-up "
        "calls, order rotated every round; medians (min-max). Ratio = timm eager time / case time "
        "(> 1: faster than eager timm). First call = the first call's seconds (compilation included).",
        "",
        "Reproduce (from the repository root): `.venv/bin/python benchmarks/compile_cpu.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        f"- Date: {started}",
        f"- Machine: {machine_line(args.threads)}; no GPU",
        f"- Load average (1/5/15 min) at start {load_start}, at end {load_average()}",
        "",
        "| preset | case | median ms (min-max) | ratio to timm eager | first call s | max\\|diff\\|/max\\|ref\\| |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        base = statistics.median(r["times"]["timm eager"])
        for label in labels:
            t = r["times"][label]
            med = statistics.median(t)
            lines.append(f"| {r['preset']} | {label} | {med * 1e3:.0f} ({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}) "
                         f"| {base / med:.2f} | {r['compile_s'][label]:.1f} | {r['agree'][label]:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
