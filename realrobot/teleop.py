"""The teleoperation interface: a human (or a script) turns each observation into a 7-D action.

Backends: ``keyboard``, ``spacemouse`` (6-DoF SpaceMouse-class devices) and ``scripted`` (the
twin's scripted expert driving the sim cell), built by ``make_teleop`` from ``robot.teleop``.
Besides actions a teleop reports operator events: end the episode, re-record it, stop.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from realrobot.device_config import DeviceConfig, load_backend


class TeleopDeviceError(RuntimeError):
    """The teleoperation device or its driver library is not available."""


@dataclass
class TeleopEvents:
    """Operator requests since the last ``get_events`` call."""
    end_episode: bool = False  # the demonstration is over (the operator then labels it)
    rerecord: bool = False  # throw this attempt away and record the episode again
    stop: bool = False  # end the session after this episode


@dataclass
class TeleopConfig(DeviceConfig):
    type: ClassVar[str] = ""


class Teleop(abc.ABC):
    config_class: ClassVar[type[TeleopConfig]]
    name: ClassVar[str]

    def __init__(self, config: TeleopConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    def connect(self) -> None: ...

    def reset(self) -> None:
        """A new episode starts (e.g. the gripper command goes back to open)."""

    def pause(self) -> None:
        """The episode is over; the operator may now use the terminal (e.g. to label it)."""

    @abc.abstractmethod
    def get_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """float32[7] for this control step; ``observation`` = {"image", "state"}."""

    def get_events(self) -> TeleopEvents:
        return TeleopEvents()

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


TELEOP_BACKENDS: dict[str, str] = {
    "keyboard": "realrobot.teleop_keyboard:KeyboardTeleop",
    "spacemouse": "realrobot.teleop_spacemouse:SpaceMouseTeleop",
    "scripted": "realrobot.teleop_scripted:ScriptedTeleop",
}


def make_teleop(cfg: Mapping[str, Any], cell: Any = None) -> Teleop:
    """``cfg``: the ``robot.teleop`` group. ``cell``: the SimCell the scripted expert drives."""
    kind = cfg["type"]
    cls = load_backend(TELEOP_BACKENDS, kind, "teleop")
    config = cls.config_class.from_mapping(cfg)
    if kind == "scripted":
        if cell is None:
            raise ValueError("the scripted teleop drives the sim cell: it needs robot.arm.type=sim")
        return cls(config, cell)
    return cls(config)
