"""Resident memory of a process: psutil when it is installed, else Linux's /proc/<pid>/status."""
from __future__ import annotations

from pathlib import Path

MIB = 2 ** 20


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB; NaN when it is gone or cannot be read."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss / MIB
        except psutil.Error:
            return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):  # "VmRSS:   123456 kB"
                return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")
