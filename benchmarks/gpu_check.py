"""The GPU check of issue 15 (item 2): one script, one CUDA device, under 5 minutes, run blind.

For every preset (``hfactory.list_models()``):

1. **Equality with timm** (presets with a timm twin): timm's model with randomised weights
   (norm weights near 1, the rest N(0, 0.05): the tests' protocol) loaded into the hfactory preset
   (``hfactory.convert.from_timm_state_dict``); eval logits on 2 images at the preset's size.
   fp32 (TF32 off): ``max|hf - timm| / max|timm| <= 1e-3``. bf16 (both models cast): hfactory's
   distance to the fp32 reference is at most ``max(2 x timm's own bf16 distance, 2e-2)``.
2. **Backends agree** (every preset): the model under ``attention_backend`` ``xformers``, ``sdpa``
   and ``math``, fp32, forward logits and the gradient of a fixed projection of the logits with
   respect to the input; ``math`` is the reference (rel. 1e-3). Calls xformers cannot run fall
   back to SDPA with a warning; their number is reported.
3. **Kernels agree** (attention-level, the shapes hfactory produces: global, Hiera mask units,
   Swin windows with a learned per-head bias and with merged windows plus shift mask, a ``-inf``
   mask, a full MViT-style bias, a batch beyond the CUDA grid limit): xformers, SDPA and math in
   fp32 / fp16 / bf16 against float64 math, forward and backward (q, k, v and bias gradients).
   A backend passes when its error is within ``max(tol(dtype), 4 x the same-dtype math error)``.
   The same cases time xformers against SDPA, with and without a bias: the measurement behind
   ``hfactory.layers.attention.BIASED_CALLS_IN_AUTO``.
4. **Speed against timm**: inference (``eval``, ``inference_mode``) and a training step
   (``train``, ``zero_grad``, forward, cross-entropy, backward; no optimizer step), bf16 autocast,
   paired and interleaved rounds (as ``presets_vs_timm.py``), eager for every twin
   (``--quick``: three presets) and ``torch.compile``d for ``--compile`` presets.
5. **Peak memory at 1024x1024** for the Hiera and Swin presets: inference and a training step at
   batch 1 (bf16 autocast), hfactory's default backend against ``math`` and timm where timm builds
   that size.

Every preset and every check is wrapped on its own: an exception is recorded in the report and
the run goes on. A time budget (``--budget-s``) skips what would not fit, saying so. The report
(markdown: GPU, driver, CUDA, torch, timm, xformers, date, command) is rewritten after every
section to ``--out``, so a run cut short still leaves what it measured.

Exit status: 0 when every equality/agreement check passed (or was skipped); 1 when any failed or
raised; 0 with "no CUDA device" and nothing written when there is no CUDA device.

Usage (from the repository root)::

    .venv/bin/python benchmarks/gpu_check.py                       # all, about 4-5 minutes on an H100/H200
    .venv/bin/python benchmarks/gpu_check.py --quick               # about 1-2 minutes
    .venv/bin/python benchmarks/gpu_check.py --presets swin_tiny_patch4_window7_224 --out /tmp/swin.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "gpu_results.md"
HIERA_SWIN = ("hiera_tiny_224", "hiera_small_abswin_256", "sam2_hiera_tiny", "swin_tiny_patch4_window7_224",
              "swinv2_tiny_window8_256")
QUICK_SPEED = ("hiera_tiny_224", "swin_tiny_patch4_window7_224", "caformer_s18")
DEFAULT_COMPILE = ("hiera_tiny_224",)
TOL_FP32 = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown report (default: {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds, speed for 3 presets, compiled inference only, smaller kernel shapes")
    p.add_argument("--presets", nargs="+", default=None, help="preset names (space/comma separated; default: all)")
    p.add_argument("--compile", nargs="*", default=None,
                   help=f"presets timed under torch.compile too (default: {' '.join(DEFAULT_COMPILE)}; "
                        "none: --compile with no names)")
    p.add_argument("--batch", type=int, default=None, help="speed batch (default 32, --quick 16)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new work after this many seconds")
    p.add_argument("--skip", nargs="*", default=(), choices=("timm", "backends", "kernels", "speed", "memory"),
                   help="sections to leave out")
    p.add_argument("--dry-run-on-cpu", action="store_true",
                   help="run the script's logic on the CPU (for testing the script; numbers mean nothing)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ report

class Report:
    """Markdown sections, failures and errors; rewritten to ``path`` after every section."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header = path, header
        self.sections: list[tuple[str, list[str]]] = []
        self.failures: list[str] = []
        self.errors: list[str] = []

    def section(self, title: str, lines: list[str]) -> None:
        self.sections.append((title, lines))
        self.write()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"FAIL {what}", file=sys.stderr, flush=True)

    def error(self, what: str, exc: BaseException, counts_as_failure: bool) -> str:
        line = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        (self.failures if counts_as_failure else self.errors).append(line)
        print(f"ERROR {line}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return f"error: {type(exc).__name__}"

    def write(self, final: str | None = None) -> None:
        lines = ["## GPU check (benchmarks/gpu_check.py)", "", *self.header, ""]
        for title, body in self.sections:
            lines += [f"### {title}", "", *body, ""]
        lines += ["### Verdict", ""]
        if final:
            lines.append(final)
        else:
            lines.append("(run in progress or cut short: the sections above are what it measured)")
        if self.failures:
            lines += ["", "Failures:", *[f"- {f}" for f in self.failures]]
        if self.errors:
            lines += ["", "Errors outside the equality checks (recorded, not failures):",
                      *[f"- {e}" for e in self.errors]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def machine_header(torch, device, args, argv) -> list[str]:
    import timm

    from hfactory.layers import attention as attn

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            driver = "unknown (nvidia-smi not callable)"
    else:
        gpu, driver = "none: --dry-run-on-cpu (numbers mean nothing)", "n/a"
    try:
        import xformers
        xf = f"{xformers.__version__}, kernels {'load' if attn.xformers_available() else 'do NOT load'}"
    except Exception as e:
        xf = f"not importable ({type(e).__name__})"
    cmd = ".venv/bin/python benchmarks/gpu_check.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    return [
        f"- Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command (repository root): `{cmd}`",
        f"- GPU: {gpu}; driver {driver}; CUDA (torch build) {torch.version.cuda}; cuDNN "
        f"{torch.backends.cudnn.version() if device.type == 'cuda' else 'n/a'}",
        f"- torch {torch.__version__}, timm {timm.__version__}, xformers {xf}, Python {platform.python_version()}",
        f"- Host: {os.cpu_count()} CPUs; `BIASED_CALLS_IN_AUTO = {attn.BIASED_CALLS_IN_AUTO!r}`; fp32 checks with "
        f"TF32 off; budget {args.budget_s:.0f} s{'; --quick' if args.quick else ''}",
    ]


# ------------------------------------------------------------------ helpers

def randomize_(model, seed: int = 0):
    """Norm weights 1 + 0.1 N(0,1), every other parameter 0.05 N(0,1) (tests/reference_utils.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.copy_(1.0 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else 0.05 * noise)
    return model


def rel(a, b) -> float:
    """max|a - b| / max|b| in float64 (inf when shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def img_size(name: str) -> tuple[int, int]:
    from hfactory.presets import load_preset

    s = load_preset(name).img_size
    return (s, s) if isinstance(s, int) else tuple(s)


def build_pair(name: str, device):
    """(timm model, hfactory preset with timm's randomised weights), eval, on ``device``."""
    import timm
    import torch

    import hfactory
    from hfactory.convert import from_timm_state_dict

    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, pretrained=False))
    ours = hfactory.create_model(name)
    ours.load_state_dict(from_timm_state_dict(ref.state_dict(), ours), strict=True)
    return ref.to(device).eval(), ours.to(device).eval()


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None else (f"{x:.{digits}e}" if isinstance(x, float) else str(x))


# ------------------------------------------------------------------ 1. equality with timm

def check_timm(name, ref, ours, device, report) -> list[str]:
    import torch

    h, w = img_size(name)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        r32 = ref(x).float()
        e32 = rel(ours(x).float(), r32)
        ok32 = e32 <= TOL_FP32
        ref16, ours16 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
        t16, o16 = ref16(x.bfloat16()).float(), ours16(x.bfloat16()).float()
        e_t, e_o, e_pair = rel(t16, r32), rel(o16, r32), rel(o16, t16)
        ok16 = e_o <= max(2 * e_t, 2e-2)
        del ref16, ours16
    if not ok32:
        report.fail(f"{name}: fp32 logits differ from timm ({e32:.2e} > {TOL_FP32})")
    if not ok16:
        report.fail(f"{name}: bf16 logits {e_o:.2e} from fp32 timm, timm's own bf16 {e_t:.2e}")
    return [f"| {name} | {h}x{w} | {e32:.1e} {'ok' if ok32 else '**FAIL**'} | {e_o:.1e} | {e_t:.1e} | {e_pair:.1e} "
            f"| {'ok' if ok16 else '**FAIL**'} |"]


# ------------------------------------------------------------------ 2. backends agree on the model

def check_model_backends(name, ours, device, report, xformers_ok: bool) -> str:
    import torch

    from hfactory.layers import attention as attn

    h, w = img_size(name)
    x0 = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2)).to(device)
    results = {}
    fallbacks = 0
    backends = ["math", "sdpa"] + (["xformers"] if xformers_ok else [])
    proj = None
    for b in backends:
        x = x0.clone().requires_grad_(True)
        attn._warn_fallback.cache_clear()
        with warnings.catch_warnings(record=True) as caught, attn.attention_backend(b):
            warnings.simplefilter("always")
            torch.manual_seed(0)  # the same random masks for models that draw them (MAE)
            out = ours(x)
            out = out if isinstance(out, torch.Tensor) else out[0]
            if proj is None:
                proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
            (out.float() * proj).sum().backward()
        if b == "xformers":
            fallbacks = sum("cannot run this call" in str(c.message) for c in caught)
        results[b] = (out.detach().float(), x.grad.detach().float())
    ref_out, ref_grad = results["math"]
    cells = []
    for b in backends[1:]:
        eo, eg = rel(results[b][0], ref_out), rel(results[b][1], ref_grad)
        ok = eo <= TOL_FP32 and eg <= 10 * TOL_FP32
        if not ok:
            report.fail(f"{name}: {b} vs math (fp32) forward {eo:.1e}, input grad {eg:.1e}")
        cells.append(f"{eo:.1e} / {eg:.1e} {'ok' if ok else '**FAIL**'}")
    if not xformers_ok:
        cells.append("n/a (no xformers)")
    ours.zero_grad(set_to_none=True)
    return f"| {name} | {' | '.join(cells)} | {fallbacks if xformers_ok else '—'} |"


# ------------------------------------------------------------------ 3. kernels agree

def kernel_cases(quick: bool):
    """(name, B, H, M, N, D, bias kind) in SDPA terms; the shapes hfactory's layers produce."""
    s = 4 if quick else 1
    return [
        ("global (ViT-like), no bias", 8, 6, 197, 197, 64, None),
        ("Hiera mask units, no bias", 2048 // s, 2, 64, 64, 48, None),
        ("Swin window, learned per-head bias", 512 // s, 3, 49, 49, 32, "per_head_grad"),
        ("Swin shifted: merged windows + mask", 4, 64 * 3, 49, 49, 32, "merged_grad"),
        ("-inf mask (B,1,M,N)", 16, 4, 50, 50, 64, "mask"),
        ("MViT full bias (B,H,M,N)", 8, 2, 196, 49, 48, "full_grad"),
        ("batch beyond the grid (B=65536+)", 65536 + 64, 1, 16, 16, 64, None),
    ]


def make_bias(kind, b, h, m, n, device, dtype, g):
    import torch

    if kind is None:
        return None
    if kind == "per_head_grad":
        t = torch.randn(1, h, m, n, generator=g)
    elif kind == "merged_grad":
        t = torch.randn(1, h, m, n, generator=g) + torch.zeros(1, h, m, n).masked_fill(
            torch.rand(1, h, m, n, generator=g) < 0.2, -100.0)
    elif kind == "mask":
        t = torch.zeros(b, 1, m, n).masked_fill(torch.rand(b, 1, m, n, generator=g) < 0.3, float("-inf"))
        t[..., 0] = 0.0
    else:
        t = torch.randn(b, h, m, n, generator=g)
    t = t.to(device, dtype)
    return t.requires_grad_(True) if kind.endswith("_grad") else t


KERNEL_TOL = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 4e-2}


def run_kernel(backend, q, k, v, bias):
    """Forward output and gradients (q, k, v[, bias]) of sum(out * w) with a fixed w."""
    import torch

    from hfactory.layers import attention as attn

    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    if backend == "ref":
        out = attn.math_attention(q.double(), k.double(), v.double(), None if b is None else b.double())
    else:
        out = attn.attention(q, k, v, b, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
    leaves = [q, k, v] + ([b] if b is not None and b.requires_grad else [])
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return [out.detach()] + [g.detach() for g in grads]


def check_kernels(device, report, quick: bool, budget: Budget, xformers_ok: bool) -> tuple[list[str], list[str]]:
    import torch

    from hfactory.layers import attention as attn

    lines = ["| case | dtype | xformers (fwd / worst grad) | sdpa | math same dtype | xformers refused because |",
             "|---|---|---|---|---|---|"]
    timing = ["| case | dtype | fwd xformers ms | fwd sdpa ms | **sdpa/xformers** | fwd+bwd xformers ms "
              "| fwd+bwd sdpa ms | **sdpa/xformers** |", "|---|---|---|---|---|---|---|---|"]
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for case, b, h, m, n, d, kind in kernel_cases(quick):
        if device.type != "cuda" and b > 4096:
            b = 64  # dry run: keep the CPU run small
        for dtype in dtypes:
            if budget.left() < 30:
                lines.append(f"| {case} | {dtype} | skipped: time budget | | | |")
                continue
            dname = str(dtype).split(".")[-1]
            try:
                g = torch.Generator().manual_seed(4)
                q, k, v = (torch.randn(b, h, mm, d, generator=g).to(device, dtype) for mm in (m, n, n))
                bias = make_bias(kind, b, h, m, n, device, dtype, g)
                ref = run_kernel("ref", q, k, v, bias)
                errs = {}
                reason = attn.xformers_unsupported_reason(q, k, v, bias) if device.type == "cuda" else "no CUDA"
                for backend in ("xformers", "sdpa", "math"):
                    if backend == "xformers" and (not xformers_ok or reason is not None):
                        continue
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        got = run_kernel(backend, q, k, v, bias)
                    errs[backend] = (rel(got[0], ref[0]), max(rel(a, r) for a, r in zip(got[1:], ref[1:])))
                tol = max(KERNEL_TOL[dname], 4 * max(errs["math"]))
                cells = []
                for backend in ("xformers", "sdpa", "math"):
                    if backend not in errs:
                        cells.append("n/a")
                        continue
                    ef, eb = errs[backend]
                    ok = ef <= tol and eb <= 2 * tol
                    if not ok and backend != "math":
                        report.fail(f"kernels: {case} {dname}: {backend} fwd {ef:.1e} grad {eb:.1e} (tol {tol:.1e})")
                    cells.append(f"{ef:.1e} / {eb:.1e}{'' if ok else ' **FAIL**'}")
                if "grid" in case and device.type == "cuda" and (reason is None or "grid" not in reason):
                    report.fail(f"kernels: {case}: predicate did not refuse the batch ({reason})")
                lines.append(f"| {case} | {dname} | {' | '.join(cells)} | {reason or '—'} |")
                if device.type == "cuda" and dtype == torch.bfloat16 and "xformers" in errs and "grid" not in case:
                    timing.append(time_kernel(case, dname, q, k, v, bias, quick))
            except Exception as e:  # noqa: BLE001
                lines.append(f"| {case} | {dname} | {report.error(f'kernels {case} {dname}', e, True)} | | | |")
            finally:
                torch.cuda.empty_cache() if device.type == "cuda" else None
    return lines, timing


def cuda_ms(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls after 3 warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_kernel(case, dname, q, k, v, bias, quick) -> str:
    import torch

    from hfactory.layers import attention as attn

    reps = 10 if quick else 25
    row = {}
    for backend in ("xformers", "sdpa"):
        def fwd():
            with torch.no_grad():
                attn.attention(q, k, v, bias, backend=backend)

        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        bg = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)

        def fwd_bwd():
            attn.attention(qg, kg, vg, bg, backend=backend).sum().backward()

        row[backend] = (cuda_ms(fwd, reps), cuda_ms(fwd_bwd, reps))
    (xf, xb), (sf, sb) = row["xformers"], row["sdpa"]
    return (f"| {case} | {dname} | {xf:.3f} | {sf:.3f} | **{sf / xf:.2f}** | {xb:.3f} | {sb:.3f} "
            f"| **{sb / xb:.2f}** |")


# ------------------------------------------------------------------ 4. speed

def time_pair(calls: dict, rounds: int, warmup: int, device) -> dict:
    """Interleaved rounds, order alternating; wall seconds per call (synchronised)."""
    for _ in range(warmup):
        for c in calls.values():
            c()
    sync(device)
    times = {k: [] for k in calls}
    order = list(calls)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            t0 = time.perf_counter()
            calls[key]()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(name, ref, ours, device, batch, rounds, compile_infer, compile_train, budget, eager=True) -> list[str]:
    import torch
    import torch.nn.functional as F

    h, w = img_size(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, h, w, generator=g).to(device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def infer(m):
        def call():
            with torch.inference_mode(), amp():
                m(x)
        return call

    def step(m):
        def call():
            m.zero_grad(set_to_none=True)
            with amp():
                out = m(x)
            out = out if isinstance(out, torch.Tensor) else out[0]
            target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
            F.cross_entropy(out.float().flatten(1), target).backward()
        return call

    rows = []
    for mode, make, compiled in (("inference", infer, compile_infer), ("train step", step, compile_train)):
        for m in (ref, ours):
            m.train(mode == "train step")
        if eager:
            t = time_pair({"hf": make(ours), "timm": make(ref)}, rounds, 2, device)
            rows.append(f"| {name} | {mode} | eager | {batch / t['hf']:.3g} | {batch / t['timm']:.3g} "
                        f"| **{t['timm'] / t['hf']:.2f}** | |")
        if compiled and budget.left() > 60:
            try:
                c0 = time.perf_counter()
                ch, ct = torch.compile(ours), torch.compile(ref)
                make(ch)(), make(ct)()
                sync(device)
                ctime = time.perf_counter() - c0
                t = time_pair({"hf": make(ch), "timm": make(ct)}, rounds, 1, device)
                rows.append(f"| {name} | {mode} | torch.compile | {batch / t['hf']:.3g} | {batch / t['timm']:.3g} "
                            f"| **{t['timm'] / t['hf']:.2f}** | {ctime:.0f} s (both) |")
            except Exception as e:  # noqa: BLE001
                rows.append(f"| {name} | {mode} | torch.compile | error: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''} | | | |")
        elif compiled:
            rows.append(f"| {name} | {mode} | torch.compile | skipped: time budget | | | |")
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        m.eval()
    return rows


# ------------------------------------------------------------------ 5. memory at 1024

def peak_memory(name, device, report) -> list[str]:
    import timm
    import torch

    import hfactory
    from hfactory.layers import attention as attn

    if device.type != "cuda":
        return [f"| {name} | skipped: no CUDA | | | | | |"]
    x = torch.randn(1, 3, 1024, 1024, device=device)

    def measure(model, backend=None) -> tuple[float, float]:
        res = []
        for train in (False, True):
            model.train(train)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            ctx = attn.attention_backend(backend) if backend else contextlib.nullcontext()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
                if train:
                    out = model(x)
                    out = out if isinstance(out, torch.Tensor) else out[0]
                    out.float().sum().backward()
                else:
                    with torch.inference_mode():
                        model(x)
            sync(device)
            res.append((torch.cuda.max_memory_allocated(device) - base) / 2**30)
            model.zero_grad(set_to_none=True)
        return res[0], res[1]

    cells = []
    try:
        ours = hfactory.create_model(name, img_size=1024).to(device)
        for backend in (None, "math"):
            try:
                i, t = measure(ours, backend)
                cells.append(f"{i:.2f} / {t:.2f}")
            except torch.cuda.OutOfMemoryError:
                cells.append("out of memory")
        del ours
    except Exception as e:  # noqa: BLE001
        return [f"| {name} | {report.error(f'memory {name}', e, False)} | | |"]
    try:
        try:
            ref = timm.create_model(name, pretrained=False, img_size=1024)
        except TypeError:  # size-agnostic models (timm's HieraDet for sam2) take no img_size
            ref = timm.create_model(name, pretrained=False)
        ref = ref.to(device)
        i, t = measure(ref)
        cells.append(f"{i:.2f} / {t:.2f}")
        del ref
    except Exception as e:  # noqa: BLE001
        cells.append(f"n/a ({type(e).__name__})")
    torch.cuda.empty_cache()
    return [f"| {name} | {' | '.join(cells)} |"]


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); skipped, nothing written, exit 0")
        return 0
    import timm

    import hfactory
    from hfactory.layers import attention as attn

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run_on_cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    budget = Budget(args.budget_s)
    presets = hfactory.list_models()
    names = [n for item in (args.presets or presets) for n in item.split(",") if n]
    unknown = [n for n in names if n not in presets]
    if unknown:
        print(f"gpu_check: unknown presets {unknown}; known: {', '.join(presets)}", file=sys.stderr)
        return 2
    compile_names = set(DEFAULT_COMPILE if args.compile is None else args.compile)
    batch = args.batch or (16 if args.quick else 32)
    rounds = 5 if args.quick else 10
    xformers_ok = device.type == "cuda" and attn.xformers_available()
    report = Report(args.out, machine_header(torch, device, args, argv))
    skip = set(args.skip)

    # --- 3 first: cheap, and the evidence for the attention policy
    if "kernels" not in skip:
        try:
            lines, timing = check_kernels(device, report, args.quick, budget, xformers_ok)
        except Exception as e:  # noqa: BLE001
            lines, timing = [report.error("kernels", e, True)], []
        report.section("Attention kernels agree (xformers, SDPA, math vs float64; forward / worst gradient)", [
            "Relative error max|x - ref| / max|ref|; gradients of q, k, v and (learned biases) the bias. "
            "'n/a': not run (xformers missing or refusing; the reason is the predicate's).", "", *lines])
        if len(timing) > 2:
            report.section("Biased and unbiased attention: xformers vs SDPA (bf16, CUDA events, median)", [
                "Ratio > 1: xformers faster. This measures the `auto` policy: unbiased calls go to xformers, "
                f"biased ones to `BIASED_CALLS_IN_AUTO` (now {attn.BIASED_CALLS_IN_AUTO!r}); flip it if the "
                "biased rows favour xformers.", "", *timing])

    twins = [n for n in names if timm.is_model(n)]
    timm_rows = ["| preset | size | fp32 vs timm | bf16 vs fp32 timm | timm bf16 vs fp32 timm | hf bf16 vs timm bf16 "
                 "| bf16 |", "|---|---|---|---|---|---|---|"]
    back_rows = ["| preset | sdpa vs math (logits / input grad) | xformers vs math | calls xformers refused |",
                 "|---|---|---|---|"]
    speed_rows = ["| preset | mode | kind | hfactory img/s | timm img/s | **hf/timm** | compile time |",
                  "|---|---|---|---|---|---|---|"]
    speed_names = [n for n in twins if args.presets or not args.quick or n in QUICK_SPEED]
    for name in names:
        if budget.left() < 20:
            timm_rows.append(f"| {name} | skipped: time budget | | | | | |")
            continue
        print(f"[{budget.elapsed():5.0f} s] {name}", file=sys.stderr, flush=True)
        ref = ours = None
        try:
            if name in twins:
                ref, ours = build_pair(name, device)
            else:
                ours = hfactory.create_model(name).to(device).eval()
        except Exception as e:  # noqa: BLE001
            timm_rows.append(f"| {name} | {report.error(f'build {name}', e, True)} | | | | | |")
            continue
        if "timm" not in skip:
            if ref is None:
                timm_rows.append(f"| {name} | no timm twin | | | | | |")
            else:
                try:
                    timm_rows += check_timm(name, ref, ours, device, report)
                except Exception as e:  # noqa: BLE001
                    timm_rows.append(f"| {name} | {report.error(f'timm {name}', e, True)} | | | | | |")
        if "backends" not in skip and budget.left() > 20:
            try:
                back_rows.append(check_model_backends(name, ours, device, report, xformers_ok))
            except Exception as e:  # noqa: BLE001
                back_rows.append(f"| {name} | {report.error(f'backends {name}', e, True)} | | |")
        if "speed" not in skip and ref is not None and name in speed_names and budget.left() > 40:
            try:
                speed_rows += speed(name, ref, ours, device, batch, rounds, False, False, budget)
            except Exception as e:  # noqa: BLE001
                speed_rows.append(f"| {name} | {report.error(f'speed {name}', e, False)} | | | | | |")
        del ref, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "timm" not in skip:
        report.section("Equality with timm (eval logits, 2 images, randomised weights)", [
            f"fp32 passes at <= {TOL_FP32:g} (max|diff| / max|timm|, TF32 off); bf16 passes when hfactory's "
            "distance to fp32 timm is at most max(2 x timm's own bf16 distance, 2e-2).", "", *timm_rows])
    if "backends" not in skip:
        report.section("Attention backends agree on every preset (fp32, math is the reference)", back_rows)
    if "memory" not in skip:
        mem_rows = ["| preset | hfactory default backend: inference / train step GiB | hfactory `math` | timm |",
                    "|---|---|---|---|"]
        for name in [n for n in HIERA_SWIN if n in names]:
            if budget.left() < 15:
                mem_rows.append(f"| {name} | skipped: time budget | | |")
                continue
            mem_rows += peak_memory(name, device, report)
        report.section("Peak memory at 1024x1024 (batch 1, bf16 autocast; peak minus memory before the call)",
                       mem_rows)
    if "speed" not in skip:  # compiled runs last: they take the longest and matter least if cut
        for name in [n for n in speed_names if n in compile_names]:
            if budget.left() < 60:
                speed_rows.append(f"| {name} | | torch.compile | skipped: time budget | | | |")
                continue
            try:
                ref, ours = build_pair(name, device)
                speed_rows += speed(name, ref, ours, device, batch, rounds, True, not args.quick, budget, eager=False)
                del ref, ours
            except Exception as e:  # noqa: BLE001
                speed_rows.append(f"| {name} | {report.error(f'compiled speed {name}', e, False)} | | | | | |")
        report.section(f"Speed against timm (bf16 autocast, batch {batch}, native size, {rounds} paired rounds)", [
            "img/s = batch / median seconds per call; **hf/timm** > 1: hfactory faster. Train step: forward, "
            "cross-entropy, backward, no optimizer step.", "", *speed_rows])
    verdict = (f"{'FAILED' if report.failures else 'passed'}: {len(report.failures)} failure(s), "
               f"{len(report.errors)} other error(s); {budget.elapsed():.0f} s.")
    report.write(verdict)
    print(f"gpu_check: {verdict} Report: {args.out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
