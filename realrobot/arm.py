"""The arm interface: a 7-D end-effector delta action in, an 8-D proprioceptive state out.

Action float32[7]: dx, dy, dz (m, base frame), droll, dpitch, dyaw (rad), gripper (-1 close,
+1 open), the twin's action space. State float32[8]: tcp position (3, m, base frame), tcp
quaternion (4, wxyz), gripper opening (1, m). Backends: ``franky`` (the Franka) and ``sim``
(the real-proxy twin), built by ``make_arm`` from the ``robot.arm`` config group.
"""
from __future__ import annotations

import abc
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from common.dataset_schema import ACTION_DIM, STATE_DIM
from realrobot.device_config import DeviceConfig, load_backend

GRIPPER_INDEX = 6  # of the action


class RobotUnreachableError(ConnectionError):
    """The robot's address did not answer the reachability check."""


class ArmNotConnectedError(RuntimeError):
    pass


@dataclass
class ArmConfig(DeviceConfig):
    """Fields every arm backend shares."""
    type: ClassVar[str] = ""


class Arm(abc.ABC):
    """One robot arm with a parallel gripper, commanded by end-effector deltas."""

    config_class: ClassVar[type[ArmConfig]]
    name: ClassVar[str]

    def __init__(self, config: ArmConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the connection; raise at once (never hang) when the robot is not there."""

    @abc.abstractmethod
    def get_observation(self) -> dict[str, np.ndarray]:
        """``{"state": float32[8]}``."""

    @abc.abstractmethod
    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Start moving by ``action`` (float32[7]); returns the action actually applied."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Halt the current motion now (safe to call from another thread)."""

    @abc.abstractmethod
    def home(self) -> None:
        """Move to the start pose of an episode (the sim backend starts a new twin episode)."""

    def recover(self) -> None:
        """Clear a reflex or error state so that motions are accepted again."""

    @property
    def instruction(self) -> str | None:
        """The current episode's instruction when the backend knows it (the twin does)."""
        return None

    @property
    def episode_over(self) -> bool:
        """True when the backend ended the episode itself (the twin's terminated/truncated)."""
        return False

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    def _require_connected(self) -> None:
        if not self.is_connected:
            raise ArmNotConnectedError(f"{type(self).__name__} is not connected; call connect() first")


def check_reachable(host: str, ports: Sequence[int], timeout_s: float) -> None:
    """Raise RobotUnreachableError unless a TCP connection to ``host`` on one of ``ports``
    succeeds within ``timeout_s`` each. Without this, libfranka waits about 60 s on an absent robot."""
    errors = []
    for port in ports:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return
        except OSError as e:
            errors.append(f"port {port}: {e.strerror or type(e).__name__}")
    raise RobotUnreachableError(
        f"robot at {host} is unreachable ({'; '.join(errors)}; timeout {timeout_s} s). "
        f"Check the cable, the robot's IP ({host}) and that FCI is enabled in Desk.")


ARM_BACKENDS: dict[str, str] = {
    "franky": "realrobot.arm_franky:FrankyArm",
    "sim": "realrobot.arm_sim:SimArm",
}


def make_arm(cfg: Mapping[str, Any], cell: Any = None) -> Arm:
    """``cfg``: the ``robot.arm`` group (``type`` picks the backend). ``cell``: the SimCell the
    sim backend drives (shared with the sim camera)."""
    kind = cfg["type"]
    cls = load_backend(ARM_BACKENDS, kind, "arm")
    config = cls.config_class.from_mapping(cfg)
    if kind == "sim":
        if cell is None:
            raise ValueError("the sim arm needs the SimCell it drives (make_rig builds one)")
        return cls(config, cell)
    return cls(config)


__all__ = ["ACTION_DIM", "STATE_DIM", "GRIPPER_INDEX", "Arm", "ArmConfig",
           "RobotUnreachableError", "ArmNotConnectedError", "check_reachable", "make_arm"]
