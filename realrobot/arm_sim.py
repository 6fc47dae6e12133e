"""The arm backend on the real-proxy twin: the same interface as the Franka, no hardware."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from realrobot.arm import ACTION_DIM, Arm, ArmConfig
from realrobot.sim_cell import SimCell

log = logging.getLogger(__name__)


@dataclass
class SimArmConfig(ArmConfig):
    type = "sim"


class SimArm(Arm):
    """Steps the shared SimCell once per action. ``stop()`` (e.g. from the watchdog) holds the
    arm: the twin is not stepped from another thread; the stop is counted and the next action
    resumes motion, as with the Franka."""

    config_class = SimArmConfig
    name = "sim"

    def __init__(self, config: SimArmConfig, cell: SimCell):
        super().__init__(config)
        self.cell = cell
        self._connected = False
        self.stops = 0
        self.stopped = threading.Event()

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        if not self.cell.started:
            self.cell.reset()
        self._connected = True

    def get_observation(self) -> dict[str, np.ndarray]:
        self._require_connected()
        return {"state": np.asarray(self.cell.obs["state"], dtype=np.float32).copy()}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        self._require_connected()
        applied = np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM),
                          self.cell.action_low, self.cell.action_high)
        self.stopped.clear()
        self.cell.step(applied)
        return applied

    def stop(self) -> None:
        self.stops += 1
        self.stopped.set()

    def home(self) -> None:
        self._require_connected()
        self.cell.reset()

    @property
    def instruction(self) -> str | None:
        return self.cell.instruction or None

    @property
    def episode_over(self) -> bool:
        return self.cell.episode_over

    def disconnect(self) -> None:
        self._connected = False
