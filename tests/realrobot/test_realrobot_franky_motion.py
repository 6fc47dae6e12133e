"""The Franka backend's motion commands, built with the installed franky (no robot needed):
the twin's delta rule, absolute and relative targets, gripper commands, stop and recovery."""
import franky
import numpy as np
import pytest
import torch
from mani_skill.utils.geometry.rotation_conversions import (euler_angles_to_matrix, matrix_to_quaternion,
                                                             quaternion_multiply)

from common.pose_math import apply_delta, quat_wxyz_to_matrix, xyzw_to_wxyz
from realrobot.arm_franky import FrankyArm, FrankyArmConfig

STATE = np.array([0.45, -0.05, 0.30, 0.0, 1.0, 0.0, 0.0, 0.08], dtype=np.float32)  # tcp pointing down
DELTA = np.array([0.01, -0.02, 0.015, 0.05, -0.08, 0.12, 1.0], dtype=np.float32)


def same_rotation(q1_wxyz, q2_wxyz):
    return abs(abs(float(np.dot(q1_wxyz, q2_wxyz))) - 1.0) < 1e-6


def test_apply_delta_matches_maniskill_pd_ee_delta_pose():
    pos, quat = apply_delta(STATE[:3], STATE[3:7], DELTA[:6])
    dq = matrix_to_quaternion(euler_angles_to_matrix(torch.tensor(DELTA[3:6], dtype=torch.float64), "XYZ"))
    q_ref = quaternion_multiply(dq, torch.tensor(STATE[3:7], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(pos, STATE[:3].astype(np.float64) + DELTA[:3], atol=1e-7)
    assert same_rotation(quat, q_ref)


def motion_target(motion):
    pose = motion.target.pose.end_effector_pose
    return np.asarray(pose.translation), xyzw_to_wxyz(np.asarray(pose.quaternion))


def arm_with(reference):
    arm = FrankyArm(FrankyArmConfig(ip="127.0.0.1", reference=reference))
    arm._franky = franky
    return arm


def test_absolute_motion_targets_the_twin_rule_pose():
    motion = arm_with("absolute")._motion(DELTA, STATE)
    assert motion.reference_type == franky.ReferenceType.Absolute
    pos, quat = motion_target(motion)
    want_pos, want_quat = apply_delta(STATE[:3], STATE[3:7], DELTA[:6])
    np.testing.assert_allclose(pos, want_pos, atol=1e-6)
    assert same_rotation(quat, want_quat)


def test_relative_motion_composes_to_the_same_target():
    motion = arm_with("relative")._motion(DELTA, STATE)
    assert motion.reference_type == franky.ReferenceType.Relative
    rel_pos, rel_quat = motion_target(motion)
    current = np.eye(4)
    current[:3, :3], current[:3, 3] = quat_wxyz_to_matrix(STATE[3:7]), STATE[:3]
    rel = np.eye(4)
    rel[:3, :3], rel[:3, 3] = quat_wxyz_to_matrix(rel_quat), rel_pos
    target = current @ rel  # franky: a relative target is in the end-effector frame
    want_pos, want_quat = apply_delta(STATE[:3], STATE[3:7], DELTA[:6])
    np.testing.assert_allclose(target[:3, 3], want_pos, atol=1e-6)
    np.testing.assert_allclose(target[:3, :3], quat_wxyz_to_matrix(want_quat), atol=1e-6)


class FakeRobot:
    def __init__(self):
        self.moves, self.stops, self.recoveries, self.has_errors = [], 0, 0, False
        self.current_pose = franky.RobotPose(franky.Affine(STATE[:3].astype(np.float64),
                                                           np.array([1.0, 0.0, 0.0, 0.0])))

    def move(self, motion, asynchronous=False):
        self.moves.append((motion, asynchronous))

    def stop(self):
        self.stops += 1

    def recover_from_errors(self):
        self.recoveries += 1
        self.has_errors = False
        return True


class FakeGripper:
    width = 0.08

    def __init__(self):
        self.calls = []

    def move_async(self, width, speed):
        self.calls.append(("move", width))

    def grasp_async(self, width, speed, force, epsilon_inner, epsilon_outer):
        self.calls.append(("grasp", width))


def connected_arm():
    arm = arm_with("absolute")
    arm.robot, arm.gripper = FakeRobot(), FakeGripper()
    return arm


def test_send_action_moves_asynchronously_and_commands_the_gripper_on_change_only():
    arm = connected_arm()
    obs = arm.get_observation()["state"]
    np.testing.assert_allclose(obs[:3], STATE[:3], atol=1e-6)
    assert same_rotation(obs[3:7], STATE[3:7]) and obs[7] == pytest.approx(0.08)
    for g in (1.0, 1.0, -0.3, -1.0, 0.7):
        applied = arm.send_action(np.array([0.01, 0, 0, 0, 0, 0, g], dtype=np.float32))
    assert len(arm.robot.moves) == 5 and all(asynchronous for _, asynchronous in arm.robot.moves)
    assert [c[0] for c in arm.gripper.calls] == ["move", "grasp", "move"]
    assert applied[6] == 1.0


def test_stop_and_recover():
    arm = connected_arm()
    arm.stop()
    assert arm.robot.stops == 1
    arm.robot.has_errors = True
    arm.recover()
    assert arm.robot.recoveries == 1 and not arm.robot.has_errors
    arm.recover()  # no errors: nothing to do
    assert arm.robot.recoveries == 1
