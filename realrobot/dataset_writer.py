"""Recorded episodes into a LeRobot v3.0 dataset with the twin's features.

Frames: ``observation.image`` uint8 [H, W, 3], ``observation.state`` float32 [8], ``action``
float32 [7] (the action the safety layer let through, i.e. what the arm executed), ``task``.
LeRobot has no per-episode label field, so each kept episode also gets one line in
``meta/tandem_episodes.jsonl`` under the dataset root: its index, episode_id, success label,
source and policy version. An existing dataset at ``root`` is appended to.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.episode_msg import ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode

LABELS_FILE = "meta/tandem_episodes.jsonl"


@dataclass
class EpisodeBuffer:
    """Frames of the episode being recorded."""
    images: list = field(default_factory=list)
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)

    def append(self, image: np.ndarray, state: np.ndarray, action: np.ndarray) -> None:
        self.images.append(np.asarray(image, dtype=np.uint8))
        self.states.append(np.asarray(state, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.actions)

    def clear(self) -> None:
        self.images.clear()
        self.states.clear()
        self.actions.clear()

    def to_episode(self, **kw) -> Episode:
        return Episode(images=np.stack(self.images), states=np.stack(self.states),
                       actions=np.stack(self.actions), **kw).validate()


def dataset_features(image_hw: tuple[int, int]) -> dict:
    try:
        from common.dataset_schema import dataset_features as twin_features
        return twin_features(image_hw, use_videos=False)
    except ImportError:  # the twin's schema module is the reference; this mirrors it
        h, w = image_hw
        return {IMAGE_KEY: {"dtype": "image", "shape": (h, w, 3), "names": ["height", "width", "channels"]},
                STATE_KEY: {"dtype": "float32", "shape": (8,), "names": None},
                ACTION_KEY: {"dtype": "float32", "shape": (7,), "names": None}}


class DatasetWriter:
    def __init__(self, repo_id: str, root: str | os.PathLike, fps: int, image_hw: tuple[int, int],
                 robot_type: str = "franka_panda"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local datasets only: never reach for a hub
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        self.root = Path(root)
        if (self.root / "meta" / "info.json").exists():
            self.dataset = LeRobotDataset(repo_id, root=self.root)
            want = tuple(dataset_features(image_hw)[IMAGE_KEY]["shape"])
            have = tuple(self.dataset.features[IMAGE_KEY]["shape"])
            if have != want or self.dataset.fps != fps:
                raise ValueError(f"dataset at {self.root} has image {have} at {self.dataset.fps} fps; "
                                 f"this session records {want} at {fps} fps: use another root")
        else:
            self.dataset = LeRobotDataset.create(repo_id, fps, dataset_features(image_hw), root=self.root,
                                                 robot_type=robot_type, use_videos=False)
        self.fps = fps

    @property
    def num_episodes(self) -> int:
        return int(self.dataset.meta.total_episodes)

    def write(self, ep: Episode) -> int:
        """Append ``ep`` (all frames, then save_episode); returns its episode index."""
        index = self.num_episodes
        for image, state, action in zip(ep.images, ep.states, ep.actions):
            self.dataset.add_frame({IMAGE_KEY: image, STATE_KEY: state, ACTION_KEY: action, "task": ep.task})
        self.dataset.save_episode()
        label = {"episode_index": index, "episode_id": ep.episode_id, "task": ep.task, "success": bool(ep.success),
                 "source": ep.source, "policy_version": ep.policy_version, "num_frames": ep.num_frames}
        with open(self.root / LABELS_FILE, "a") as f:
            f.write(json.dumps(label) + "\n")
        return index

    def close(self) -> None:
        self.dataset.finalize()


def read_labels(root: str | os.PathLike) -> list[dict]:
    path = Path(root) / LABELS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
