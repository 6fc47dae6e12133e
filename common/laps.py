"""Wall-clock sections of one process's loop, for ``bench_gpu.py --phases profile`` (issue #20).

    t = time.perf_counter()
    ...physics...
    t = LAPS.lap("physics", t)      # adds the time since t to "physics", returns now
    ...render...
    t = LAPS.lap("render", t)

``lap`` costs one ``perf_counter`` call (~0.1 us) when disabled and a dict update when enabled,
against milliseconds per env step. An env worker of the inference server enables the process's
``LAPS`` when the server profiles and publishes its running totals of ``WORKER_SECTIONS`` into
its shared-memory slot with every request, so a reader can take exact windows.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

# what an env worker's loop is split into (benchmarks/gpu_profile.py says what each one is)
WORKER_SECTIONS = ("physics", "evaluate", "reward", "render", "render_wait", "readback", "state", "reset",
                   "bookkeeping", "ipc_send", "wait_server", "segment_send")


class Laps:
    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def lap(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        if self.enabled:
            self.seconds[name] += t - t0
            self.counts[name] += 1
        return t

    def publish(self, seconds: np.ndarray, counts: np.ndarray, names=WORKER_SECTIONS):
        """Write the running totals of ``names`` into two arrays (e.g. a shared-memory slot)."""
        for i, k in enumerate(names):
            seconds[i], counts[i] = self.seconds.get(k, 0.0), self.counts.get(k, 0)

    def take(self) -> dict[str, list]:
        """{section: [seconds, count]} since the last ``take``; resets the counters."""
        out = {k: [self.seconds[k], self.counts[k]] for k in self.seconds}
        self.seconds.clear()
        self.counts.clear()
        return out


def merge(total: dict[str, list], part: dict[str, list]) -> dict[str, list]:
    """Add a ``take()`` dict into ``total`` (in place) and return it."""
    for k, (s, n) in part.items():
        acc = total.setdefault(k, [0.0, 0])
        acc[0] += s
        acc[1] += n
    return total


def minus(after: dict[str, list], before: dict[str, list]) -> dict[str, list]:
    """``after - before`` of two accumulated ``merge`` totals (a measurement window)."""
    return {k: [s - before.get(k, [0.0, 0])[0], n - before.get(k, [0.0, 0])[1]] for k, (s, n) in after.items()}


LAPS = Laps()  # one per process
