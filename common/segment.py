"""The trajectory segment an actor hands to the learner: T chunk-steps of one env.

One chunk-step = one policy call: the actor samples a chunk of H actions and executes the first
k of them. Observation arrays hold T+1 entries; the last is the observation after the segment,
which the learner uses for the V-trace bootstrap value under its current weights.

Time-limit truncation: the actor adds gamma * V_behaviour(final observation) to that step's
reward and marks it ``done``, so every ``done`` means "no bootstrap across this boundary".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SegmentSpec:
    steps: int  # T chunk-steps per segment
    image_hw: tuple[int, int]
    token_len: int  # L
    state_dim: int  # S
    num_denoise_steps: int  # K (the chain holds K+1 elements)
    chunk_size: int  # H
    action_dim: int = 7

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every array in a segment, in a fixed order."""
        T, (h, w) = self.steps, self.image_hw
        f32, u8 = np.dtype(np.float32), np.dtype(np.uint8)
        return {
            "image": (u8, (T + 1, h, w, 3)),
            "tokens": (np.dtype(np.int32), (T + 1, self.token_len)),
            "state": (f32, (T + 1, self.state_dim)),
            "chain": (f32, (T, self.num_denoise_steps + 1, self.chunk_size, self.action_dim)),
            "behaviour_logp": (f32, (T,)),
            "behaviour_value": (f32, (T,)),
            "reward": (f32, (T,)),
            "done": (u8, (T,)),  # episode ended at this chunk-step (terminal or truncated)
            "success": (u8, (T,)),  # episode ended with success at this chunk-step
        }

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * d.itemsize for d, s in self.arrays().values())

    def empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(s, d) for k, (d, s) in self.arrays().items()}

    def check(self, arrays: dict) -> None:
        """Raise ValueError naming the first array that is missing, extra or of the wrong layout."""
        expected = self.arrays()
        if set(arrays) != set(expected):
            raise ValueError(f"segment arrays {sorted(arrays)} != expected {sorted(expected)}")
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype != dtype or tuple(a.shape) != shape:
                raise ValueError(f"segment array {name!r} is {a.dtype} {tuple(a.shape)}, expected {dtype} {shape}")


FLOAT_ARRAYS = ("state", "chain", "behaviour_logp", "behaviour_value", "reward")
FLAG_ARRAYS = ("done", "success")


def check_segment_values(arrays: dict, vocab_size: int) -> str | None:
    """The first value-level fault of a segment whose layout already passed ``SegmentSpec.check``,
    as a short reason code, or None. A segment can be well-formed and still kill or poison the
    learner: token ids outside the embedding, non-finite floats, flags other than 0/1."""
    tokens = arrays["tokens"]
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        return "token_out_of_vocab"
    for name in FLOAT_ARRAYS:
        if not np.isfinite(arrays[name]).all():
            return f"non_finite_{name}"
    for name in FLAG_ARRAYS:
        if arrays[name].size and int(arrays[name].max()) > 1:
            return f"bad_flag_{name}"
    if (arrays["success"] > arrays["done"]).any():
        return "success_without_done"
    return None


def camera_hw(env_cfg) -> tuple[int, int]:
    """(height, width) of the twin's camera image: ``image_size`` (int or [H, W]) wins over
    ``camera.height/width``, as in the twin itself."""
    size = env_cfg.get("image_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        return int(h), int(w)
    return int(env_cfg["camera"]["height"]), int(env_cfg["camera"]["width"])


def policy_segment_spec(policy, rollout_steps: int, image_hw, state_dim: int) -> SegmentSpec:
    """The one definition of a segment's layout for ``policy``: actors build theirs with it from
    what their envs render, the learner its expectation from the config (``expected_segment_spec``)."""
    return SegmentSpec(steps=int(rollout_steps), image_hw=tuple(int(v) for v in image_hw), token_len=policy.token_len,
                       state_dim=int(state_dim), num_denoise_steps=policy.num_denoise_steps,
                       chunk_size=policy.chunk_size, action_dim=policy.action_dim)


def expected_segment_spec(cfg, policy) -> SegmentSpec:
    """The layout every actor of this config sends: the learner checks each segment against it."""
    return policy_segment_spec(policy, cfg.actor.rollout_steps, camera_hw(cfg.env), policy.state_dim)
