"""The safety layer between every command (teleop or policy) and the arm.

Each command passes, in this order:
  1. a finiteness check (NaN/inf: the arm is stopped and SafetyViolation raised);
  2. the workspace box: the commanded target position (measured position + delta) is clamped
     into the box, so the arm never leaves it and is drawn back in if it starts outside;
  3. per-step limits on the norm of the translation and of the rotation delta (the direction
     is kept, so the clamped target stays on the segment towards the workspace-clamped target);
  4. gripper debounce: an open/close flip within ``gripper_debounce_steps`` steps of the last
     flip is ignored (the previous gripper command is repeated);
  5. a rate limit: a command arriving sooner than 1 / ``max_rate_hz`` after the previous one
     waits for its slot.
Any exception while sending stops the arm before it propagates. A watchdog thread stops the arm
when no command arrives within ``watchdog_timeout_s``. Every clamp is counted by kind
(``clamp_counts``) and logged.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from realrobot.arm import ACTION_DIM, GRIPPER_INDEX, Arm
from realrobot.device_config import DeviceConfig

log = logging.getLogger(__name__)

WORKSPACE, TRANSLATION, ROTATION, GRIPPER_DEBOUNCE, RATE_LIMIT = (
    "workspace", "translation", "rotation", "gripper_debounce", "rate_limit")
CLAMP_KINDS = (WORKSPACE, TRANSLATION, ROTATION, GRIPPER_DEBOUNCE, RATE_LIMIT)


class SafetyViolation(RuntimeError):
    """A command the safety layer refuses outright (the arm has been stopped)."""


@dataclass
class SafetyConfig(DeviceConfig):
    # Axis-aligned box for the TCP position, in the arm's base frame (m).
    workspace_min: list = field(default_factory=lambda: [0.25, -0.35, 0.02])
    workspace_max: list = field(default_factory=lambda: [0.75, 0.35, 0.50])
    max_translation_m: float = 0.03  # norm of (dx, dy, dz) per step
    max_rotation_rad: float = 0.15  # norm of (droll, dpitch, dyaw) per step
    gripper_debounce_steps: int = 3
    max_rate_hz: float = 10.0
    watchdog_timeout_s: float = 0.5
    watchdog_poll_s: float = 0.05


class Watchdog:
    """Calls ``on_timeout`` once when ``feed`` was not called for ``timeout_s`` while armed.

    ``feed`` arms it; a trip or ``disarm`` disarms it until the next ``feed``.
    """

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None], poll_s: float,
                 clock: Callable[[], float] = time.monotonic, name: str = "safety-watchdog"):
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.on_timeout = on_timeout
        self.clock = clock
        self.trips = 0
        self._last_feed = clock()
        self._armed = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def feed(self) -> None:
        with self._lock:
            self._last_feed = self.clock()
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            with self._lock:
                late = self._armed and self.clock() - self._last_feed > self.timeout_s
                if late:
                    self._armed = False
                    self.trips += 1
                    silent_s = self.clock() - self._last_feed
            if late:
                log.warning("safety watchdog: no command for %.3f s (timeout %.3f s): stopping the arm",
                            silent_s, self.timeout_s)
                try:
                    self.on_timeout()
                except Exception:
                    log.exception("safety watchdog: stopping the arm failed")

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()


class SafetyLayer:
    """Wraps an Arm: ``send(action)`` filters the command, sends it and returns what was applied."""

    def __init__(self, arm: Arm, config: SafetyConfig | Mapping[str, Any],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.arm = arm
        self.config = config if isinstance(config, SafetyConfig) else SafetyConfig.from_mapping(config)
        c = self.config
        self.workspace_min = np.asarray(c.workspace_min, dtype=np.float64)
        self.workspace_max = np.asarray(c.workspace_max, dtype=np.float64)
        if self.workspace_min.shape != (3,) or np.any(self.workspace_min >= self.workspace_max):
            raise ValueError(f"workspace_min {c.workspace_min} must be 3 values below workspace_max "
                             f"{c.workspace_max}")
        self.min_interval_s = 1.0 / c.max_rate_hz
        self.clock, self.sleep = clock, sleep
        self.clamp_counts: Counter = Counter()
        self.commands = 0
        self._last_send: Optional[float] = None
        self._gripper: Optional[float] = None
        self._steps_since_flip = 0
        self.watchdog = Watchdog(c.watchdog_timeout_s, self._watchdog_stop, c.watchdog_poll_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SafetyLayer":
        self.watchdog.start()
        return self

    def close(self) -> None:
        self.watchdog.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _watchdog_stop(self) -> None:
        self.arm.stop()

    def idle(self) -> None:
        """Stop the arm and disarm the watchdog (between episodes, while the operator labels)."""
        self.watchdog.disarm()
        self.arm.stop()

    def new_episode(self) -> None:
        """Forget the gripper history (the arm was homed with the gripper open)."""
        self._gripper = None
        self._steps_since_flip = 0

    # ------------------------------------------------------------------ filtering
    def _clamp(self, kind: str, detail: str, *args) -> None:
        self.clamp_counts[kind] += 1
        # waiting for the control rate is routine pacing (counted, not shouted); the rest changed a command
        log.log(logging.DEBUG if kind == RATE_LIMIT else logging.INFO, "safety clamp [%s] " + detail, kind, *args)

    def filter(self, action: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The safe version of ``action`` given the measured ``state`` (no rate limit, no I/O)."""
        a = np.asarray(action, dtype=np.float64).reshape(ACTION_DIM).copy()
        if not np.all(np.isfinite(a)):
            raise SafetyViolation(f"non-finite action {a.tolist()}")
        c = self.config
        position = np.asarray(state[:3], dtype=np.float64)

        target = position + a[:3]
        clamped = np.clip(target, self.workspace_min, self.workspace_max)
        if np.any(clamped != target):
            self._clamp(WORKSPACE, "target %s -> %s (box %s..%s)", np.round(target, 4).tolist(),
                        np.round(clamped, 4).tolist(), c.workspace_min, c.workspace_max)
            a[:3] = clamped - position

        for kind, sl, limit in ((TRANSLATION, slice(0, 3), c.max_translation_m),
                                (ROTATION, slice(3, 6), c.max_rotation_rad)):
            norm = float(np.linalg.norm(a[sl]))
            if norm > limit:
                self._clamp(kind, "step norm %.4f -> %.4f", norm, limit)
                a[sl] *= limit / norm

        wanted = a[GRIPPER_INDEX]
        if self._gripper is not None and (wanted > 0) != (self._gripper > 0):
            if self._steps_since_flip < c.gripper_debounce_steps:
                self._clamp(GRIPPER_DEBOUNCE, "flip to %+.2f ignored %d step(s) after the last flip "
                            "(debounce %d)", wanted, self._steps_since_flip, c.gripper_debounce_steps)
                a[GRIPPER_INDEX] = self._gripper
            else:
                self._steps_since_flip = 0
        self._gripper = float(a[GRIPPER_INDEX])
        self._steps_since_flip += 1
        return a.astype(np.float32)

    def _wait_for_slot(self) -> None:
        if self._last_send is None:
            return
        wait = self._last_send + self.min_interval_s - self.clock()
        if wait > 0:
            self._clamp(RATE_LIMIT, "command %.4f s early (max %.1f Hz): waiting", wait, self.config.max_rate_hz)
            self.sleep(wait)

    def send(self, action: np.ndarray, state: Optional[np.ndarray] = None) -> np.ndarray:
        """Filter, pace and send one command; returns the action the arm applied.

        ``state``: the measured state this command was computed from (read from the arm if None).
        """
        try:
            if state is None:
                state = self.arm.get_observation()["state"]
            safe = self.filter(action, state)
            self._wait_for_slot()
            applied = self.arm.send_action(safe)
            self._last_send = self.clock()
            self.commands += 1
            self.watchdog.feed()
            return applied
        except BaseException as e:
            log.error("safety: stopping the arm after %s: %s", type(e).__name__, e)
            self.watchdog.disarm()
            try:
                self.arm.stop()
            except Exception:
                log.exception("safety: arm.stop() failed as well")
            raise

    def summary(self) -> dict[str, int]:
        return {kind: self.clamp_counts.get(kind, 0) for kind in CLAMP_KINDS} | {
            "commands": self.commands, "watchdog_trips": self.watchdog.trips}
