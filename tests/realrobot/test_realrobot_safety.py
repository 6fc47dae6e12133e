"""The safety layer: workspace box, per-step limits, gripper debounce, rate limit, watchdog, stop on error."""
import logging
import threading
import time

import numpy as np
import pytest

from realrobot.arm import Arm, ArmConfig
from realrobot.safety import SafetyConfig, SafetyLayer, SafetyViolation, Watchdog


class RecordingArm(Arm):
    """An arm that integrates the deltas it receives and records every call."""
    config_class = ArmConfig
    name = "recording"

    def __init__(self, position=(0.5, 0.0, 0.2), fail_on_send=False):
        super().__init__(ArmConfig())
        self.state = np.array([*position, 1, 0, 0, 0, 0.08], dtype=np.float32)
        self.sent, self.stops, self.fail_on_send = [], 0, fail_on_send
        self.stopped_event = threading.Event()

    is_connected = True

    def connect(self): pass
    def disconnect(self): pass
    def home(self): pass

    def get_observation(self):
        return {"state": self.state.copy()}

    def send_action(self, action):
        if self.fail_on_send:
            raise RuntimeError("reflex: cartesian reflex")
        self.sent.append(np.array(action))
        self.state[:3] += action[:3]
        return np.array(action)

    def stop(self):
        self.stops += 1
        self.stopped_event.set()


def config(**kw):
    base = dict(workspace_min=[0.3, -0.2, 0.05], workspace_max=[0.7, 0.2, 0.4], max_translation_m=0.05,
                max_rotation_rad=0.2, gripper_debounce_steps=3, max_rate_hz=1000.0,
                watchdog_timeout_s=10.0, watchdog_poll_s=0.01)
    base.update(kw)
    return SafetyConfig(**base)


def action(dx=0.0, dy=0.0, dz=0.0, rot=(0.0, 0.0, 0.0), gripper=1.0):
    return np.array([dx, dy, dz, *rot, gripper], dtype=np.float32)


def test_workspace_clamps_target_and_arm_never_leaves_the_box(caplog):
    arm = RecordingArm(position=(0.68, 0.0, 0.2))
    safety = SafetyLayer(arm, config())
    with caplog.at_level(logging.INFO, logger="realrobot.safety"):
        for _ in range(5):
            safety.send(action(dx=0.04, dz=-0.05))
    pos = arm.state[:3]
    assert pos[0] == pytest.approx(0.7, abs=1e-6)  # pushed against the +x wall, not through it
    assert np.all(pos >= np.array([0.3, -0.2, 0.05]) - 1e-6) and np.all(pos <= np.array([0.7, 0.2, 0.4]) + 1e-6)
    assert safety.clamp_counts["workspace"] >= 4
    assert any("workspace" in r.getMessage() for r in caplog.records)


def test_start_outside_box_is_drawn_back_by_at_most_one_step():
    arm = RecordingArm(position=(0.9, 0.0, 0.2))  # 0.2 m outside
    safety = SafetyLayer(arm, config())
    applied = safety.send(action())
    assert applied[0] == pytest.approx(-0.05, abs=1e-6)  # back towards the box, limited per step
    assert safety.clamp_counts["workspace"] == 1 and safety.clamp_counts["translation"] == 1


def test_per_step_translation_and_rotation_limits_keep_direction():
    arm = RecordingArm()
    safety = SafetyLayer(arm, config())
    applied = safety.send(action(dx=0.06, dy=0.08, rot=(0.3, 0.0, 0.4)))
    assert np.linalg.norm(applied[:3]) == pytest.approx(0.05, rel=1e-5)
    assert applied[1] / applied[0] == pytest.approx(0.08 / 0.06, rel=1e-5)
    assert np.linalg.norm(applied[3:6]) == pytest.approx(0.2, rel=1e-5)
    assert applied[5] / applied[3] == pytest.approx(0.4 / 0.3, rel=1e-5)
    assert safety.clamp_counts["translation"] == 1 and safety.clamp_counts["rotation"] == 1
    small = safety.send(action(dx=0.01, rot=(0.05, 0, 0)))
    assert small[0] == pytest.approx(0.01) and small[3] == pytest.approx(0.05)
    assert safety.clamp_counts["translation"] == 1  # unchanged: nothing clamped


def test_gripper_debounce_ignores_flips_within_n_steps():
    arm = RecordingArm()
    safety = SafetyLayer(arm, config(gripper_debounce_steps=3))
    commands = [1, -1, 1, -1, 1, 1, 1, 1]
    applied = [float(safety.send(action(gripper=g))[6]) for g in commands]
    # step 1: a flip 1 step after the start is held; step 3: 3 steps on, the close passes;
    # steps 4-5: re-opening 1 and 2 steps after that flip is held; step 6 passes.
    assert applied == [1, 1, 1, -1, -1, -1, 1, 1]
    assert safety.clamp_counts["gripper_debounce"] == 3
    safety.new_episode()
    assert safety.send(action(gripper=-1.0))[6] == -1.0  # a new episode has no flip history


def test_gripper_flip_after_debounce_window_passes():
    arm = RecordingArm()
    safety = SafetyLayer(arm, config(gripper_debounce_steps=2))
    out = [float(safety.send(action(gripper=g))[6]) for g in (1, 1, 1, -1)]
    assert out == [1, 1, 1, -1]
    assert safety.clamp_counts["gripper_debounce"] == 0


def test_rate_limit_waits_for_the_next_slot():
    arm = RecordingArm()
    safety = SafetyLayer(arm, config(max_rate_hz=20.0))
    t0 = time.monotonic()
    for _ in range(5):
        safety.send(action(dx=0.001))
    elapsed = time.monotonic() - t0
    assert elapsed >= 4 / 20.0 - 0.01  # 5 commands need at least 4 periods
    assert safety.clamp_counts["rate_limit"] == 4
    assert len(arm.sent) == 5


def test_watchdog_stops_the_arm_when_commands_stop():
    arm = RecordingArm()
    with SafetyLayer(arm, config(watchdog_timeout_s=0.15, watchdog_poll_s=0.01)) as safety:
        for _ in range(5):
            safety.send(action(dx=0.001))
            time.sleep(0.02)
        assert arm.stops == 0  # commands keep coming: no stop
        t0 = time.monotonic()
        assert arm.stopped_event.wait(2.0)
        waited = time.monotonic() - t0
        assert 0.1 <= waited < 1.0
        time.sleep(0.3)
        assert arm.stops == 1 and safety.watchdog.trips == 1  # one stop per silence, not one per poll
        safety.send(action(dx=0.001))  # a new command re-arms it
        assert safety.watchdog.armed


def test_watchdog_disarmed_between_episodes():
    stops = []
    dog = Watchdog(0.05, lambda: stops.append(1), poll_s=0.01).start()
    try:
        dog.feed()
        dog.disarm()
        time.sleep(0.2)
        assert stops == []
    finally:
        dog.close()


def test_exception_while_sending_stops_the_arm():
    arm = RecordingArm(fail_on_send=True)
    safety = SafetyLayer(arm, config())
    with pytest.raises(RuntimeError, match="reflex"):
        safety.send(action(dx=0.01))
    assert arm.stops == 1


def test_non_finite_action_is_refused_and_stops():
    arm = RecordingArm()
    safety = SafetyLayer(arm, config())
    with pytest.raises(SafetyViolation):
        safety.send(action(dx=float("nan")))
    assert arm.stops == 1 and arm.sent == []


def test_config_from_mapping_rejects_unknown_keys_and_bad_box():
    with pytest.raises(ValueError, match="unknown keys"):
        SafetyConfig.from_mapping({"workspace_minn": [0, 0, 0]})
    with pytest.raises(ValueError, match="below"):
        SafetyLayer(RecordingArm(), config(workspace_min=[0.8, 0, 0]))
