"""Pacing a control loop at a fixed rate."""
from __future__ import annotations

import time
from typing import Callable


class RateKeeper:
    """``sleep()`` waits until one period has passed since the previous ``sleep()`` returned.

    Periods are measured from the previous wake-up, never caught up after a late step, so two
    commands are never closer than one period (the safety layer's rate limit then never trips on
    a paced loop). ``enabled=False`` (a simulated cell) runs as fast as the loop can.
    """

    def __init__(self, hz: float, enabled: bool = True, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.period = 1.0 / hz
        self.enabled = enabled
        self.clock, self._sleep = clock, sleep
        self.overruns = 0
        self._last = clock()

    def reset(self) -> None:
        self._last = self.clock()

    def sleep(self) -> None:
        if self.enabled:
            wait = self._last + self.period - self.clock()
            if wait > 0:
                self._sleep(wait)
            else:
                self.overruns += 1
        self._last = self.clock()
