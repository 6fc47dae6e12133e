"""Feature names and shapes of the twin's LeRobot datasets (shared with the real-robot collector)."""
from __future__ import annotations

IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
STATE_NAMES = ["tcp_x", "tcp_y", "tcp_z", "tcp_qw", "tcp_qx", "tcp_qy", "tcp_qz", "gripper_opening"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
ROBOT_TYPE = "franka_panda"


def dataset_features(image_hw: tuple[int, int], use_videos: bool = False) -> dict:
    """LeRobot v3.0 ``features`` for ``LeRobotDataset.create``."""
    h, w = image_hw
    return {
        IMAGE_KEY: {"dtype": "video" if use_videos else "image", "shape": (h, w, 3),
                    "names": ["height", "width", "channels"]},
        STATE_KEY: {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": STATE_NAMES},
        ACTION_KEY: {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": ACTION_NAMES},
    }
