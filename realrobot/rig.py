"""The robot rig of a session: the arm, the camera and, when either is simulated, the SimCell
they share. Built from the ``robot`` config group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from realrobot.arm import Arm, RobotUnreachableError, make_arm
from realrobot.camera import Camera, CameraNotFoundError, make_camera
from realrobot.sim_cell import SimCell
from realrobot.teleop import TeleopDeviceError

# Hardware that is not there: the commands report these in one line and exit with DEVICE_MISSING.
DEVICE_ERRORS = (RobotUnreachableError, CameraNotFoundError, TeleopDeviceError)
DEVICE_MISSING = 2


@dataclass
class Rig:
    arm: Arm
    camera: Camera
    cell: Optional[SimCell] = None

    def connect(self) -> None:
        self.arm.connect()
        try:
            self.camera.connect()
        except BaseException:
            self.arm.disconnect()
            raise

    def disconnect(self) -> None:
        try:
            self.camera.disconnect()
        finally:
            self.arm.disconnect()
            if self.cell is not None:
                self.cell.close()


def make_rig(robot_cfg: Any, env_cfg: Any = None, seed: Optional[int] = None) -> Rig:
    """``robot_cfg``: the ``robot`` group; ``env_cfg``: the ``env`` group (for the sim cell)."""
    arm_sim, cam_sim = robot_cfg.arm.type == "sim", robot_cfg.camera.type == "sim"
    if arm_sim != cam_sim:
        raise ValueError("the sim camera films the sim arm's twin: use both sim backends or neither "
                         f"(arm {robot_cfg.arm.type!r}, camera {robot_cfg.camera.type!r})")
    cell = SimCell(env_cfg, seed=seed, real_proxy=bool(robot_cfg.get("real_proxy", True))) if arm_sim else None
    return Rig(arm=make_arm(robot_cfg.arm, cell), camera=make_camera(robot_cfg.camera, cell), cell=cell)
