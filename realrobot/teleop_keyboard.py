"""Keyboard teleoperation: held keys move the end effector by a fixed step per control step.

Key input comes from pynput when a display is available (held keys are tracked, so holding a key
moves continuously), else from the terminal in cbreak mode (each received key press moves one
step; the terminal's key repeat gives continuous motion). Both are imported in ``connect``.
"""
from __future__ import annotations

import logging
import os
import select
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from realrobot.arm import ACTION_DIM, GRIPPER_INDEX
from realrobot.teleop import Teleop, TeleopConfig, TeleopDeviceError, TeleopEvents

log = logging.getLogger(__name__)

# Terminal bytes of the named keys (cbreak mode).
_TERMINAL_NAMES = {"\n": "enter", "\r": "enter", "\x7f": "backspace", "\x08": "backspace",
                   "\x1b": "esc", " ": "space", "\t": "tab"}


def _default_bindings() -> dict:
    # key -> [action index, sign]
    return {"w": [0, 1], "s": [0, -1], "a": [1, 1], "d": [1, -1], "r": [2, 1], "f": [2, -1],
            "u": [3, 1], "o": [3, -1], "i": [4, 1], "k": [4, -1], "j": [5, 1], "l": [5, -1]}


@dataclass
class KeyboardTeleopConfig(TeleopConfig):
    type = "keyboard"
    input: str = "auto"  # auto (pynput, else terminal) | pynput | terminal
    translation_step_m: float = 0.01
    rotation_step_rad: float = 0.05
    bindings: dict = field(default_factory=_default_bindings)
    gripper_toggle_key: str = "space"
    end_episode_key: str = "enter"
    rerecord_key: str = "backspace"
    stop_key: str = "esc"


class _PynputKeys:
    def __init__(self):
        from pynput import keyboard  # raises without a display
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._taps: list[str] = []
        self._listener = keyboard.Listener(on_press=self._on_press, on_release=self._on_release)

    @staticmethod
    def _name(key) -> str | None:
        char = getattr(key, "char", None)
        return char.lower() if char else getattr(key, "name", None)

    def _on_press(self, key):
        name = self._name(key)
        if name:
            with self._lock:
                if name not in self._held:
                    self._taps.append(name)
                self._held.add(name)

    def _on_release(self, key):
        with self._lock:
            self._held.discard(self._name(key))

    def start(self):
        if not self._listener.is_alive():
            self._listener.start()

    def pause(self):
        pass  # pynput listens globally; keys typed meanwhile are dropped by reset()

    def poll(self) -> tuple[set[str], list[str]]:
        with self._lock:
            taps, self._taps = self._taps, []
            return set(self._held), taps

    def close(self):
        self._listener.stop()


class _TerminalKeys:
    def __init__(self):
        if not sys.stdin.isatty():
            raise TeleopDeviceError("keyboard teleop: stdin is not a terminal")
        import termios
        import tty
        self._termios = termios
        self._fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self._fd)
        self._tty = tty

    def start(self):
        self._tty.setcbreak(self._fd)

    def pause(self):
        self._termios.tcsetattr(self._fd, self._termios.TCSADRAIN, self._saved)

    def poll(self) -> tuple[set[str], list[str]]:
        taps = []
        while select.select([self._fd], [], [], 0)[0]:
            ch = os.read(self._fd, 1).decode(errors="ignore")
            if ch:
                taps.append(_TERMINAL_NAMES.get(ch, ch.lower()))
        return set(taps), taps

    def close(self):
        self._termios.tcsetattr(self._fd, self._termios.TCSADRAIN, self._saved)


class KeyboardTeleop(Teleop):
    config_class = KeyboardTeleopConfig
    name = "keyboard"

    def __init__(self, config: KeyboardTeleopConfig):
        super().__init__(config)
        self.keys = None
        self.gripper = 1.0
        self._events = TeleopEvents()

    @property
    def is_connected(self) -> bool:
        return self.keys is not None

    def connect(self) -> None:
        kind = self.config.input
        if kind in ("auto", "pynput"):
            try:
                self.keys = _PynputKeys()
            except Exception as e:  # pynput raises ImportError or display errors without X
                if kind == "pynput":
                    raise TeleopDeviceError(f"keyboard teleop: pynput unavailable ({e})") from e
                log.info("pynput unavailable (%s); reading keys from the terminal", e)
        if self.keys is None:
            self.keys = _TerminalKeys()
        c = self.config
        log.info("keyboard teleop: %s move, %s gripper, %s end episode, %s re-record, %s stop",
                 sorted(c.bindings), c.gripper_toggle_key, c.end_episode_key, c.rerecord_key, c.stop_key)

    def reset(self) -> None:
        self.gripper = 1.0
        self.keys.start()
        self.keys.poll()  # forget keys pressed between episodes
        self._events = TeleopEvents()

    def pause(self) -> None:
        self.keys.pause()

    def get_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        held, taps = self.keys.poll()
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        for key in held:
            if key in c.bindings:
                index, sign = c.bindings[key]
                step = c.translation_step_m if index < 3 else c.rotation_step_rad
                action[index] += sign * step
        for key in taps:
            if key == c.gripper_toggle_key:
                self.gripper = -self.gripper
            elif key == c.end_episode_key:
                self._events.end_episode = True
            elif key == c.rerecord_key:
                self._events.rerecord = True
            elif key == c.stop_key:
                self._events.stop = True
        action[GRIPPER_INDEX] = self.gripper
        return action

    def get_events(self) -> TeleopEvents:
        events, self._events = self._events, TeleopEvents()
        return events

    def disconnect(self) -> None:
        if self.keys is not None:
            self.keys.close()
            self.keys = None
