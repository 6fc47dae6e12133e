"""How an episode gets its label: the operator says success, failure, discard or re-record.

``stdin``: asks on the terminal after each episode. ``auto``: labels from the sim cell's success
flag (for the scripted teleop and sim evaluation); it never discards.
"""
from __future__ import annotations

import abc
import enum
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, TextIO

from realrobot.device_config import DeviceConfig, load_backend


class EpisodeLabel(enum.Enum):
    SUCCESS = "success"  # keep, success=True
    FAILURE = "failure"  # keep, success=False
    DISCARD = "discard"  # drop this attempt, go on to the next episode
    RERECORD = "rerecord"  # drop this attempt, record the same episode again
    STOP = "stop"  # drop this attempt and end the session

    @property
    def keep(self) -> bool:
        return self in (EpisodeLabel.SUCCESS, EpisodeLabel.FAILURE)


@dataclass
class PromptConfig(DeviceConfig):
    type: ClassVar[str] = ""


class OperatorPrompt(abc.ABC):
    config_class: ClassVar[type[PromptConfig]]

    def __init__(self, config: PromptConfig):
        self.config = config

    @abc.abstractmethod
    def label(self, episode_index: int, num_frames: int, task: str) -> EpisodeLabel:
        """Called after an episode; blocks until it is labelled."""


@dataclass
class StdinPromptConfig(PromptConfig):
    type = "stdin"


class StdinPrompt(OperatorPrompt):
    config_class = StdinPromptConfig
    KEYS = {"s": EpisodeLabel.SUCCESS, "f": EpisodeLabel.FAILURE, "d": EpisodeLabel.DISCARD,
            "r": EpisodeLabel.RERECORD, "q": EpisodeLabel.STOP}

    def __init__(self, config: StdinPromptConfig, stream_in: TextIO | None = None,
                 stream_out: TextIO | None = None):
        super().__init__(config)
        self.stream_in = stream_in or sys.stdin
        self.stream_out = stream_out or sys.stdout

    def label(self, episode_index: int, num_frames: int, task: str) -> EpisodeLabel:
        question = (f"episode {episode_index} ({num_frames} frames, task {task!r}): "
                    "[s]uccess / [f]ailure / [d]iscard / [r]e-record / [q]uit? ")
        while True:
            self.stream_out.write(question)
            self.stream_out.flush()
            line = self.stream_in.readline()
            if not line:  # end of input: keep nothing more
                return EpisodeLabel.STOP
            answer = line.strip().lower()[:1]
            if answer in self.KEYS:
                return self.KEYS[answer]


@dataclass
class AutoPromptConfig(PromptConfig):
    type = "auto"


class AutoPrompt(OperatorPrompt):
    """Labels from the sim cell's success flag."""

    config_class = AutoPromptConfig

    def __init__(self, config: AutoPromptConfig, cell):
        super().__init__(config)
        self.cell = cell

    def label(self, episode_index: int, num_frames: int, task: str) -> EpisodeLabel:
        return EpisodeLabel.SUCCESS if self.cell.success else EpisodeLabel.FAILURE


PROMPT_BACKENDS = {"stdin": "realrobot.operator_prompt:StdinPrompt",
                   "auto": "realrobot.operator_prompt:AutoPrompt"}


def make_prompt(cfg: Mapping[str, Any], cell: Any = None) -> OperatorPrompt:
    kind = cfg["type"]
    cls = load_backend(PROMPT_BACKENDS, kind, "operator prompt")
    config = cls.config_class.from_mapping(cfg)
    if kind == "auto":
        if cell is None:
            raise ValueError("the auto prompt labels from the sim's success flag: it needs robot.arm.type=sim")
        return cls(config, cell)
    return cls(config)
