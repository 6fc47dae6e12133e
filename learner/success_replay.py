"""The policy's own successful twin episodes, for filtered behaviour cloning (``learner.rl_objective``).

Filtered BC (iterative BC; reward-weighted regression with a binary reward) is the RL term that
needs no likelihood of the denoising chain: roll the stochastic policy out, keep the episodes that
succeeded, and fit the flow-matching loss to what was executed in them. Its loss is the SFT loss
of Stage I, so the co-training anchor ``beta * L_SFT`` acts on the same scale (docs/stage2.md: the
PPO surrogate's gradient is ~80x the SFT term's at beta 0.2).

Segments carry T chunk-steps of one env; an episode spans several. ``EpisodeAssembler`` joins the
segments of each stream (actor, env index) in their sequence order and hands on the episodes that
end in success; a gap in a stream's sequence (a segment dropped on the way) discards the episode
it cut, so no episode is ever spliced. ``SuccessReplay`` keeps the newest successful episodes (a
FIFO bounded in chunk-steps) and samples training chunks in ``RealReplay.sample``'s layout.

A chunk-step's target is what the env executed from that observation on: the first
``exec_horizon`` actions of its own chunk, then those of the following chunk-steps, up to
``chunk_size`` (a demonstration's next ``chunk_size`` actions, as Stage I trained on); past the
episode's end the last action repeats and ``action_pad`` marks it. Actions stay normalised, as the
chain holds them; ``Policy.to_env_actions`` turns them into what the env received.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import numpy as np


@dataclass
class SuccessEpisode:
    image: np.ndarray  # uint8 [N, H, W, 3], the observation of each chunk-step
    tokens: np.ndarray  # int32 [N, L]
    state: np.ndarray  # float32 [N, S]
    actions: np.ndarray  # float32 [N * exec_horizon, A], normalised (the chains' last elements), as executed

    @property
    def steps(self) -> int:
        return len(self.image)


@dataclass
class _Partial:
    next_seq: int
    steps: Optional[list]  # (image, tokens, state, executed actions [k, A]) per chunk-step; None: joined mid-episode


class EpisodeAssembler:
    """Segments of many streams in, successful episodes out (``on_success``); a partial episode longer
    than ``max_episode_chunks`` chunk-steps is dropped (a stream that never reports an end)."""

    def __init__(self, exec_horizon: int, on_success: Callable[[SuccessEpisode], None], max_episode_chunks: int):
        self.exec_horizon, self.on_success = exec_horizon, on_success
        self.max_episode_chunks = max_episode_chunks
        self._streams: dict[Hashable, _Partial] = {}
        self.episodes = 0  # episodes seen to their end
        self.successes = 0
        self.discarded = 0  # partial episodes cut by a sequence gap (or longer than max_episode_chunks)

    def add(self, stream: Hashable, seq: int, segment: dict) -> None:
        part = self._streams.get(stream)
        if part is None or part.next_seq != seq:
            if part is not None and part.steps:
                self.discarded += 1
            # a stream's first segment (or the one after a gap) starts mid-episode: its steps up to
            # the first episode end are not a whole episode
            part = _Partial(seq, steps=None)
        part.next_seq = seq + 1
        self._streams[stream] = part
        executed = segment["chain"][:, -1, :self.exec_horizon]  # [T, k, A]
        for t in range(len(segment["done"])):
            if part.steps is not None:
                part.steps.append((segment["image"][t], segment["tokens"][t], segment["state"][t], executed[t]))
                if len(part.steps) > self.max_episode_chunks:  # not an episode of this env: drop it
                    self.discarded += 1
                    part.steps = None
            if segment["done"][t]:
                if part.steps is not None:
                    self.episodes += 1
                    if segment["success"][t]:
                        self.successes += 1
                        self.on_success(_episode(part.steps))
                part.steps = []


def _episode(steps: list) -> SuccessEpisode:
    image, tokens, state, actions = zip(*steps)
    return SuccessEpisode(np.stack(image), np.stack(tokens), np.stack(state),
                          np.concatenate(actions).astype(np.float32))


class SuccessReplay:
    """The newest successful episodes, at most ``capacity_chunks`` chunk-steps in all (oldest out first).
    Thread-safe: the ingest thread adds, the train thread samples."""

    def __init__(self, capacity_chunks: int, exec_horizon: int, seed: int = 0):
        if capacity_chunks < 1:
            raise ValueError(f"success replay capacity_chunks={capacity_chunks}: expected >= 1")
        self.capacity_chunks, self.exec_horizon = capacity_chunks, exec_horizon
        self._episodes: deque[SuccessEpisode] = deque()
        self._chunks = 0
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self.added = 0

    def add(self, ep: SuccessEpisode) -> None:
        with self._lock:
            self._episodes.append(ep)
            self._chunks += ep.steps
            self.added += 1
            while self._chunks > self.capacity_chunks and len(self._episodes) > 1:
                self._chunks -= self._episodes.popleft().steps

    def size(self) -> dict:
        with self._lock:
            return {"episodes": len(self._episodes), "chunks": self._chunks, "added": self.added}

    def sample(self, batch_size: int, chunk_size: int, generator: Optional[np.random.Generator] = None) -> dict:
        """``batch_size`` chunk-steps uniform over the stored ones: image uint8 [B,H,W,3], tokens int32
        [B,L], state float32 [B,S], actions float32 [B,chunk_size,A] (normalised), action_pad bool
        [B,chunk_size]."""
        rng = generator if generator is not None else self._rng
        with self._lock:
            episodes = list(self._episodes)
            if not episodes:
                raise RuntimeError("success replay is empty")
            lengths = np.array([ep.steps for ep in episodes])
            flat = rng.integers(0, lengths.sum(), size=batch_size)
            which = np.searchsorted(np.cumsum(lengths), flat, side="right")
            step = flat - np.concatenate([[0], np.cumsum(lengths)[:-1]])[which]
            ref = episodes[0]
            out = {"image": np.empty((batch_size, *ref.image.shape[1:]), np.uint8),
                   "tokens": np.empty((batch_size, *ref.tokens.shape[1:]), ref.tokens.dtype),
                   "state": np.empty((batch_size, *ref.state.shape[1:]), np.float32),
                   "actions": np.empty((batch_size, chunk_size, ref.actions.shape[1]), np.float32),
                   "action_pad": np.empty((batch_size, chunk_size), bool)}
            future = np.arange(chunk_size)
            for row, (e, t) in enumerate(zip(which, step)):
                ep = episodes[e]
                idx = t * self.exec_horizon + future
                out["image"][row], out["tokens"][row], out["state"][row] = ep.image[t], ep.tokens[t], ep.state[t]
                out["actions"][row] = ep.actions[np.minimum(idx, len(ep.actions) - 1)]
                out["action_pad"][row] = idx >= len(ep.actions)
        return out
