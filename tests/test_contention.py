"""Oversubscription is detected before training (issue 15): a process that keeps a core busy is
seen, and the warning names the cores and the flag that fits."""

import os
import subprocess
import sys

import pytest

from hfactory.train.contention import contention_warning, other_busy_cores

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


def test_a_busy_process_is_seen_and_warned_about():
    cores = len(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = other_busy_cores(1.0)
        assert busy is not None and busy >= 0.6, busy  # the spinning process holds about one core
        warning = contention_warning(cores, window_s=1.0)  # every core wanted: one is taken
    finally:
        hog.kill()
        hog.wait()
    assert warning is not None and f"of this process's {cores} CPU cores" in warning
    assert "--threads" in warning and "OMP_WAIT_POLICY=PASSIVE" in warning

