"""Teleop mappings (keyboard, SpaceMouse) with stand-in input devices, and the operator prompt."""
import io

import numpy as np
import pytest

from realrobot.operator_prompt import EpisodeLabel, StdinPrompt, StdinPromptConfig
from realrobot.teleop import make_teleop


class FakeKeys:
    def __init__(self, frames):
        self.frames = list(frames)

    def start(self): pass
    def pause(self): pass
    def close(self): pass

    def poll(self):
        return self.frames.pop(0) if self.frames else (set(), [])


def keyboard(frames, **cfg):
    teleop = make_teleop({"type": "keyboard", "translation_step_m": 0.01, "rotation_step_rad": 0.05, **cfg})
    teleop.keys = FakeKeys([(set(), [])] + list(frames))  # the first poll is reset()'s
    teleop.reset()
    return teleop


def test_keyboard_held_keys_map_to_scaled_deltas_and_gripper_toggles():
    teleop = keyboard([({"w", "a"}, ["w", "a"]), ({"w", "j"}, ["j", "space"]), (set(), ["space"])])
    a0, a1, a2 = (teleop.get_action({}) for _ in range(3))
    np.testing.assert_allclose(a0, [0.01, 0.01, 0, 0, 0, 0, 1.0])
    np.testing.assert_allclose(a1, [0.01, 0, 0, 0, 0, 0.05, -1.0])  # yaw + gripper closed
    np.testing.assert_allclose(a2, [0, 0, 0, 0, 0, 0, 1.0])  # toggled open again


def test_keyboard_events_are_reported_once():
    teleop = keyboard([(set(), ["enter"]), (set(), ["backspace", "esc"])])
    teleop.get_action({})
    first = teleop.get_events()
    assert first.end_episode and not first.rerecord
    assert not teleop.get_events().end_episode  # consumed
    teleop.get_action({})
    second = teleop.get_events()
    assert second.rerecord and second.stop


class FakeSpaceMouse:
    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0)

    def close(self): pass


def test_spacemouse_scales_deadzone_signs_and_button_edges():
    teleop = make_teleop({"type": "spacemouse", "translation_scale_m": 0.02, "rotation_scale_rad": 0.1,
                          "deadzone": 0.1, "axis_signs": [1, -1, 1, 1, 1, -1]})
    teleop.device = FakeSpaceMouse([
        (np.array([0.5, 0.5, 0.05, 0, 0, 1.0], np.float32), [1, 0]),  # press button 0
        (np.array([2.0, 0, 0, 0, 0, 0], np.float32), [1, 0]),  # still held: no second toggle
        (np.zeros(6, np.float32), [0, 1]),  # button 1: end episode
    ])
    a0 = teleop.get_action({})
    np.testing.assert_allclose(a0, [0.01, -0.01, 0.0, 0, 0, -0.1, -1.0], atol=1e-7)
    a1 = teleop.get_action({})
    assert a1[0] == pytest.approx(0.02) and a1[6] == -1.0  # clipped to full scale, gripper unchanged
    assert not teleop.get_events().end_episode
    teleop.get_action({})
    assert teleop.get_events().end_episode


def test_stdin_prompt_reprompts_until_a_valid_answer():
    out = io.StringIO()
    prompt = StdinPrompt(StdinPromptConfig(), stream_in=io.StringIO("x\n\nf\ns\n"), stream_out=out)
    assert prompt.label(0, 10, "task") is EpisodeLabel.FAILURE
    assert prompt.label(1, 10, "task") is EpisodeLabel.SUCCESS
    assert prompt.label(2, 10, "task") is EpisodeLabel.STOP  # end of input
    assert out.getvalue().count("[s]uccess") == 5
