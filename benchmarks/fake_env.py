"""A simulator-free env for tests and CPU benchmarks of the inference-server path:
``actor.server.env_factory=benchmarks.fake_env:FakeTwinEnv``."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from actors.env_pool import ChunkResult
from common.laps import LAPS


class FakeTwinEnv:
    """Deterministic stand-in for ``actors.env_pool._SingleEnv``: random images, fixed episode
    length (``env_cfg["max_episode_steps"]``, truncated), no success. ``step_cost_s`` of sleep per env
    step imitates a simulator."""

    def __init__(self, env_cfg: Any, real_proxy: bool, seed: int):
        cfg = dict(env_cfg or {})
        size = cfg.get("image_size") or 32
        self.hw = (size, size) if isinstance(size, int) else tuple(size)
        self.max_steps = int(cfg.get("max_episode_steps", 20))
        self.step_cost_s = float(cfg.get("step_cost_s", 0.0))
        self.rng = np.random.default_rng(seed)
        self.instructions = ["put the red cube into the bowl", "put the blue ball into the bowl"]
        self.elapsed, self.episodes, self.instruction = 0, 0, ""

    def _obs(self) -> dict:
        return {"image": self.rng.integers(0, 256, (*self.hw, 3), dtype=np.uint8),
                "state": self.rng.standard_normal(8).astype(np.float32)}

    def reset(self):
        self.elapsed = 0
        self.instruction = self.instructions[self.episodes % len(self.instructions)]
        return self._obs(), self.instruction

    def run_chunk(self, actions: np.ndarray):
        total, steps = 0.0, 0
        for a in actions:
            t = time.perf_counter()
            if self.step_cost_s:
                time.sleep(self.step_cost_s)
            LAPS.lap("physics", t)
            self.elapsed += 1
            steps += 1
            total += float(-np.abs(a).mean())
            if self.elapsed >= self.max_steps:
                self.episodes += 1
                final = self._obs()
                ep_len = self.elapsed
                obs, instr = self.reset()
                return ChunkResult(obs, instr, total, True, True, False, final, steps, total, ep_len)
        return ChunkResult(self._obs(), self.instruction, total, False, False, False, None, steps, 0.0, 0)

    def close(self):
        pass
