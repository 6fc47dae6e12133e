"""The sim rig: the sim arm and the sim camera share one real-proxy twin, behind the same
interfaces as the Franka and the RealSense."""

import numpy as np
import pytest

from common.config import load_config
from realrobot.rig import make_rig
from realrobot.safety import SafetyLayer


@pytest.fixture(scope="module")
def rig():
    cfg = load_config("collect", ["env.camera.width=64", "env.camera.height=64"])
    rig = make_rig(cfg.robot, cfg.env, seed=0)
    rig.connect()
    yield rig
    rig.disconnect()


def test_arm_and_camera_view_the_same_twin(rig):
    assert rig.arm.cell is rig.camera.cell is rig.cell
    rig.arm.home()
    assert rig.arm.instruction and rig.arm.instruction.startswith("put the")
    image0 = rig.camera.read()
    assert image0.shape == (64, 64, 3) and image0.dtype == np.uint8
    state0 = rig.arm.get_observation()["state"]
    assert state0.shape == (8,) and state0.dtype == np.float32
    for _ in range(4):
        applied = rig.arm.send_action(np.array([0.0, 0.0, 0.03, 0, 0, 0, 1.0], dtype=np.float32))
    state1 = rig.arm.get_observation()["state"]
    assert state1[2] > state0[2] + 0.03  # the tcp went up
    assert not np.array_equal(rig.camera.read(), image0)  # and the camera saw the arm move
    assert applied[2] == pytest.approx(0.03)


def test_sim_arm_clips_to_the_twin_action_bounds(rig):
    applied = rig.arm.send_action(np.array([1.0, 0, 0, 0, 0, 0, 5.0], dtype=np.float32))
    assert applied[0] == pytest.approx(rig.cell.action_high[0]) and applied[6] == pytest.approx(1.0)


def test_safety_watchdog_stops_the_sim_arm(rig):
    cfg = load_config("collect", ["robot.safety.watchdog_timeout_s=0.2", "robot.safety.max_rate_hz=1000"])
    stops_before = rig.arm.stops
    with SafetyLayer(rig.arm, cfg.robot.safety) as safety:
        safety.send(np.array([0.0, 0.0, 0.0, 0, 0, 0, 1.0], dtype=np.float32))
        assert rig.arm.stopped.wait(2.0)
    assert rig.arm.stops == stops_before + 1
    rig.arm.send_action(np.zeros(7, dtype=np.float32))
    assert not rig.arm.stopped.is_set()  # the next command resumes


def test_home_starts_a_new_episode(rig):
    before = rig.cell.episodes
    rig.arm.home()
    assert rig.cell.episodes == before + 1 and not rig.arm.episode_over
