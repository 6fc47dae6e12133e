"""Feature names and shapes of Tandem's LeRobot datasets: the twin's demos, the real collector's episodes
and the learner's episode decoder (no simulator import)."""
from __future__ import annotations

IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
# LeRobot's name for privileged simulator state; Tandem's sim demos store the object and bowl
# positions there (the policy's auxiliary localisation loss); real episodes have no such column.
PRIVILEGED_KEY = "observation.environment_state"
PRIVILEGED_NAMES = ["object_x", "object_y", "object_z", "bowl_x", "bowl_y", "bowl_z"]
STATE_NAMES = ["tcp_x", "tcp_y", "tcp_z", "tcp_qw", "tcp_qx", "tcp_qy", "tcp_qz", "gripper_opening"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
ROBOT_TYPE = "franka_panda"
STATE_DIM = len(STATE_NAMES)
ACTION_DIM = len(ACTION_NAMES)


def dataset_features(image_hw: tuple[int, int], use_videos: bool = False, privileged: bool = False) -> dict:
    """LeRobot v3.0 ``features`` for ``LeRobotDataset.create`` (``privileged``: add the sim labels)."""
    h, w = image_hw
    extra = ({PRIVILEGED_KEY: {"dtype": "float32", "shape": (len(PRIVILEGED_NAMES),), "names": PRIVILEGED_NAMES}}
             if privileged else {})
    return {**extra,
        IMAGE_KEY: {"dtype": "video" if use_videos else "image", "shape": (h, w, 3),
                    "names": ["height", "width", "channels"]},
        STATE_KEY: {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": STATE_NAMES},
        ACTION_KEY: {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": ACTION_NAMES},
    }
