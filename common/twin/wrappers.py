"""Single-env gymnasium view of the batched twin task, in numpy and env units.

Observation: {"image": uint8 [H, W, 3], "state": float32 [8]} (obs_mode "rgb") or
{"state": float32 [8]} (obs_mode "state", no rendering). The instruction is in
``info["instruction"]`` after reset and in ``env.instruction``; ``info["privileged"]`` holds the
object and bowl positions (float32 [6], robot base frame; simulator-only labels); the rest of the
privileged simulator state is on ``env.task`` (the ManiSkill env).
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from common.dataset_schema import ACTION_DIM
from common.twin.task import TASK_ID, TandemPickPlaceEnv, to_dict

OBS_MODES = ("rgb", "state")
# tcp position (m, generous workspace box), tcp quaternion wxyz, gripper opening (m)
STATE_LOW = np.array([-2, -2, -2, -1, -1, -1, -1, -0.01], dtype=np.float32)
STATE_HIGH = np.array([2, 2, 2, 1, 1, 1, 1, 0.1], dtype=np.float32)


class TwinEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_cfg: Any = None, *, real_proxy: Optional[bool] = None, seed: Optional[int] = None,
                 obs_mode: str = "rgb", render_mode: Optional[str] = None):
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        cfg = to_dict(env_cfg)
        if real_proxy is not None:
            cfg["real_proxy"] = bool(real_proxy)
        self.cfg = cfg
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.image_size = (int(cfg["camera"]["height"]), int(cfg["camera"]["width"]))
        self.max_episode_steps = int(cfg["max_episode_steps"])
        self.terminate_on_success = bool(cfg["terminate_on_success"])
        self.task: TandemPickPlaceEnv = gym.make(
            cfg.get("task_id", TASK_ID), disable_env_checker=True, tandem_cfg=cfg, num_envs=int(cfg["num_envs"]),
            obs_mode="rgb" if obs_mode == "rgb" else "none", sim_backend=cfg["sim_backend"],
            render_backend=cfg["render_backend"], reward_mode=cfg["reward_mode"],
            render_mode="rgb_array" if render_mode == "rgb_array" else None,
        ).unwrapped
        if self.task.num_envs != 1:
            raise ValueError("TwinEnv is the single-env view; use the task directly for num_envs > 1")
        a = cfg["action"]
        bound = np.array([a["max_delta_pos"]] * 3 + [a["max_delta_rot"]] * 3 + [1.0], dtype=np.float32)
        self.action_space = spaces.Box(-bound, bound, dtype=np.float32)
        obs_spaces = {"state": spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32)}
        if obs_mode == "rgb":
            obs_spaces = {"image": spaces.Box(0, 255, (*self.image_size, 3), np.uint8), **obs_spaces}
        self.observation_space = spaces.Dict(obs_spaces)
        self.instruction = ""
        self._elapsed = 0
        self._next_seed = seed

    @property
    def control_freq(self) -> int:
        return int(self.cfg["control_freq"])

    def _obs(self, raw) -> dict:
        obs = {"state": self.task.proprio()[0].cpu().numpy().astype(np.float32)}
        if self.obs_mode == "rgb":
            rgb = raw["sensor_data"][self.cfg["camera"]["uid"]]["rgb"][0]
            obs = {"image": rgb.cpu().numpy().astype(np.uint8), **obs}
        return obs

    def _info(self, info: dict) -> dict:
        return {"instruction": self.instruction, "success": bool(info["success"][0]),
                "is_grasped": bool(info["is_grasped"][0]), "elapsed_steps": self._elapsed,
                "privileged": self.task.privileged()[0].cpu().numpy()}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        if seed is None and self._next_seed is not None:
            seed = self._next_seed
        self._next_seed = None
        super().reset(seed=seed)
        if seed is None:
            # keep episodes reproducible from the first seed: draw the next one from our RNG
            seed = int(self.np_random.integers(2**31 - 1))
        raw, info = self.task.reset(seed=seed, options=options)
        self._elapsed = 0
        self.instruction = self.task.instructions[0]
        return self._obs(raw), self._info(info)

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(ACTION_DIM)
        raw, reward, terminated, _, info = self.task.step(action[None])
        self._elapsed += 1
        success = bool(info["success"][0])
        terminated = success and self.terminate_on_success
        truncated = self._elapsed >= self.max_episode_steps and not terminated
        return self._obs(raw), float(reward[0]), terminated, truncated, self._info(info)

    def render(self):
        if self.render_mode == "rgb_array":
            return self.task.render()[0].cpu().numpy()
        return None

    def close(self):
        self.task.close()


def make_env(env_cfg: Any = None, *, real_proxy: Optional[bool] = None, seed: Optional[int] = None,
             obs_mode: str = "rgb") -> TwinEnv:
    """The twin (or real proxy) as a single gymnasium env on physx_cpu.

    ``env_cfg``: the composed ``cfg.env`` (DictConfig or dict; None loads configs/env/twin.yaml).
    ``real_proxy``: overrides ``env_cfg.real_proxy``. ``seed``: used by the first reset without a seed.
    """
    return TwinEnv(env_cfg, real_proxy=real_proxy, seed=seed, obs_mode=obs_mode)
