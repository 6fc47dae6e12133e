"""Single-env gymnasium view of the batched twin task, in numpy and env units.

Observation: {"image": uint8 [H, W, 3], "state": float32 [8]} (obs_mode "rgb") or
{"state": float32 [8]} (obs_mode "state", no rendering). The instruction is in
``info["instruction"]`` after reset and in ``env.instruction``; ``info["privileged"]`` holds the
object and bowl positions (float32 [6], robot base frame; simulator-only labels); the rest of the
privileged simulator state is on ``env.task`` (the ManiSkill env).

The ManiSkill task runs with obs_mode "none": the wrapper renders the one camera itself, at reset
and in ``step``, which is ManiSkill's ``BaseEnv.step`` taken apart in its order (physics, evaluate,
reward, then the observation). So ``common.laps`` can time each part (``bench_gpu.py --phases
profile``), ``step(action, observe=False)`` can skip the render of a step whose image nobody reads
(inside an action chunk), and ``camera.readback: host`` can fetch the picture without CUDA. The
observation dicts the wrapper never used (agent proprioception, task extras, camera parameters)
are no longer built. ``make_task`` builds the task as the wrapper did before, for comparisons.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from common.dataset_schema import ACTION_DIM
from common.laps import LAPS
from common.twin.task import TASK_ID, TandemPickPlaceEnv, to_dict

OBS_MODES = ("rgb", "state")
DENSE_REWARD_MODES = ("dense", "normalized_dense")
READBACKS = ("device", "host")
# tcp position (m, generous workspace box), tcp quaternion wxyz, gripper opening (m)
STATE_LOW = np.array([-2, -2, -2, -1, -1, -1, -1, -0.01], dtype=np.float32)
STATE_HIGH = np.array([2, 2, 2, 1, 1, 1, 1, 0.1], dtype=np.float32)


def make_task(cfg: dict, obs_mode: str = "none", render_mode: Optional[str] = None) -> TandemPickPlaceEnv:
    """The ManiSkill task of a ``to_dict`` env config."""
    return gym.make(cfg.get("task_id", TASK_ID), disable_env_checker=True, tandem_cfg=cfg, num_envs=int(cfg["num_envs"]),
                    obs_mode=obs_mode, sim_backend=cfg["sim_backend"], render_backend=cfg["render_backend"],
                    reward_mode=cfg["reward_mode"], render_mode=render_mode).unwrapped


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
        # the dense return counts to the time limit (configs/env/twin.yaml, reward.dense_finite_horizon)
        self.finite_horizon = (self.terminate_on_success and cfg["reward_mode"] in DENSE_REWARD_MODES
                               and bool(cfg["reward"]["dense_finite_horizon"]))
        self.readback = cfg["camera"]["readback"]
        if self.readback not in READBACKS:
            raise ValueError(f"camera.readback must be one of {READBACKS}, got {self.readback!r}")
        self.task = make_task(cfg, render_mode="rgb_array" if render_mode == "rgb_array" else None)
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

    def _obs(self, rgb: Optional[torch.Tensor]) -> dict:
        t = time.perf_counter()
        obs = {}
        if rgb is not None:
            obs["image"] = rgb.cpu().numpy().astype(np.uint8)
            t = LAPS.lap("readback", t)
        obs["state"] = self.task.proprio()[0].cpu().numpy().astype(np.float32)
        LAPS.lap("state", t)
        return obs

    def _render_rgb(self) -> torch.Tensor:
        """[H, W, 3] uint8 of the camera, as ``BaseEnv._get_obs_sensor_data`` makes it, timed in two
        parts: the render pass as the CPU submits it, then waiting for the picture (on a GPU
        renderer, its render time, including the time-slicing with other processes' passes).
        ``camera.readback: host`` takes the picture as ManiSkill does on a CPU renderer (the
        renderer's own download) instead of a CUDA tensor, so the process needs no CUDA context."""
        task = self.task
        t = time.perf_counter()
        for obj in task._hidden_objects:
            obj.hide_visual()
        task.scene.update_render(update_sensors=True, update_human_render_cameras=False)
        task.capture_sensor_data()
        t = LAPS.lap("render", t)
        sensor = task.scene.sensors[self.cfg["camera"]["uid"]]
        if self.readback == "host":
            shader = sensor.config.shader_config
            name = next(k for k, v in shader.texture_names.items() if "rgb" in v)
            picture = torch.from_numpy(sensor.camera._render_cameras[0].get_picture(name))
            rgb = shader.texture_transforms[name](picture)["rgb"]
        else:
            rgb = sensor.get_obs(rgb=True, depth=False, position=False, segmentation=False)["rgb"][0]
            if task.backend.render_device.is_cuda():
                torch.cuda.synchronize()
        LAPS.lap("render_wait", t)
        return rgb

    def _info(self, info: dict, observed: bool = True) -> dict:
        """``privileged`` labels an observation: None for a step without one."""
        t = time.perf_counter()
        out = {"instruction": self.instruction, "success": bool(info["success"][0]),
               "is_grasped": bool(info["is_grasped"][0]), "elapsed_steps": self._elapsed,
               "privileged": self.task.privileged()[0].cpu().numpy() if observed else None}
        LAPS.lap("state", t)
        return out

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        if seed is None and self._next_seed is not None:
            seed = self._next_seed
        self._next_seed = None
        super().reset(seed=seed)
        if seed is None:
            # keep episodes reproducible from the first seed: draw the next one from our RNG
            seed = int(self.np_random.integers(2**31 - 1))
        t = time.perf_counter()
        _, info = self.task.reset(seed=seed, options=options)
        LAPS.lap("reset", t)
        self._elapsed = 0
        self.instruction = self.task.instructions[0]
        return self._obs(self._render_rgb() if self.obs_mode == "rgb" else None), self._info(info)

    def step(self, action, observe: bool = True):
        """The gymnasium step. ``observe=False``: ``obs`` is None unless the episode ends at this step
        (the same scene, reward and info otherwise, but no render pass and no ``info["privileged"]``)."""
        action = np.asarray(action, dtype=np.float32).reshape(ACTION_DIM)
        task = self.task
        t = time.perf_counter()
        applied = task._step_action(action[None])
        task._elapsed_steps += 1
        t = LAPS.lap("physics", t)
        info = task.get_info()
        t = LAPS.lap("evaluate", t)
        reward = task.get_reward(obs=None, action=applied, info=info)  # the twin's rewards read the state only
        LAPS.lap("reward", t)
        self._elapsed += 1
        success = bool(info["success"][0])
        terminated = success and self.terminate_on_success
        truncated = self._elapsed >= self.max_episode_steps and not terminated
        reward = float(reward[0])
        if self.finite_horizon:
            if terminated:  # the task's success reward is its per-step maximum: paid for this step and each one left
                reward *= 1 + self.max_episode_steps - self._elapsed
            # the limit is part of the task now, a terminal state: nothing to bootstrap beyond it
            terminated, truncated = terminated or truncated, False
        obs = None
        if observe or terminated or truncated:
            obs = self._obs(self._render_rgb() if self.obs_mode == "rgb" else None)
        return obs, reward, terminated, truncated, self._info(info, observed=obs is not None)

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
