"""A warning per kind of event at most every few seconds, however often it happens.

Drops of hostile or broken input are counted exactly elsewhere (per reason); the log only needs
to say that they happen, so a flood of bad messages cannot fill the disk.
"""
from __future__ import annotations

import logging
import time

MAX_TEXT = 300  # characters of one warning (sender names and reasons come from the peer)


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, text: str, key: str | None = None) -> bool:
        """Log ``text`` (truncated) unless its key (default: the text up to its first ':') was logged in
        the last ``every_s`` seconds; the next warning of that key says how many were suppressed."""
        key = key or text.split(":", 1)[0][:80]
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        more = f" (+{suppressed} like it suppressed)" if suppressed else ""
        self.logger.warning("%s%s", text[:MAX_TEXT], more)
        return True
