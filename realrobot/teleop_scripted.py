"""The twin's scripted expert as a teleoperator, so collection runs end to end without a human."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realrobot.arm import ACTION_DIM
from realrobot.sim_cell import SimCell
from realrobot.teleop import Teleop, TeleopConfig


@dataclass
class ScriptedTeleopConfig(TeleopConfig):
    type = "scripted"


class ScriptedTeleop(Teleop):
    """Acts with ``common.twin.ScriptedExpert`` on the cell's env (it reads privileged sim state)."""

    config_class = ScriptedTeleopConfig
    name = "scripted"

    def __init__(self, config: ScriptedTeleopConfig, cell: SimCell):
        super().__init__(config)
        self.cell = cell
        self.expert = None

    @property
    def is_connected(self) -> bool:
        return self.expert is not None

    def connect(self) -> None:
        from common.twin import ScriptedExpert
        self.expert = ScriptedExpert(self.cell.env)

    def reset(self) -> None:
        self.expert.reset()

    def get_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.expert.act(observation), dtype=np.float32).reshape(ACTION_DIM)

    def disconnect(self) -> None:
        self.expert = None
