"""Well-formed but harmful segments against a live learner process (issue #18, items 1-2): token
ids outside the vocabulary (used to kill the train thread) and NaN rewards (used to poison the
published weights) are dropped by value-level validation, counted by reason, and training on the
valid stream beside them goes on."""

import numpy as np
import pytest
import zmq

from common.config import load_config
from tools.fuzz import LEARNER_OVERRIDES, learner_status, spawn_learner
from common.protocol import Message, encode
from tools.synthetic import fill_segment, poll_until, spec_from_config
from processes import stop

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
        stop(proc)


def test_control_plane_spoofing_is_refused_and_status_survives_any_reply(tmp_path, capsys):
    """A hello with mode 5 and a heartbeat claiming eval_success 1.0 from a train peer (issue #18, item 4):
    neither reaches the peer table's mode, summary.json or TensorBoard; a registered eval actor's
    result does; tandem-status prints whatever the learner answers."""
    from tools.status import status

    proc, eps = spawn_learner(tmp_path, [])
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(eps["control"])

    def say(kind, sender, meta):
        dealer.send_multipart(encode(Message(kind, sender=sender, policy_version=0, meta=meta)))
        assert dealer.poll(5000), f"no reply to {kind} {meta}: " + (tmp_path / "learner.log").read_text()[-2000:]
        dealer.recv_multipart()

    try:
        assert poll_until(lambda: learner_status(eps["control"]), 60) is not None
        say("hello", "spoof-mode", {"mode": 5, "episodes": float("inf"), "x" * 200: 1})
        say("hello", "spoof-eval", {"mode": "train"})
        say("heartbeat", "spoof-eval", {"eval_success": 1.0, "eval_episodes": 4, "eval_env": "sim"})
        say("heartbeat", "spoof-eval", {"mode": "eval", "eval_success": 1.0, "eval_episodes": 4})  # no role change
        say("hello", "eval-sim", {"mode": "eval"})
        say("heartbeat", "eval-sim", {"eval_success": 0.25, "eval_episodes": 4, "eval_env": "sim", "eval_version": 0})
        say("heartbeat", "eval-sim", {"eval_success": 7.0, "eval_episodes": 4})  # not a rate
        r = learner_status(eps["control"])
        assert r is not None, (tmp_path / "learner.log").read_text()[-3000:]
        dropped = r.meta["dropped"]
        assert dropped.get("control_field:bad_mode") == 1, dropped
        assert dropped.get("control_field:bad_value:episodes") == 1, dropped
        assert dropped.get("control_field:bad_field_name") == 1, dropped
        assert dropped.get("control_field:mode_change") == 1, dropped
        assert dropped.get("control_eval_result") == 3, dropped
        assert r.meta["actors"]["spoof-eval"]["mode"] == "train"
        assert "mode" not in r.meta["actors"]["spoof-mode"]
        cfg = load_config("config", [f"transport.control_endpoint={eps['control']}"])
        assert status(cfg) == 0
        assert "spoof-mode" in capsys.readouterr().out
    finally:
        dealer.close(linger=0)
        stop(proc)
    import json
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_history"]
    assert [(e["env"], e["success"]) for e in history] == [("sim", 0.25)]
