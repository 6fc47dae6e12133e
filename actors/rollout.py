"""One env's rollout cut into segments of T chunk-steps: the one place a segment is built.

Both inference modes use it: the lockstep actor (``actors/main.py``, one builder per env) and each
env worker of the inference server (``actors/inference_server.py``). Per chunk-step the caller
records what the policy sampled (``record_sample``), runs the chunk, and records its result
(``record_result``, with V(final obs) when the time limit cut the episode). After T chunk-steps the
segment is ``full``; ``finish`` adds the bootstrap observation at index T and hands the segment on
with its bookkeeping (env steps, episodes, successes, returns, the oldest policy version in it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from actors.env_pool import ChunkResult
from common.segment import SegmentSpec


@dataclass
class SegmentStats:
    env_steps: int = 0
    episodes: int = 0
    successes: int = 0
    returns: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def meta(self, env_index: int, seq: int) -> dict:
        """What travels with the segment (and what the actor reports). ``seq`` counts this env's
        segments, so that a receiver that joins consecutive segments into episodes sees a gap."""
        return dict(env_steps=self.env_steps, episodes=self.episodes, successes=self.successes,
                    returns=list(self.returns), env_index=env_index, env_seq=seq, version=min(self.versions))


class SegmentBuilder:
    def __init__(self, spec: SegmentSpec, gamma: float, env_index: int, reward_scale: float = 1.0):
        self.spec, self.gamma, self.env_index = spec, float(gamma), env_index
        self.reward_scale = float(reward_scale)
        self.seq = 0  # segments finished so far
        self._new()

    def _new(self):
        self.buf, self.t, self.stats = self.spec.empty(), 0, SegmentStats()

    @property
    def full(self) -> bool:
        return self.t == self.spec.steps

    def record_sample(self, obs: dict, tokens: np.ndarray, chain: np.ndarray, log_prob: float, value: float,
                      version: int):
        """Chunk-step t's observation and what the behaviour policy (``version``) sampled for it."""
        b, t = self.buf, self.t
        b["image"][t], b["state"][t], b["tokens"][t] = obs["image"], obs["state"], tokens
        b["chain"][t], b["behaviour_logp"][t], b["behaviour_value"][t] = chain, log_prob, value
        self.stats.versions.append(int(version))

    def record_result(self, r: ChunkResult, final_value: Optional[float] = None):
        """Chunk-step t's outcome, its reward times ``reward_scale`` (the value head's units). A
        time-limit truncation bootstraps through the limit: reward + gamma * V(final obs),
        ``final_value`` from the behaviour policy (already in those units). Episode returns in the
        stats stay in the env's units."""
        reward = r.reward * self.reward_scale
        if r.truncated:
            if final_value is None:
                raise ValueError("a truncated chunk needs the value of its final observation")
            reward += self.gamma * float(final_value)
        b, t, s = self.buf, self.t, self.stats
        b["reward"][t], b["done"][t], b["success"][t] = reward, r.done, r.success
        s.env_steps += r.env_steps
        if r.done:
            s.episodes += 1
            s.successes += int(r.success)
            s.returns.append(float(r.episode_return))
        self.t += 1

    def finish(self, obs: dict, tokens: np.ndarray) -> tuple[dict, dict]:
        """The full segment, with the observation after it (index T, for the learner's bootstrap
        value), and its ``SegmentStats.meta``; the builder starts the next segment."""
        if not self.full:
            raise ValueError(f"segment has {self.t} of {self.spec.steps} chunk-steps")
        T = self.spec.steps
        self.buf["image"][T], self.buf["state"][T], self.buf["tokens"][T] = obs["image"], obs["state"], tokens
        out = (self.buf, self.stats.meta(self.env_index, self.seq))
        self.seq += 1
        self._new()
        return out
