"""Every hfactory preset that reproduces a timm model, against that model on the CPU: inference
throughput and training-step time, measured paired and interleaved in one process (issue 4).

Per preset:

1. Build ``timm.create_model(NAME, pretrained=False)`` and ``hfactory.create_model(NAME)``, load
   timm's (random) weights into the hfactory model (``hfactory.convert.from_timm_state_dict``),
   so both compute the same function on the same numbers; one fixed batch of images
   (``--batch``, native resolution: 224, or 256 for ``hiera_small_abswin_256``) and labels.
   A sanity check compares the eval logits (printed as ``max|diff| / max|ref|``).
2. Inference: ``eval()`` under ``torch.inference_mode()``. Training step: ``train()``,
   ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward (no optimizer step).
3. For each of the two: ``--warmup`` calls of each model, then rounds timing one call of each,
   hfactory first in even rounds and timm first in odd ones (:func:`interleaved`).
4. Report medians over all rounds (no rounds dropped): images/s = batch / median seconds per
   call; inference ratio = hfactory img/s / timm img/s; training ratio = timm median step time /
   hfactory median step time. > 1 means hfactory is faster in both. Also printed: the paired
   ratio (median over rounds of that round's timm time / hfactory time) and the CPU-time ratio
   (timm / hfactory median ``time.process_time`` per call, all threads), which is less
   sensitive to the process being descheduled on a shared machine than wall-clock time.

Usage (from the repository root)::

    .venv/bin/python benchmarks/presets_vs_timm.py                          # all presets, prints
    .venv/bin/python benchmarks/presets_vs_timm.py --presets swin_tiny_patch4_window7_224 --rounds 3
    .venv/bin/python benchmarks/presets_vs_timm.py --write                  # RESULTS.md section

``--write`` replaces (or appends) the section ``## Presets vs timm (CPU)`` of
``benchmarks/RESULTS.md`` and leaves the other sections alone.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, cpu_model, load_average, mem_gb, twin_pair, vector_extensions, write_results

SECTION = "## Presets vs timm (CPU)"


def bench_preset(name: str, batch: int, rounds: int, train_rounds: int, warmup: int, control: bool = False) -> dict:
    """Build the pair, check the outputs agree, time inference and (train_rounds > 0) training.

    ``control``: an A/A run. The "hfactory" slot holds a deep copy of the timm model, so the two
    sides run identical code on identical weights and any ratio away from 1.0 is this machine's
    noise under this protocol (the band a real difference has to leave)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, ref, (size, width) = twin_pair(name)  # the preset's own size: 224, or 256 for *_256
    if control:
        model = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, width, generator=gen)
    # the classes the twin predicts (timm's SAM2 HieraDet has num_classes 0: pooled features)
    labels = torch.randint(0, ref.num_classes or ref.num_features, (batch,), generator=gen)
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

    out = {"preset": f"{name} (A/A control: timm vs timm)" if control else name, "size": size, "batch": batch,
           "logits_rel_diff": agree, "params": sum(p.numel() for p in model.parameters())}
    out["inference"] = interleaved({k: infer(m) for k, m in models.items()}, rounds, warmup)
    if train_rounds > 0:
        for m in models.values():
            m.train()
        out["train"] = interleaved({k: step(m) for k, m in models.items()}, train_rounds, warmup)
        for m in models.values():
            m.zero_grad(set_to_none=True)
    return out


def interleaved(calls: dict, rounds: int, warmup: int) -> dict:
    """``warmup`` calls of each, then ``rounds`` rounds timing one call of each, hfactory first in
    even rounds and timm first in odd ones. Wall seconds (``time.perf_counter``) and CPU seconds
    of the process (``time.process_time``, all threads) per call; paired ratio = median over
    rounds of timm wall time / hfactory wall time of the same round."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    order = list(calls)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            calls[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    per_round = sorted(t / h for h, t in zip(wall["hfactory"], wall["timm"]))
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {"times_s": wall, "cpu_s": cpu, "paired_ratio": statistics.median(per_round),
            "paired_iqr": (q1, q3)}


def _spread(times: list[float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(times) * scale)}–{fmt.format(max(times) * scale)}"


def _iqr(res: dict) -> str:
    """`` (q1–q3)`` of the per-round paired ratios (absent in runs recorded before it was kept)."""
    iqr = res.get("paired_iqr")
    return f" ({iqr[0]:.2f}–{iqr[1]:.2f})" if iqr else ""


def table(results: list[dict]) -> list[str]:
    lines = ["| preset | size | inference hfactory img/s | inference timm img/s | **ratio** hf/timm "
             "| paired | best-of | CPU-time | train step hfactory s | train step timm s | **ratio** timm/hf | paired "
             "| best-of | CPU-time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        row = f"| {r['preset']} | {r['size']} |"
        for mode, scale, fmt in (("inference", 1e3, "{:.0f}"), ("train", 1.0, "{:.2f}")):
            if mode not in r:
                row += " — | — | — | — | — | — |"
                continue
            t, c = r[mode]["times_s"], r[mode]["cpu_s"]
            hf, tm = statistics.median(t["hfactory"]), statistics.median(t["timm"])
            cpu_ratio = statistics.median(c["timm"]) / statistics.median(c["hfactory"])
            if mode == "inference":
                a, b = f"{r['batch'] / hf:.2f}", f"{r['batch'] / tm:.2f}"
                unit = " ms"
            else:
                a, b = f"{hf:.3f}", f"{tm:.3f}"
                unit = " s"
            row += (f" {a} ({_spread(t['hfactory'], scale, fmt)}{unit}) | {b} ({_spread(t['timm'], scale, fmt)}{unit}) "
                    f"| **{tm / hf:.3f}** | {r[mode]['paired_ratio']:.3f}{_iqr(r[mode])} "
                    f"| {min(t['timm']) / min(t['hfactory']):.3f} | {cpu_ratio:.3f} |")
        lines.append(row)
    return lines


INTRO = (
    "Every preset that reproduces a timm model against that model (`timm.create_model(name, "
    "pretrained=False)`), both in one process with the same weights (timm's random init loaded into "
    "hfactory with `from_timm_state_dict`), fp32, batch 8, native resolution (224, 256 for "
    "hiera_small_abswin_256). Inference: `eval()` under `torch.inference_mode()`; train step: `train()`, "
    "`zero_grad`, forward, cross-entropy, backward (no optimizer step). Warm-up calls of each model, then "
    "rounds that time one call of each, alternating which goes first. Medians of all rounds, none dropped "
    "(min–max in parentheses). **Ratio** = hfactory img/s / timm img/s (inference) and timm step time / "
    "hfactory step time (training): > 1 means hfactory is faster. *paired* = median over rounds of the "
    "same round's timm / hfactory wall time (with the rounds' interquartile range where recorded); *best-of* = "
    "timm's fastest call / hfactory's fastest call (the estimator `timeit` recommends: on a shared machine "
    "interference only adds time, so the minimum is the least disturbed); *CPU-time* = timm / hfactory "
    "median CPU time of the process per call (`time.process_time`, all threads), which a shared machine disturbs less than wall time "
    "(a descheduled process accrues no CPU time, though threads that spin at a barrier do). "
    "An *A/A control* row (`--control`) times timm against a deep copy of itself in the same protocol: "
    "identical code and weights, so its distance from 1.0 is the machine's noise. "
    "Script: `benchmarks/presets_vs_timm.py` (without `--write` it only prints)."
)


def _subsections(body: str) -> dict[str, str]:
    """``### `` subsections of the section body, by heading (text before the first one dropped)."""
    parts = re.split(r"^(### .*)$", body, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}


def write_section(heading: str, text: str, notes: str | None) -> None:
    """Put subsection ``heading`` (replacing one of that name) into the section, keep its other
    subsections, refresh the intro, and with ``notes`` replace ``### Interpretation``. Other
    sections of RESULTS.md are left as they are."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    subs = _subsections(found.group(1)) if found else {}
    subs[heading] = text.strip("\n")
    if notes is not None:
        subs["### Interpretation"] = notes.strip("\n")
    runs = sorted((h for h in subs if h != "### Interpretation"),
                  key=lambda h: -int(re.sub(r"\D", "", h) or 0))
    order = runs + (["### Interpretation"] if "### Interpretation" in subs else [])
    body = "\n\n".join([SECTION, INTRO] + [f"{h}\n\n{subs[h]}" for h in order]) + "\n"
    if found:
        new = old[:found.start()] + body + ("\n" + old[found.end():] if old[found.end():].strip() else "")
    else:
        new = old.rstrip("\n") + "\n\n" + body
    write_results(new.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=None,
                        help="preset names (space- or comma-separated; default: every preset that "
                             "timm also has)")
    parser.add_argument("--rounds", type=int, default=7, help="inference rounds (median of all)")
    parser.add_argument("--train-rounds", type=int, default=5, help="training-step rounds (0: skip training)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--control", action="store_true",
                        help="after each preset, an A/A row: timm against a deep copy of itself "
                             "(the noise band of this machine and protocol)")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw times here")
    parser.add_argument("--write", action="store_true",
                        help=f"write this run (a subsection per thread count) into '{SECTION}' of "
                             "benchmarks/RESULTS.md")
    parser.add_argument("--notes", type=Path, default=None,
                        help="with --write: markdown file that replaces the section's '### Interpretation'")
    args = parser.parse_args()

    import timm
    import torch

    from hfactory.presets import list_models

    torch.set_num_threads(args.threads)
    twins = [n for n in list_models() if timm.is_model(n)]  # presets that reproduce a timm model
    names = [n for item in (args.presets or twins) for n in item.split(",") if n]
    unknown = [n for n in names if n not in twins]
    if unknown:
        parser.error(f"no preset with a timm twin named {unknown}; known: {', '.join(twins)}")
    if args.write and (args.rounds < 5 or 0 < args.train_rounds < 5):
        parser.error("--write needs --rounds >= 5 and --train-rounds >= 5 (or 0)")

    load_start = load_average()
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"{name}: timing (load {load_average()})", file=sys.stderr, flush=True)
        r = bench_preset(name, args.batch, args.rounds, args.train_rounds, args.warmup)
        results.append(r)
        print("\n".join(table([r])[-1:]), f" logits rel diff {r['logits_rel_diff']:.1e}", flush=True)
        if args.control:
            r = bench_preset(name, args.batch, args.rounds, args.train_rounds, args.warmup, control=True)
            results.append(r)
            print("\n".join(table([r])[-1:]), flush=True)
    elapsed = time.perf_counter() - t0
    load_end = load_average()

    print()
    print("\n".join(table(results)))
    print(f"\n{elapsed / 60:.1f} min; load average {load_start} -> {load_end}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

    if args.write:
        cmd = ".venv/bin/python benchmarks/presets_vs_timm.py"
        if args.presets:
            cmd += " --presets " + " ".join(names)
        cmd += (f" --threads {args.threads} --rounds {args.rounds} --train-rounds {args.train_rounds} "
                f"--warmup {args.warmup}")
        if args.batch != 8:
            cmd += f" --batch {args.batch}"
        if args.control:
            cmd += " --control"
        cmd += " --write"
        heading = f"### {args.threads} thread{'s' if args.threads != 1 else ''}"
        lines = [
            f"`torch.set_num_threads({args.threads})`, {args.warmup} warm-up calls of each model, "
            f"{args.rounds} inference rounds, {args.train_rounds} training rounds, batch {args.batch}.",
            "",
            f"Reproduce (from the repository root): `{cmd}`",
            "",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC; the run took {elapsed / 60:.1f} min",
            f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}; {vector_extensions()}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), {mem_gb()}, no GPU",
            f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
            f"- Load average (1/5/15 min) at start {load_start}, at end {load_end} (other jobs share "
            f"this machine)",
            "",
            *table(results),
            "",
            "Logits agreement (eval, 2 images, max|diff| / max|ref|): "
            + ", ".join(f"{r['preset']} {r['logits_rel_diff']:.1e}" for r in results) + ".",
        ]
        notes = args.notes.read_text() if args.notes else None
        write_section(heading, "\n".join(lines), notes)
        print(f"wrote '{heading}' of '{SECTION}' to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
