"""Oversubscription is detected before training (issue 15): a process that keeps a core busy is
seen, and the warning names the cores and the flag that fits."""

import os
import subprocess
import sys

import pytest

from hfactory.train.contention import contention_warning, other_busy_cores

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


def test_a_busy_process_is_seen_and_warned_about(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = other_busy_cores(1.0)
        assert busy is not None and busy >= 0.6, busy  # the spinning process holds about one core
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        warning = contention_warning(cores, window_s=1.0)  # every core wanted: one is taken
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        passive = contention_warning(cores, window_s=1.0)
    finally:
        hog.kill()
        hog.wait()
    assert warning is not None and f"of this process's {cores} CPU cores" in warning
    assert "--threads" in warning and "set OMP_WAIT_POLICY=PASSIVE" in warning
    # already sleeping threads: the warning says what remains to do, not to set the variable
    assert passive is not None and "--threads" in passive and "set OMP_WAIT_POLICY" not in passive



def test_training_commands_let_openmp_threads_sleep_unless_told_otherwise(monkeypatch, capsys):
    """``hfactory train/pretrain/eval`` set OMP_WAIT_POLICY=PASSIVE (measured: no cost idle, 1.6x
    instead of 3x slower beside a busy core; benchmarks/contention.py) before torch starts, and
    keep a value the user set; other commands leave the environment alone."""
    from hfactory.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["summary", "no_such_preset_or_file"]) == 2
    assert "OMP_WAIT_POLICY" not in os.environ
    assert main(["train", "no_such_preset_or_file"]) == 2  # bad input, after the environment is set
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["eval", "no_such_run_dir"]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
