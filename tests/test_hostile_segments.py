"""Well-formed but harmful segments against a live learner process (issue #18, items 1-2): token
ids outside the vocabulary (used to kill the train thread) and NaN rewards (used to poison the
published weights) are dropped by value-level validation, counted by reason, and training on the
valid stream beside them goes on."""
import signal
import subprocess

import numpy as np
import pytest
import zmq

from common.config import load_config
from common.fuzz import LEARNER_OVERRIDES, learner_status, spawn_learner
from common.protocol import Message, encode
from common.synthetic import fill_segment, poll_until, spec_from_config

pytestmark = pytest.mark.timeout(120)
BAD = 8


def test_learner_drops_out_of_vocab_tokens_and_nan_rewards_and_keeps_training(tmp_path):
    proc, eps = spawn_learner(tmp_path, [])
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(eps["data"])
    try:
        cfg = load_config("config", LEARNER_OVERRIDES)
        spec = spec_from_config(cfg)

        def segment(seq, corrupt=None):
            arrays = spec.empty()
            fill_segment(arrays, actor=1, seq=seq)
            if corrupt:
                corrupt(arrays)
            return encode(Message("segment", sender="hostile", policy_version=0, arrays=arrays))

        for i in range(BAD):
            push.send_multipart(segment(i, lambda a: a["tokens"].__setitem__((0, 0), 258)))
            push.send_multipart(segment(100 + i, lambda a: a["reward"].__setitem__(0, np.nan)))
        seq = 1000

        def trained():
            nonlocal seq
            for _ in range(4):
                push.send_multipart(segment(seq))
                seq += 1
            r = learner_status(eps["control"])
            return r if r and r.meta["updates"] >= 3 else None

        status = poll_until(trained, 90)
        assert status is not None and proc.poll() is None, (tmp_path / "learner.log").read_text()[-3000:]
        dropped = status.meta["dropped"]
        assert dropped.get("bad_segment_value:token_out_of_vocab") == BAD, dropped
        assert dropped.get("bad_segment_value:non_finite_reward") == BAD, dropped
    finally:
        push.close(linger=0)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
