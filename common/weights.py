"""The newest weight version a process has received, applied to its policy only at a boundary the
process chooses (between inference batches, action chunks or episodes): so that one chunk is
always sampled by one version. Thread-safe: a receiving thread offers, the control loop applies."""
from __future__ import annotations

import threading
from typing import Optional


class PendingWeights:
    def __init__(self, policy, version: int = -1):
        self.policy, self.version = policy, int(version)
        self.applied = 0
        self._pending: Optional[tuple[dict, int]] = None
        self._lock = threading.Lock()
        self._arrived = threading.Event()

    def offer(self, arrays: dict, version: int) -> None:
        """Keep ``arrays`` as the version to apply next (an older pending one is dropped)."""
        with self._lock:
            self._pending = (arrays, int(version))
        self._arrived.set()

    def apply(self) -> bool:
        """At a boundary: load the newest offered version, if one arrived since the last apply."""
        with self._lock:
            pending, self._pending = self._pending, None
            self._arrived.clear()
        if pending is None:
            return False
        self.policy.set_weights(pending[0])
        self.version = pending[1]
        self.applied += 1
        return True

    def wait(self, timeout_s: Optional[float]) -> bool:
        """Block until a version is pending (None: forever); True when one is."""
        return self._arrived.wait(timeout_s)
