"""The camera interface: one third-person RGB frame, uint8 [H, W, 3], per control step.

Backends: ``realsense`` (pyrealsense2) and ``sim`` (the real-proxy twin's camera), built by
``make_camera`` from the ``robot.camera`` config group.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from realrobot.device_config import DeviceConfig, load_backend


class CameraNotFoundError(RuntimeError):
    """No camera, or not the configured one, is attached."""


class CameraNotConnectedError(RuntimeError):
    pass


@dataclass
class CameraConfig(DeviceConfig):
    type: ClassVar[str] = ""


class Camera(abc.ABC):
    config_class: ClassVar[type[CameraConfig]]
    name: ClassVar[str]

    def __init__(self, config: CameraConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the frames ``read`` returns."""

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the device; raise CameraNotFoundError at once when it is not attached."""

    @abc.abstractmethod
    def read(self) -> np.ndarray:
        """The newest RGB frame, uint8 [H, W, 3]."""

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    def _require_connected(self) -> None:
        if not self.is_connected:
            raise CameraNotConnectedError(f"{type(self).__name__} is not connected; call connect() first")


CAMERA_BACKENDS: dict[str, str] = {
    "realsense": "realrobot.camera_realsense:RealSenseCamera",
    "sim": "realrobot.camera_sim:SimCamera",
}


def make_camera(cfg: Mapping[str, Any], cell: Any = None) -> Camera:
    """``cfg``: the ``robot.camera`` group. ``cell``: the SimCell the sim camera films."""
    kind = cfg["type"]
    cls = load_backend(CAMERA_BACKENDS, kind, "camera")
    config = cls.config_class.from_mapping(cfg)
    if kind == "sim":
        if cell is None:
            raise ValueError("the sim camera needs the SimCell it films (make_rig builds one)")
        return cls(config, cell)
    return cls(config)
