"""actors/rollout.py's SegmentBuilder, the one segment builder of both inference modes: the
truncation bootstrap, the oldest version, the bootstrap observation at index T, episode stats."""
import numpy as np
import pytest

from actors.env_pool import ChunkResult
from actors.rollout import SegmentBuilder
from common.segment import SegmentSpec

SPEC = SegmentSpec(steps=3, image_hw=(4, 4), token_len=5, state_dim=8, chunk_size=2, num_denoise_steps=2)
GAMMA = 0.9


def obs(v: float) -> dict:
    return {"image": np.full((4, 4, 3), int(v), np.uint8), "state": np.full(8, v, np.float32)}


def result(reward, done=False, truncated=False, success=False, steps=4, ret=0.0) -> ChunkResult:
    return ChunkResult(obs(0), "task", reward, done, truncated, success, obs(9) if truncated else None, steps, ret, 0)


def chain(v: float) -> np.ndarray:
    return np.full(SPEC.arrays()["chain"][1][1:], v, np.float32)


def tokens(v: int) -> np.ndarray:
    return np.full(5, v, np.int64)


def test_a_segment_carries_the_bootstrap_observation_and_its_oldest_version():
    b = SegmentBuilder(SPEC, GAMMA, env_index=2)
    outcomes = [result(0.5), result(1.0, done=True, success=True, ret=1.5), result(0.25, done=True, truncated=True)]
    for t, (version, r) in enumerate(zip([7, 5, 6], outcomes)):
        assert not b.full
        b.record_sample(obs(t + 1), tokens(t + 1), chain(t), log_prob=-float(t), value=0.1 * t, version=version)
        b.record_result(r, final_value=2.0 if r.truncated else None)
    assert b.full
    seg, meta = b.finish(obs(42), tokens(42))
    np.testing.assert_allclose(seg["reward"], [0.5, 1.0, 0.25 + GAMMA * 2.0], rtol=1e-6)  # bootstrap: V(final obs)
    assert list(seg["done"]) == [0, 1, 1] and list(seg["success"]) == [0, 1, 0]
    assert seg["image"][3].max() == 42 and seg["state"][3][0] == 42 and seg["tokens"][3][0] == 42
    assert seg["image"][1].max() == 2 and seg["behaviour_logp"][2] == -2.0
    assert meta == dict(env_steps=12, episodes=2, successes=1, returns=[1.5, 0.0], env_index=2, env_seq=0, version=5)
    assert not b.full and b.stats.env_steps == 0  # the next segment starts empty
    for t in range(3):
        b.record_sample(obs(t), tokens(t), chain(t), log_prob=0.0, value=0.0, version=8)
        b.record_result(result(0.0))
    assert b.finish(obs(0), tokens(0))[1]["env_seq"] == 1  # the env's segments are numbered: a receiver sees gaps


def test_a_truncation_without_its_value_and_an_early_finish_are_refused():
    b = SegmentBuilder(SPEC, GAMMA, env_index=0)
    b.record_sample(obs(1), tokens(1), chain(0), -1.0, 0.0, version=0)
    with pytest.raises(ValueError, match="value of its final observation"):
        b.record_result(result(0.0, done=True, truncated=True))
    with pytest.raises(ValueError, match="0 of 3 chunk-steps"):
        b.finish(obs(0), tokens(0))


def test_the_reward_scale_applies_to_env_rewards_not_to_the_bootstrap_value_or_the_returns():
    b = SegmentBuilder(SPEC, GAMMA, env_index=0, reward_scale=0.1)
    outcomes = [result(5.0), result(3.0, done=True, ret=8.0), result(2.0, done=True, truncated=True, ret=2.0)]
    for t, r in enumerate(outcomes):
        b.record_sample(obs(t), tokens(t), chain(t), log_prob=0.0, value=0.0, version=0)
        b.record_result(r, final_value=4.0 if r.truncated else None)
    seg, meta = b.finish(obs(0), tokens(0))
    # V(final obs) is already in the value head's (scaled) units
    np.testing.assert_allclose(seg["reward"], [0.5, 0.3, 0.2 + GAMMA * 4.0], rtol=1e-6)
    assert meta["returns"] == [8.0, 2.0]  # what reports show: the env's own units
