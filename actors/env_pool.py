"""Twin envs driven by an actor: in-process for one env, one worker process per env otherwise.

physx_cpu allows one ManiSkill env per process, so an actor with several envs runs each in its
own worker process. A worker executes a whole action chunk (k env steps) per request, which
keeps inter-process traffic to one round trip per chunk-step.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf


@dataclass
class ChunkResult:
    obs: dict  # observation after the chunk (first obs of a new episode when done)
    instruction: str  # instruction of the episode ``obs`` belongs to
    reward: float  # sum of rewards over the executed steps
    done: bool  # the episode ended inside this chunk (terminated or truncated)
    truncated: bool  # ended by the time limit rather than a terminal state
    success: bool  # the episode that ended was a success
    final_obs: Optional[dict]  # last observation of the ended episode (for truncation bootstrap)
    env_steps: int
    episode_return: float  # of the ended episode (valid when done)
    episode_length: int


class _SingleEnv:
    """One twin env plus the bookkeeping of its current episode."""

    def __init__(self, env_cfg: DictConfig, real_proxy: bool, seed: int):
        from common.twin import make_env

        self.env = make_env(env_cfg, real_proxy=real_proxy, seed=seed)
        self.observe_every_step = bool(self.env.cfg["observe_every_step"])
        self.seed = seed
        self.episodes = 0
        self.ep_return, self.ep_len = 0.0, 0

    def reset(self) -> tuple[dict, str]:
        obs, info = self.env.reset(seed=self.seed + self.episodes)
        self.ep_return, self.ep_len = 0.0, 0
        return obs, info["instruction"]

    def run_chunk(self, actions: np.ndarray) -> ChunkResult:
        total, steps = 0.0, 0
        last = len(actions) - 1
        for j, action in enumerate(actions):
            obs, reward, terminated, truncated, info = self.env.step(action, observe=self.observe_every_step or j == last)
            total += float(reward)
            steps += 1
            if terminated or truncated:
                self.episodes += 1
                ep_return, ep_len = self.ep_return + total, self.ep_len + steps
                new_obs, instruction = self.reset()
                return ChunkResult(new_obs, instruction, total, True, bool(truncated and not terminated),
                                   bool(info.get("success", False)), obs, steps, ep_return, ep_len)
        self.ep_return += total
        self.ep_len += steps
        return ChunkResult(obs, self.env.instruction, total, False, False, False, None, steps, 0.0, 0)

    def close(self):
        self.env.close()


def _worker(conn, env_cfg_yaml: str, real_proxy: bool, seed: int):
    env = _SingleEnv(OmegaConf.create(env_cfg_yaml), real_proxy, seed)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                conn.send(env.reset())
            elif cmd == "chunk":
                conn.send(env.run_chunk(arg))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        env.close()


class EnvPool:
    """``num_envs`` twin envs stepped together, chunk by chunk."""

    def __init__(self, env_cfg: DictConfig, num_envs: int, real_proxy: bool = False, seed: int = 0):
        self.num_envs = num_envs
        seeds = [seed + 100_003 * i for i in range(num_envs)]  # disjoint episode seeds per env
        if num_envs == 1:
            self._local = _SingleEnv(env_cfg, real_proxy, seeds[0])
            self._conns, self._procs = [], []
            return
        self._local = None
        ctx = mp.get_context("spawn")
        cfg_yaml = OmegaConf.to_yaml(env_cfg, resolve=True)
        self._conns, self._procs = [], []
        for s in seeds:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, cfg_yaml, real_proxy, s), daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)

    @property
    def local_env(self):
        """The env of a one-env pool, stepped in this process (evaluation drives it directly)."""
        if self._local is None:
            raise ValueError(f"local_env needs num_envs=1, this pool has {self.num_envs} worker processes")
        return self._local.env

    def reset(self) -> list[tuple[dict, str]]:
        if self._local is not None:
            return [self._local.reset()]
        for c in self._conns:
            c.send(("reset", None))
        return [c.recv() for c in self._conns]

    def run_chunks(self, actions: np.ndarray) -> list[ChunkResult]:
        """actions [num_envs, k, 7]: each env executes its k actions."""
        if self._local is not None:
            return [self._local.run_chunk(actions[0])]
        for c, a in zip(self._conns, actions):
            c.send(("chunk", a))
        return [c.recv() for c in self._conns]

    def close(self):
        if self._local is not None:
            self._local.close()
        for c in self._conns:
            try:
                c.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
