"""The Franka arm through franky (libfranka's Python binding).

Each action becomes one asynchronous Cartesian motion that replaces the one in progress, so a
new command every control period yields a smooth path. The target is computed here from the
measured pose with the twin's delta rule (``pose_math.apply_delta``) and sent as an absolute
target (``reference: absolute``, the default): the position that the safety layer clamped to
its workspace box is then exactly what the robot is asked to reach. ``reference: relative``
sends the same delta as a franky Relative motion (in the end-effector frame, as franky defines
it), applied to the pose at the moment the motion starts.

franky is imported in ``connect``, so this module imports without the library's realtime setup.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from realrobot.arm import (ACTION_DIM, GRIPPER_INDEX, STATE_DIM, Arm, ArmConfig,
                           RobotUnreachableError, check_reachable)
from common.pose_math import (apply_delta, euler_xyz_to_matrix, matrix_to_quat_wxyz,
                                 quat_wxyz_to_matrix, wxyz_to_xyzw, xyzw_to_wxyz)

log = logging.getLogger(__name__)


@dataclass
class FrankyArmConfig(ArmConfig):
    type = "franky"
    ip: str = "172.16.0.2"
    # TCP ports probed before libfranka connects (1337: FCI command port; 443: Desk).
    reachability_ports: list = field(default_factory=lambda: [1337, 443])
    reachability_timeout_s: float = 0.5
    realtime: bool = True  # False: RealtimeConfig.Ignore (no PREEMPT_RT kernel; jitter likely)
    reference: str = "absolute"  # absolute | relative
    relative_dynamics_factor: float = 0.1  # global velocity/acceleration/jerk scale, (0, 1]
    motion_dynamics_factor: float = 1.0  # per-motion scale on top of the global one
    collision_torque_threshold_nm: float = 20.0
    collision_force_threshold_n: float = 30.0
    home_joints: list = field(default_factory=lambda: [0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
    home_dynamics_factor: float = 0.1
    gripper_speed_mps: float = 0.05
    gripper_force_n: float = 20.0
    gripper_open_width_m: float = 0.08
    gripper_grasp_width_m: float = 0.0
    # A grasp succeeds for any width within these of the target (objects of unknown size).
    gripper_epsilon_inner_m: float = 0.08
    gripper_epsilon_outer_m: float = 0.08
    recover_on_error: bool = True  # call recover_from_errors() when a motion raises


class FrankyArm(Arm):
    config_class = FrankyArmConfig
    name = "franky"

    def __init__(self, config: FrankyArmConfig):
        super().__init__(config)
        if config.reference not in ("absolute", "relative"):
            raise ValueError(f"reference must be 'absolute' or 'relative', not {config.reference!r}")
        self._franky = None
        self.robot = None
        self.gripper = None
        self._gripper_open: bool | None = None
        self._lock = threading.Lock()  # stop() may come from the watchdog thread

    @property
    def is_connected(self) -> bool:
        return self.robot is not None

    def connect(self) -> None:
        c = self.config
        check_reachable(c.ip, c.reachability_ports, c.reachability_timeout_s)
        import franky
        self._franky = franky
        rt = franky.RealtimeConfig.Enforce if c.realtime else franky.RealtimeConfig.Ignore
        try:
            self.robot = franky.Robot(c.ip, relative_dynamics_factor=c.relative_dynamics_factor,
                                      default_torque_threshold=c.collision_torque_threshold_nm,
                                      default_force_threshold=c.collision_force_threshold_n,
                                      realtime_config=rt)
        except franky.RealtimeException as e:
            raise RuntimeError(f"franky needs a realtime kernel to control {c.ip} ({e}); set "
                               "robot.arm.realtime=false to run without one (motion may jitter)") from e
        except franky.NetworkException as e:
            raise RobotUnreachableError(f"robot at {c.ip}: {e}") from e
        self.gripper = franky.Gripper(c.ip)
        self._gripper_open = None
        log.info("connected to the Franka at %s", c.ip)

    def get_observation(self) -> dict[str, np.ndarray]:
        self._require_connected()
        pose = self.robot.current_pose.end_effector_pose
        state = np.empty(STATE_DIM, dtype=np.float32)
        state[:3] = pose.translation
        state[3:7] = xyzw_to_wxyz(np.asarray(pose.quaternion))
        state[7] = self.gripper.width
        return {"state": state}

    def _motion(self, action: np.ndarray, state: np.ndarray):
        f, c = self._franky, self.config
        dynamics = f.RelativeDynamicsFactor(c.motion_dynamics_factor)
        if c.reference == "absolute":
            pos, quat = apply_delta(state[:3], state[3:7], action[:6])
            target = f.Affine(pos, wxyz_to_xyzw(quat))
            return f.CartesianMotion(f.RobotPose(target), f.ReferenceType.Absolute, dynamics)
        # franky's relative target is in the end-effector frame: express the base-frame delta there.
        rot = quat_wxyz_to_matrix(state[3:7])
        translation = rot.T @ np.asarray(action[:3], dtype=np.float64)
        delta_rot = rot.T @ euler_xyz_to_matrix(action[3:6]) @ rot
        target = f.Affine(translation, wxyz_to_xyzw(matrix_to_quat_wxyz(delta_rot)))
        return f.CartesianMotion(f.RobotPose(target), f.ReferenceType.Relative, dynamics)

    def _command_gripper(self, open_: bool) -> None:
        if open_ == self._gripper_open:
            return  # the gripper is slow: command it only when the wish changes
        c = self.config
        if open_:
            self.gripper.move_async(c.gripper_open_width_m, c.gripper_speed_mps)
        else:
            self.gripper.grasp_async(c.gripper_grasp_width_m, c.gripper_speed_mps, c.gripper_force_n,
                                     epsilon_inner=c.gripper_epsilon_inner_m,
                                     epsilon_outer=c.gripper_epsilon_outer_m)
        self._gripper_open = open_

    def send_action(self, action: np.ndarray) -> np.ndarray:
        self._require_connected()
        action = np.asarray(action, dtype=np.float32).reshape(ACTION_DIM)
        state = self.get_observation()["state"]
        with self._lock:
            try:
                self.robot.move(self._motion(action, state), asynchronous=True)
                self._command_gripper(bool(action[GRIPPER_INDEX] > 0))
            except self._franky.Exception:
                if self.config.recover_on_error:
                    self.recover()
                raise
        applied = action.copy()
        applied[GRIPPER_INDEX] = 1.0 if action[GRIPPER_INDEX] > 0 else -1.0
        return applied

    def stop(self) -> None:
        if self.robot is None:
            return
        with self._lock:
            self.robot.stop()

    def recover(self) -> None:
        if self.robot is not None and self.robot.has_errors:
            ok = self.robot.recover_from_errors()
            log.warning("franky: recover_from_errors() -> %s", ok)

    def home(self) -> None:
        self._require_connected()
        f, c = self._franky, self.config
        self.recover()
        self.robot.move(f.JointMotion(c.home_joints, relative_dynamics_factor=f.RelativeDynamicsFactor(
            c.home_dynamics_factor)))
        self.gripper.move(c.gripper_open_width_m, c.gripper_speed_mps)
        self._gripper_open = True

    def disconnect(self) -> None:
        if self.robot is not None:
            try:
                self.stop()
            finally:
                self.robot = None
                self.gripper = None
