"""6-DoF SpaceMouse-class teleoperation (3Dconnexion devices).

Reads through ``pyspacemouse`` when installed, else raw HID reports through ``hidapi`` (module
``hid``). Neither is a dependency of Tandem: ``connect`` raises TeleopDeviceError saying what to
install when both are absent. Axes arrive in [-1, 1] and are scaled to metres/radians per step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from realrobot.arm import ACTION_DIM, GRIPPER_INDEX
from realrobot.teleop import Teleop, TeleopConfig, TeleopDeviceError, TeleopEvents

log = logging.getLogger(__name__)

# 3Dconnexion USB vendor ids (the current one and the older Logitech-era one).
_VENDOR_IDS = (0x256F, 0x046D)
_HID_AXIS_FULL_SCALE = 350.0  # raw report magnitude at full deflection
_HID_TRANSLATION_REPORT, _HID_ROTATION_REPORT, _HID_BUTTON_REPORT = 1, 2, 3


@dataclass
class SpaceMouseTeleopConfig(TeleopConfig):
    type = "spacemouse"
    translation_scale_m: float = 0.02  # per control step at full deflection
    rotation_scale_rad: float = 0.1
    deadzone: float = 0.1  # fraction of full deflection ignored (sensor drift)
    # Device axes (x, y, z, roll, pitch, yaw) -> action signs, to match the robot base frame.
    axis_signs: list = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    gripper_button: int = 0  # press toggles open/close
    end_episode_button: int = 1
    hid_path: Optional[str] = None  # raw-HID backend: a device path; None = the first 3Dconnexion device
    read_timeout_ms: int = 5


class _PySpaceMouse:
    def __init__(self):
        import pyspacemouse
        self._lib = pyspacemouse
        if not pyspacemouse.open():
            raise TeleopDeviceError("pyspacemouse found no SpaceMouse (plugged in? udev permissions?)")

    def read(self) -> tuple[np.ndarray, list[int]]:
        s = self._lib.read()
        return np.array([s.x, s.y, s.z, s.roll, s.pitch, s.yaw], dtype=np.float32), list(s.buttons)

    def close(self):
        self._lib.close()


class _RawHid:
    def __init__(self, path: Optional[str], timeout_ms: int):
        import hid
        self.timeout_ms = timeout_ms
        if path is None:
            found = [d for d in hid.enumerate() if d["vendor_id"] in _VENDOR_IDS]
            if not found:
                raise TeleopDeviceError("no 3Dconnexion HID device found")
            path = found[0]["path"]
        self.dev = hid.device()
        self.dev.open_path(path if isinstance(path, bytes) else path.encode())
        self.dev.set_nonblocking(True)
        self.axes = np.zeros(6, dtype=np.float32)
        self.buttons = [0, 0]

    def read(self) -> tuple[np.ndarray, list[int]]:
        while True:
            data = self.dev.read(16, self.timeout_ms)
            if not data:
                return self.axes.copy(), list(self.buttons)
            values = np.frombuffer(bytes(data[1:13]).ljust(12, b"\0"), dtype="<i2")[:6]
            if data[0] == _HID_TRANSLATION_REPORT:
                self.axes[:3] = values[:3] / _HID_AXIS_FULL_SCALE
                if len(data) >= 13:  # newer devices send all six axes in one report
                    self.axes[3:] = values[3:6] / _HID_AXIS_FULL_SCALE
            elif data[0] == _HID_ROTATION_REPORT:
                self.axes[3:] = values[:3] / _HID_AXIS_FULL_SCALE
            elif data[0] == _HID_BUTTON_REPORT:
                self.buttons = [data[1] & 1, (data[1] >> 1) & 1]

    def close(self):
        self.dev.close()


class SpaceMouseTeleop(Teleop):
    config_class = SpaceMouseTeleopConfig
    name = "spacemouse"

    def __init__(self, config: SpaceMouseTeleopConfig):
        super().__init__(config)
        self.device = None
        self.gripper = 1.0
        self._pressed: list[int] = []
        self._events = TeleopEvents()

    @property
    def is_connected(self) -> bool:
        return self.device is not None

    def connect(self) -> None:
        errors = []
        try:
            self.device = _PySpaceMouse()
            return
        except ImportError as e:
            errors.append(f"pyspacemouse: {e}")
        try:
            self.device = _RawHid(self.config.hid_path, self.config.read_timeout_ms)
        except ImportError as e:
            errors.append(f"hid: {e}")
            raise TeleopDeviceError("SpaceMouse teleop needs `pyspacemouse` or `hidapi` "
                                    f"(pip install pyspacemouse); {'; '.join(errors)}") from e

    def reset(self) -> None:
        self.gripper = 1.0

    def _rising(self, buttons: list[int], index: int) -> bool:
        was = self._pressed[index] if index < len(self._pressed) else 0
        return index < len(buttons) and bool(buttons[index]) and not was

    def get_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        axes, buttons = self.device.read()
        axes = np.clip(axes, -1.0, 1.0)
        axes[np.abs(axes) < c.deadzone] = 0.0
        axes *= np.asarray(c.axis_signs, dtype=np.float32)
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        action[:3] = axes[:3] * c.translation_scale_m
        action[3:6] = axes[3:] * c.rotation_scale_rad
        if self._rising(buttons, c.gripper_button):
            self.gripper = -self.gripper
        if self._rising(buttons, c.end_episode_button):
            self._events.end_episode = True
        self._pressed = buttons
        action[GRIPPER_INDEX] = self.gripper
        return action

    def get_events(self) -> TeleopEvents:
        events, self._events = self._events, TeleopEvents()
        return events

    def disconnect(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None
