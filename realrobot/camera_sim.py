"""The camera backend on the real-proxy twin: the image of the shared SimCell's latest step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realrobot.camera import Camera, CameraConfig
from realrobot.sim_cell import SimCell


@dataclass
class SimCameraConfig(CameraConfig):
    type = "sim"  # resolution, pose and appearance come from the env config (env.camera.*)


class SimCamera(Camera):
    config_class = SimCameraConfig
    name = "sim"

    def __init__(self, config: SimCameraConfig, cell: SimCell):
        super().__init__(config)
        self.cell = cell
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def image_size(self) -> tuple[int, int]:
        return self.cell.image_size

    def connect(self) -> None:
        if not self.cell.started:
            self.cell.reset()
        self._connected = True

    def read(self) -> np.ndarray:
        self._require_connected()
        return np.asarray(self.cell.obs["image"], dtype=np.uint8).copy()

    def disconnect(self) -> None:
        self._connected = False
