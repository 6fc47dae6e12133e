"""The simulated cell: one real-proxy twin env that the sim arm moves and the sim camera films.

The sim arm and the sim camera are two views of one physical scene, as the Franka and the
RealSense are; both hold the same SimCell, so the camera always shows the scene the arm has
just moved. The collector/deployer step it only through the arm (one thread).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)


class SimCell:
    def __init__(self, env_cfg: Any = None, *, seed: Optional[int] = None, real_proxy: bool = True,
                 env_factory: Optional[Callable[..., Any]] = None):
        if env_factory is None:
            from common.twin import make_env
            env_factory = make_env
        self.env = env_factory(env_cfg, real_proxy=real_proxy, seed=seed)
        self.obs: dict[str, np.ndarray] | None = None
        self.info: dict = {}
        self.terminated = False
        self.truncated = False
        self.episodes = 0

    @property
    def control_freq(self) -> int:
        return int(self.env.control_freq)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.env.image_size)

    @property
    def action_low(self) -> np.ndarray:
        return self.env.action_space.low

    @property
    def action_high(self) -> np.ndarray:
        return self.env.action_space.high

    def reset(self) -> dict[str, np.ndarray]:
        self.obs, self.info = self.env.reset()
        self.terminated = self.truncated = False
        self.episodes += 1
        return self.obs

    def step(self, action: np.ndarray) -> dict[str, np.ndarray]:
        self.obs, _, self.terminated, self.truncated, self.info = self.env.step(action)
        return self.obs

    @property
    def started(self) -> bool:
        return self.obs is not None

    @property
    def instruction(self) -> str:
        return str(self.info.get("instruction", ""))

    @property
    def success(self) -> bool:
        return bool(self.info.get("success", False))

    @property
    def episode_over(self) -> bool:
        return bool(self.terminated or self.truncated)

    def close(self) -> None:
        self.env.close()
