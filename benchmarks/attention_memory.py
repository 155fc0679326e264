"""Peak memory and time of one global-attention block: ``sdpa`` against ``math``.

Measures a real hfactory block (``build_encoder`` -> ``stages[0].blocks[0]``, width 64, one head
so ``dim_head`` = 64, batch 1, fp32, inference mode, 2 threads) at 3,136, 12,544 and 50,176
tokens (224, 448 and 896 pixel images at stride 4), with the backend forced through
``hfactory.attention_backend``.

Memory: every (backend, tokens) case runs in a fresh subprocess. After building the model and
the input and running one warm-up forward on a tiny 16x16 input (library and thread-pool
initialisation), it records ``ru_maxrss``, runs one forward at full size and records
``ru_maxrss`` again; the difference is the peak resident-memory increase caused by the forward.
The ``math`` backend is run only where its score matrix plus the softmax copy
(``2 * tokens**2 * 4`` bytes) plus 1 GiB fits in the available RAM with a 25 % margin; the
other cases are skipped with the reason recorded.

Time: one subprocess per size builds the block once, warms each backend up at full size and
then takes the median of several forwards, alternating the backend order every round
(interleaved, so drift on a shared machine hits both).

Usage::

    .venv/bin/python benchmarks/attention_memory.py            # print the markdown table
    .venv/bin/python benchmarks/attention_memory.py --write    # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_model, machine_line, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Attention memory (sdpa vs math)"
COMMAND = ".venv/bin/python benchmarks/attention_memory.py --write"

WIDTH, HEADS, STRIDE, BATCH = 64, 1, 4, 1
IMAGES = (224, 448, 896)                   # -> 3,136 / 12,544 / 50,176 tokens
REPS = {224: 21, 448: 7, 896: 5}           # timed forwards per backend
THREADS = 2
FLOAT_BYTES = 4
SAFETY = 1.25                              # math runs only if SAFETY * needed <= available
HEADROOM = 1 << 30                         # bytes on top of the score matrices
WARMUP_SIDE = 16                           # tiny warm-up input: 16x16 = 256 tokens


# --------------------------------------------------------------------------- helpers

def tokens_of(img: int) -> int:
    return (img // STRIDE) ** 2


def score_bytes(tokens: int) -> int:
    """The math backend's fp32 score matrix ``B*H*N*N``."""
    return BATCH * HEADS * tokens * tokens * FLOAT_BYTES


def math_needed_bytes(tokens: int) -> int:
    """Scores and the softmax output coexist in ``math_attention``; plus fixed headroom."""
    return 2 * score_bytes(tokens) + HEADROOM


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal not in /proc/meminfo")


def rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}" if n / div < 100 else f"{n / div:.0f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fits(tokens: int, available: int) -> tuple[bool, str]:
    need = math_needed_bytes(tokens)
    if SAFETY * need <= available:
        return True, ""
    return False, (f"skipped: needs ~{fmt_bytes(need)} (score matrix {fmt_bytes(score_bytes(tokens))} + softmax copy "
                   f"+ 1 GiB), {fmt_bytes(available)} available; a {int((SAFETY - 1) * 100)} % margin is required")


# --------------------------------------------------------------------------- child side

def build_block(img: int):
    import torch

    import hfactory

    torch.set_num_threads(THREADS)
    spec = {"img_size": img, "num_classes": 0,
            "stages": [{"embedding": WIDTH, "depth": 1, "num_heads": HEADS, "token_mixer": "attention",
                        "downsample": {"kind": "conv", "patch_size": STRIDE, "stride": STRIDE}}]}
    model = hfactory.build_encoder(spec).eval()
    block = model.stages[0].blocks[0]
    assert type(block.token_mixer).__name__ == "Attention", block.token_mixer
    return torch, hfactory, model, block


def forward(torch, hfactory, block, x, backend: str):
    with torch.inference_mode(), hfactory.attention_backend(backend):
        return block(x)


def child_memory(backend: str, img: int) -> dict:
    torch, hfactory, _model, block = build_block(img)
    side = img // STRIDE
    tiny = torch.randn(BATCH, WARMUP_SIDE, WARMUP_SIDE, WIDTH)
    forward(torch, hfactory, block, tiny, backend)               # library / thread-pool init
    x = torch.randn(BATCH, side, side, WIDTH)
    del tiny
    gc.collect()
    rss_before, before = rss_now_kib(), maxrss_kib()
    t0 = time.perf_counter()
    y = forward(torch, hfactory, block, x, backend)
    elapsed = time.perf_counter() - t0
    after = maxrss_kib()
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    return {"backend": backend, "img": img, "tokens": side * side, "maxrss_before_kib": before,
            "maxrss_after_kib": after, "rss_before_kib": rss_before, "peak_increase_kib": after - before,
            "first_forward_s": elapsed, "torch": torch.__version__, "threads": torch.get_num_threads()}


def child_time(img: int, backends: list[str], reps: int) -> dict:
    torch, hfactory, _model, block = build_block(img)
    side = img // STRIDE
    x = torch.randn(BATCH, side, side, WIDTH)
    outs = {}
    for b in backends:                                            # full-size warm-up, untimed
        outs[b] = forward(torch, hfactory, block, x, b)
    if len(outs) > 1:                                             # sanity: same block, same answer
        ref = outs[backends[0]]
        for b in backends[1:]:
            assert torch.allclose(outs[b], ref, atol=1e-4, rtol=1e-4), f"{b} disagrees with {backends[0]}"
    del outs
    times: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(reps):
        order = backends if r % 2 == 0 else backends[::-1]        # interleave, alternate order
        for b in order:
            t0 = time.perf_counter()
            forward(torch, hfactory, block, x, b)
            times[b].append(time.perf_counter() - t0)
    return {"img": img, "tokens": side * side, "times": times}


# --------------------------------------------------------------------------- parent side

def run_child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"rc={proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(ratio: float, token_ratio: float = 4.0) -> float:
    return math.log(ratio) / math.log(token_ratio) if ratio > 0 else float("nan")


def collect(log=print) -> dict:
    import torch

    available = mem_available_bytes()
    facts = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__,
             "python": platform.python_version(), "mem_total": mem_total_bytes(), "mem_available": available,
             "threads": THREADS, "load_start": os.getloadavg(),
             "machine": machine_line(THREADS)}
    rows = []
    for img in IMAGES:
        n = tokens_of(img)
        math_ok, reason = fits(n, available)
        row = {"img": img, "tokens": n, "scores": score_bytes(n), "mem": {}, "time": {}, "skip": {}}
        backends = ["sdpa"] + (["math"] if math_ok else [])
        if not math_ok:
            row["skip"]["math"] = reason
        for b in backends:
            log(f"[memory] {b:4s} {n:6d} tokens ...", flush=True)
            res = run_child(["--case", b, str(img)], timeout=300)
            row["mem"][b] = res
            if "error" in res:
                log(f"         failed: {res['error']}")
            else:
                log(f"         peak +{res['peak_increase_kib'] / 1024:.1f} MiB, first forward "
                    f"{fmt_time(res['first_forward_s'])}")
        ok = [b for b in backends if "error" not in row["mem"][b]]
        if ok:
            log(f"[time]   {'/'.join(ok)} {n:6d} tokens, {REPS[img]} interleaved reps ...", flush=True)
            res = run_child(["--time", str(img), "--backends", ",".join(ok), "--reps", str(REPS[img])], timeout=420)
            if "error" in res:
                log(f"         failed: {res['error']}")
                row["time_error"] = res["error"]
            else:
                row["time"] = res["times"]
                log("         " + ", ".join(f"{b} median {fmt_time(statistics.median(t))}" for b, t in res["times"].items()))
        rows.append(row)
    facts["load_end"] = os.getloadavg()
    return {"facts": facts, "rows": rows}


def peak(row: dict, b: str):
    r = row["mem"].get(b)
    return None if r is None or "error" in r else r["peak_increase_kib"] * 1024


def table(data: dict) -> str:
    rows = data["rows"]
    head = ("| tokens (image) | math score matrix (fp32) | sdpa peak Δ | sdpa growth (exp.) | math peak Δ "
            "| math growth (exp.) | sdpa time, median (min–max) | math time, median (min–max) | sdpa / math time |")
    lines = [head, "|" + "|".join(["---"] * 9) + "|"]
    prev: dict[str, float] = {}
    for row in rows:
        cells = [f"{row['tokens']:,} ({row['img']} px)", fmt_bytes(row["scores"])]
        for b in ("sdpa", "math"):
            p = peak(row, b)
            if p is None:
                why = row["skip"].get(b) or (row["mem"].get(b) or {}).get("error", "not run")
                cells += ["—", "skipped" if b in row["skip"] else f"failed ({why})"]
            else:
                cells.append(fmt_bytes(p))
                if b in prev and prev[b] > 0:
                    ratio = p / prev[b]
                    cells.append(f"{ratio:.1f}x ({exponent(ratio):.2f})")
                else:
                    cells.append("—")
                prev[b] = p
        medians = {}
        for b in ("sdpa", "math"):
            t = row["time"].get(b)
            if t:
                medians[b] = statistics.median(t)
                cells.append(f"{fmt_time(medians[b])} ({fmt_time(min(t))}–{fmt_time(max(t))}, n={len(t)})")
            else:
                cells.append("—")
        cells.append(f"{medians['sdpa'] / medians['math']:.2f}" if len(medians) == 2 else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(data: dict) -> list[str]:
    out = []
    for row in data["rows"]:
        for b, why in row["skip"].items():
            out.append(f"- `{b}` at {row['tokens']:,} tokens {why}.")
        for b, r in row["mem"].items():
            if "error" in r:
                out.append(f"- `{b}` at {row['tokens']:,} tokens failed: {r['error']}.")
            else:
                slack = r["maxrss_before_kib"] - r["rss_before_kib"]
                if slack * 4 > max(r["peak_increase_kib"], 1):
                    out.append(f"- `{b}` at {row['tokens']:,} tokens: the high-water mark before the forward was "
                               f"{slack / 1024:.1f} MiB above the current RSS, so its peak Δ may be underestimated "
                               "by up to that much.")
    return out


def interpretation(data: dict) -> str:
    rows = data["rows"]
    sd = [(r["tokens"], peak(r, "sdpa")) for r in rows if peak(r, "sdpa")]
    ma = [(r["tokens"], peak(r, "math")) for r in rows if peak(r, "math")]
    parts = []
    if len(sd) >= 2:
        exps = [exponent(b[1] / a[1], b[0] / a[0]) for a, b in zip(sd, sd[1:])]
        overall = exponent(sd[-1][1] / sd[0][1], sd[-1][0] / sd[0][0])
        kind = "linear" if overall < 1.3 else ("quadratic" if overall > 1.7 else "between linear and quadratic")
        parts.append(
            f"The `sdpa` block's peak memory grows {sd[-1][0] // sd[0][0]}x from {sd[0][0]:,} to {sd[-1][0]:,} "
            f"tokens ({fmt_bytes(sd[0][1])} to {fmt_bytes(sd[-1][1])}; per-step exponents "
            f"{', '.join(f'{e:.2f}' for e in exps)}, overall {overall:.2f}, where 1 is linear and 2 quadratic), i.e. "
            f"{kind} in the token count, and at {sd[-1][0]:,} tokens it is "
            f"{sd[-1][1] / score_bytes(sd[-1][0]) * 100:.1f} % of the {fmt_bytes(score_bytes(sd[-1][0]))} score matrix "
            "the `math` path would have to materialise.")
    msg = []
    if len(ma) >= 2:
        e = exponent(ma[-1][1] / ma[-2][1], ma[-1][0] / ma[-2][0])
        kind = "quadratic" if e > 1.7 else ("linear" if e < 1.3 else "between linear and quadratic")
        msg.append(
            f"the `math` path's peak grows {ma[-1][1] / ma[-2][1]:.1f}x (exponent {e:.2f}, {kind}) from "
            f"{ma[-2][0]:,} to {ma[-1][0]:,} tokens and is {ma[-1][1] / score_bytes(ma[-1][0]):.2f}x its score matrix "
            "there, since scores and softmax output are alive together")
    ratios = [(r["tokens"], statistics.median(r["time"]["sdpa"]) / statistics.median(r["time"]["math"]))
              for r in rows if r["time"].get("sdpa") and r["time"].get("math")]
    if ratios:
        msg.append("`sdpa` takes " + " and ".join(f"{x:.2f}x the `math` time at {n:,} tokens" for n, x in ratios))
    if msg:
        text = "; ".join(msg)
        parts.append(text[0].upper() + text[1:] + ".")
    f = data["facts"]
    parts.append(
        f"Caveats: this is a shared {f['cpu_count']}-core machine (load average {f['load_start'][0]:.1f} at the start "
        f"and {f['load_end'][0]:.1f} at the end of the run), so absolute times are inflated and noisy (see the "
        "min–max spread) and only the interleaved sdpa/math ratios are comparable; `ru_maxrss` deltas are "
        "page-granular and include allocator effects, so the smallest sdpa delta"
        + (f" ({fmt_bytes(sd[0][1])}, mostly the block's linear activations)" if sd else "")
        + " is the least precise number.")
    return " ".join(parts)


def section(data: dict) -> str:
    f = data["facts"]
    body = [SECTION, "",
            "One global-attention block built by `hfactory.build_encoder` (`stages[0].blocks[0]`: LayerNorm, "
            f"`Attention` with {HEADS} head of width {WIDTH // HEADS}, MLP), channels-last input "
            f"`(1, H/4, W/4, {WIDTH})`, fp32, `torch.inference_mode()`, backend forced with "
            "`hfactory.attention_backend(...)`. Peak Δ = `ru_maxrss` after one full-size forward minus `ru_maxrss` "
            "just before it, each case in a fresh subprocess, after building the model and input and a warm-up "
            f"forward on a {WARMUP_SIDE}x{WARMUP_SIDE} input. Growth = peak Δ ratio to the previous size (tokens grow "
            "4x per step: linear ≈ 4x, quadratic ≈ 16x); exp. = log(ratio)/log(4). Time = median of interleaved "
            f"forwards ({', '.join(f'{tokens_of(i):,}: {REPS[i]}' for i in IMAGES)} per backend) after a full-size "
            "warm-up, one subprocess per size.",
            "",
            f"Reproduce (from the repository root): `{COMMAND}` (without `--write` it only prints).",
            "",
            f"- Date: {f['date']}",
            f"- Machine: {f['cpu_count']} CPUs, {f['machine']}; {fmt_bytes(f['mem_total'])} RAM "
            f"({fmt_bytes(f['mem_available'])} available at start), no GPU; `torch.set_num_threads({f['threads']})`",
            f"- Python {f['python']}",
            f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in f['load_start'])}, at end "
            f"{'/'.join(f'{x:.2f}' for x in f['load_end'])} (other jobs share this machine)",
            "", table(data), ""]
    n = notes(data)
    if n:
        body += n + [""]
    body += [interpretation(data), ""]
    return "\n".join(body)


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    # our section runs from its heading to the next level-2 heading (or the end of the file)
    pattern = re.compile(rf"^{re.escape(SECTION)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _m: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    write_results(new.rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"update the section in {RESULTS.name}")
    p.add_argument("--case", nargs=2, metavar=("BACKEND", "IMG"), help=argparse.SUPPRESS)
    p.add_argument("--time", type=int, metavar="IMG", help=argparse.SUPPRESS)
    p.add_argument("--backends", default="sdpa,math", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(child_memory(a.case[0], int(a.case[1]))))
        return 0
    if a.time:
        print(json.dumps(child_time(a.time, a.backends.split(","), a.reps)))
        return 0
    t0 = time.perf_counter()
    data = collect(log=lambda *s, **k: print(*s, file=sys.stderr, **k))
    text = section(data)
    print(text)
    print(f"(total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if a.write:
        write_section(text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    failed = any("error" in r for row in data["rows"] for r in row["mem"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
