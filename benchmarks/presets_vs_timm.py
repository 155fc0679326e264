"""Every hfactory preset against its timm twin on the CPU: inference throughput and training-step
time, measured paired and interleaved in one process (issue 4, performance).

Per preset:

1. Build ``timm.create_model(NAME, pretrained=False)`` and ``hfactory.create_model(NAME)``, load
   timm's (random) weights into the hfactory model (``hfactory.convert.from_timm_state_dict``),
   so both compute the same function on the same numbers; one fixed batch of images
   (``--batch``, native resolution: 224, or 256 for ``hiera_small_abswin_256``) and labels.
   A sanity check compares the eval logits (printed as ``max|diff| / max|ref|``).
2. Inference: ``eval()`` under ``torch.inference_mode()``. Training step: ``train()``,
   ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward (no optimizer step).
3. For each of the two: ``--warmup`` calls of each model, then rounds timing one call of each,
   hfactory first in even rounds and timm first in odd ones (:func:`hfactory.bench.paired_timing`).
4. Report medians over all rounds (no rounds dropped): images/s = batch / median seconds per
   call; inference ratio = hfactory img/s / timm img/s; training ratio = timm median step time /
   hfactory median step time. > 1 means hfactory is faster in both. The paired ratio (median
   over rounds of that round's timm time / hfactory time) is printed alongside.

Usage (from the repository root)::

    .venv/bin/python benchmarks/presets_vs_timm.py                          # all presets, prints
    .venv/bin/python benchmarks/presets_vs_timm.py --presets swin_tiny_patch4_window7_224 --rounds 3
    .venv/bin/python benchmarks/presets_vs_timm.py --write                  # RESULTS.md section

``--write`` replaces (or appends) the section ``## Presets vs timm (CPU)`` of
``benchmarks/RESULTS.md`` and leaves the other sections alone.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Presets vs timm (CPU)"
NATIVE = {"hiera_small_abswin_256": 256}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gb() -> str:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kb = lambda k: int(info[k].split()[0])  # noqa: E731
        return f"{kb('MemTotal') / 1e6:.1f} GB RAM ({kb('MemAvailable') / 1e6:.1f} GB available at start)"
    except (OSError, KeyError, ValueError):
        return "RAM unknown"


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def bench_preset(name: str, batch: int, rounds: int, train_rounds: int, warmup: int) -> dict:
    """Build the pair, check the outputs agree, time inference and (train_rounds > 0) training."""
    import timm
    import torch
    import torch.nn.functional as F

    import hfactory
    from hfactory.bench import paired_timing
    from hfactory.convert import from_timm_state_dict

    size = NATIVE.get(name, 224)
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False)
    model = hfactory.create_model(name)
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 1000, (batch,), generator=gen)
    models = {"hfactory": model, "timm": ref}

    for m in models.values():
        m.eval()
    with torch.inference_mode():
        a, b = model(images[:2]), ref(images[:2])
    agree = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    def infer(m):
        def call():
            with torch.inference_mode():
                m(images)
        return call

    def step(m):
        def call():
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(images), labels).backward()
        return call

    out = {"preset": name, "size": size, "batch": batch, "logits_rel_diff": agree,
           "params": sum(p.numel() for p in model.parameters())}
    res = paired_timing({k: infer(m) for k, m in models.items()}, batch, rounds, warmup)
    out["inference"] = {"times_s": res.times, "paired_ratio": res.ratio}
    if train_rounds > 0:
        for m in models.values():
            m.train()
        res = paired_timing({k: step(m) for k, m in models.items()}, batch, train_rounds, warmup)
        for m in models.values():
            m.zero_grad(set_to_none=True)
        out["train"] = {"times_s": res.times, "paired_ratio": res.ratio}
    return out


def _summary(r: dict) -> dict:
    """Medians and ratios of one preset's result."""
    s = {}
    inf = r["inference"]["times_s"]
    hf, tm = statistics.median(inf["hfactory"]), statistics.median(inf["timm"])
    s["inf"] = (r["batch"] / hf, r["batch"] / tm, tm / hf, r["inference"]["paired_ratio"],
                len(inf["hfactory"]))
    if "train" in r:
        tr = r["train"]["times_s"]
        hf, tm = statistics.median(tr["hfactory"]), statistics.median(tr["timm"])
        s["train"] = (hf, tm, tm / hf, r["train"]["paired_ratio"], len(tr["hfactory"]))
    return s


def _spread(times: list[float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(times) * scale)}–{fmt.format(max(times) * scale)}"


def table(results: list[dict]) -> list[str]:
    lines = ["| preset | size | inference hfactory img/s | inference timm img/s | ratio hf/timm (paired) "
             "| train step hfactory s | train step timm s | ratio timm/hf (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = _summary(r)
        ihf, itm, iratio, ipaired, n = s["inf"]
        inf = r["inference"]["times_s"]
        row = (f"| {r['preset']} | {r['size']} | {ihf:.2f} ({_spread(inf['hfactory'], 1e3)} ms) "
               f"| {itm:.2f} ({_spread(inf['timm'], 1e3)} ms) | **{iratio:.3f}** ({ipaired:.3f}) |")
        if "train" in s:
            thf, ttm, tratio, tpaired, _ = s["train"]
            tr = r["train"]["times_s"]
            row += (f" {thf:.3f} ({_spread(tr['hfactory'], 1, '{:.2f}')}) | {ttm:.3f} "
                    f"({_spread(tr['timm'], 1, '{:.2f}')}) | **{tratio:.3f}** ({tpaired:.3f}) |")
        else:
            row += " — | — | — |"
        lines.append(row)
    return lines


def write_section(text: str) -> None:
    """Replace the section (up to the next ``## `` heading) or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=None,
                        help="preset names (space- or comma-separated; default: all)")
    parser.add_argument("--rounds", type=int, default=7, help="inference rounds (median of all)")
    parser.add_argument("--train-rounds", type=int, default=5, help="training-step rounds (0: skip training)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw times here")
    parser.add_argument("--write", action="store_true", help=f"write '{SECTION}' into benchmarks/RESULTS.md")
    args = parser.parse_args()

    import timm
    import torch

    from hfactory.presets import list_models

    torch.set_num_threads(args.threads)
    names = [n for item in (args.presets or list_models()) for n in item.split(",") if n]
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {', '.join(list_models())}")
    if args.write and (args.rounds < 5 or 0 < args.train_rounds < 5):
        parser.error("--write needs --rounds >= 5 and --train-rounds >= 5 (or 0)")

    load_start = _load()
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"{name}: timing (load {_load()})", file=sys.stderr, flush=True)
        r = bench_preset(name, args.batch, args.rounds, args.train_rounds, args.warmup)
        results.append(r)
        print("\n".join(table([r])[-1:]), f" logits rel diff {r['logits_rel_diff']:.1e}", flush=True)
    elapsed = time.perf_counter() - t0
    load_end = _load()

    print()
    print("\n".join(table(results)))
    print(f"\n{elapsed / 60:.1f} min; load average {load_start} -> {load_end}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

    if args.write:
        cmd = ".venv/bin/python benchmarks/presets_vs_timm.py"
        if args.presets:
            cmd += " --presets " + " ".join(names)
        cmd += f" --rounds {args.rounds} --train-rounds {args.train_rounds} --warmup {args.warmup}"
        if args.batch != 8 or args.threads != 2:
            cmd += f" --batch {args.batch} --threads {args.threads}"
        cmd += " --write"
        lines = [
            SECTION, "",
            f"Every preset against its timm twin (`timm.create_model(name, pretrained=False)`), the two models "
            f"in one process with the same weights (timm's random init loaded into hfactory with "
            f"`from_timm_state_dict`), fp32, batch {args.batch}, native resolution, "
            f"`torch.set_num_threads({args.threads})`. Inference: `eval()` under `torch.inference_mode()`; "
            f"train step: `train()`, `zero_grad`, forward, cross-entropy, backward (no optimizer step). "
            f"{args.warmup} warm-up calls of each, then {args.rounds} inference rounds and "
            f"{args.train_rounds} training rounds, each timing one call of each model, alternating which "
            f"goes first. Medians of all rounds (min–max in parentheses). Ratio = hfactory img/s / timm "
            f"img/s (inference) and timm step time / hfactory step time (training): > 1 means hfactory is "
            f"faster; in parentheses the paired ratio (median over rounds of the same round's timm time / "
            f"hfactory time).",
            "",
            f"Reproduce (from the repository root): `{cmd}`",
            "",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC; full run {elapsed / 60:.1f} min",
            f"- Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {_mem_gb()}, no GPU",
            f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
            f"- Load average (1/5/15 min) at start {load_start}, at end {load_end} (other jobs share "
            f"this machine)",
            "",
            *table(results),
            "",
            "Per-preset logits agreement (eval, 2 images, max|diff| / max|ref|): "
            + ", ".join(f"{r['preset']} {r['logits_rel_diff']:.1e}" for r in results) + ".",
            "",
            "INTERPRETATION",
        ]
        write_section("\n".join(lines) + "\n")
        print(f"wrote '{SECTION}' to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
