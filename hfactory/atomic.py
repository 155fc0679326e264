"""Atomic file writes: nothing half-written is ever visible under the final name.

Write to a temporary file in the target's directory (same filesystem), then ``os.replace`` it
onto the target, which POSIX guarantees to be atomic. A writer killed mid-write leaves the
previous file intact and at most a stray ``.<name>.*.tmp`` file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


def _current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``);
    elsewhere by setting and restoring it (a moment in which another thread's new files would get
    0o022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
