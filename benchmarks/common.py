"""Shared by the scripts in ``benchmarks/``: machine facts for the reports, interleaved timing
rounds, and writing reports into ``benchmarks/RESULTS.md`` atomically.

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this folder is on ``sys.path``
and they import it as ``common``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def vector_extensions() -> str:
    """The CPU's vector extensions that decide kernel choice: ``avx2``, every ``avx512*`` and
    ``amx*`` flag in ``/proc/cpuinfo`` (``"avx2"`` alone on the AVX2-only EPYC), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = [f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))]
                return " ".join(sorted(keep)) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def machine_line(threads: int) -> str:
    """One line naming what a figure was measured on: CPU model, vector extensions, threads,
    torch version and date (UTC)."""
    import torch

    return (f"{cpu_model()} ({vector_extensions()}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), {threads} thread(s), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}")


def cpus() -> int:
    """CPUs this process may run on (its affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mem_gb() -> str:
    """``"24.7 GB RAM (21.3 GB available at start)"`` from ``/proc/meminfo``."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kb = lambda k: int(info[k].split()[0])  # noqa: E731
        return f"{kb('MemTotal') / 1e6:.1f} GB RAM ({kb('MemAvailable') / 1e6:.1f} GB available at start)"
    except (OSError, KeyError, ValueError):
        return "RAM unknown"


def load_average() -> str:
    """The 1/5/15-minute load average as ``"1.38/1.31/2.11"`` (other jobs on a shared machine)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def twin_pair(name: str):
    """``(hfactory model, timm model, (H, W))`` for a preset with a timm twin: timm's randomly
    initialised model (``pretrained=False``, after whatever seed the caller set) and the preset
    holding the same weights (``hfactory.convert.from_timm_state_dict``), both in train mode, and
    the preset's own image size."""
    import timm

    import hfactory
    from hfactory.convert import from_timm_state_dict

    ref = timm.create_model(name, pretrained=False)
    model = hfactory.create_model(name)
    model.load_state_dict(from_timm_state_dict(ref.state_dict(), model), strict=True)
    return model, ref, tuple(hfactory.load_preset(name).img_hw)


def interleaved_train_infer(models: dict, x, y, rounds: int, train_step) -> dict:
    """One warm-up call of each model (training step and inference), then ``rounds`` rounds in
    which every model runs one training step and then one inference call; the order of the
    models rotates by one every round so that none always runs first. Wall seconds per call:
    ``{case: {"train": [...], "infer": [...]}}``."""
    import torch

    cases = list(models)
    for m in models.values():  # warm-up
        train_step(m, x, y)
        with torch.inference_mode():
            m.eval()(x)
        m.train()
    times = {c: {"train": [], "infer": []} for c in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for c in order:
            t = time.perf_counter()
            train_step(models[c], x, y)
            times[c]["train"].append(time.perf_counter() - t)
        with torch.inference_mode():
            for c in order:
                models[c].eval()
                t = time.perf_counter()
                models[c](x)
                times[c]["infer"].append(time.perf_counter() - t)
                models[c].train()
    return times


def write_results(text: str) -> Path:
    """Replace ``benchmarks/RESULTS.md`` with ``text``, atomically (never half-written)."""
    from hfactory.atomic import atomic_path

    with atomic_path(RESULTS) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return RESULTS


def append_results(text: str) -> Path:
    """Append ``text`` (after a blank line) to ``benchmarks/RESULTS.md``, atomically."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    return write_results(old + "\n" + text)
