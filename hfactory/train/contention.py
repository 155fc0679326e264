"""Detect other processes using this process's CPU cores (oversubscription).

PyTorch's CPU ops run on OpenMP threads that, by default, busy-wait between parallel regions.
When another process takes cores the training threads were given, each parallel region waits
for a thread that is not running. Measured with ``benchmarks/contention.py`` (RESULTS.md,
"Training under CPU contention"; 2-core AMD EPYC, one other busy core): a 2-thread training step
was 2.95x slower with busy-waiting threads, 1.62x with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep
while they wait; as fast as busy-waiting on an idle machine there) and 1.56x with one thread.
So ``hfactory train``, ``pretrain`` and ``eval`` set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set
(:data:`TRAINING_OMP_ENV`, applied before torch is imported), and :func:`contention_warning`
measures and says what fits before training starts. Library users set the variable themselves,
before importing torch.

Linux only (``/proc``); elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import time
from typing import Optional

__all__ = ["other_busy_cores", "contention_warning", "TRAINING_OMP_ENV"]

#: What the training commands put in the environment (when unset) before torch starts OpenMP.
TRAINING_OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _cpu_jiffies(cores: set[int]) -> Optional[int]:
    """Busy jiffies (user+nice+system+irq+softirq+steal) summed over ``cores`` from /proc/stat."""
    try:
        lines = open("/proc/stat", encoding="ascii").read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name = line.split(maxsplit=1)[0]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            f = [int(v) for v in line.split()[1:9]]
            total += f[0] + f[1] + f[2] + f[5] + f[6] + f[7]  # user nice system irq softirq steal
    return total


def _own_jiffies() -> Optional[int]:
    """This process's CPU time (all threads, user + system) in jiffies, from /proc/self/stat."""
    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def other_busy_cores(window_s: float = 0.5) -> Optional[float]:
    """How many of this process's cores (its affinity) other processes kept busy during the next
    ``window_s`` seconds, in cores (0.0 = idle, 1.0 = one core fully used by others); None where
    /proc is not readable. This process sleeps meanwhile, so its own use is ~0 (and subtracted)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy0, own0 = _cpu_jiffies(cores), _own_jiffies()
    if busy0 is None or own0 is None or not cores:
        return None
    start = time.monotonic()
    time.sleep(window_s)
    busy1, own1 = _cpu_jiffies(cores), _own_jiffies()
    elapsed = time.monotonic() - start
    if busy1 is None or own1 is None:
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / tick / elapsed)


def contention_warning(threads: int, window_s: float = 0.5) -> Optional[str]:
    """A warning when other processes use the cores ``threads`` OpenMP threads need, else None.

    The threads fit when ``cores - busy_by_others >= threads - 0.5`` (half a core of slack for
    short-lived system work)."""
    busy = other_busy_cores(window_s)
    if busy is None:
        return None
    cores = len(os.sched_getaffinity(0))
    free = cores - busy
    if free >= threads - 0.5:
        return None
    fit = max(1, int(free + 0.5))
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    cost = ("expect it to be slower (1.6x with one busy core of two was measured)" if passive else
            "with OMP_WAIT_POLICY unset or ACTIVE they busy-wait: expect it to be several times slower (3x with "
            "one busy core of two was measured; set OMP_WAIT_POLICY=PASSIVE before starting for about 1.6x)")
    return (f"warning: other processes are using {busy:.1f} of this process's {cores} CPU cores, and training "
            f"runs {threads} OpenMP threads, which wait for each other; {cost}. Use --threads {fit} or stop the "
            "other work.")
