"""Real episodes that are well-formed but wrong, against a live learner (issue #18, item 3): NaN
states, an image of another size, a success label that is not a boolean. Each is refused with
its reason in the ack reply and quarantined by the collector's outbox (kept, never resent);
a correct episode sent after a wrongly sized one is still stored and acknowledged."""
import uuid

import numpy as np
import pytest
import zmq

from common.config import load_config
from common.episode_msg import STATE_KEY, Episode, ack_request, episode_to_message
from tools.fuzz import LEARNER_OVERRIDES, learner_status, spawn_learner
from common.protocol import decode, encode
from tools.synthetic import DEFAULT_IMAGE_SIZE, poll_until
from realrobot.outbox import QUARANTINE, EpisodePusher, Outbox, OutboxConfig
from processes import stop

pytestmark = pytest.mark.timeout(180)
T = 5


def episode(size=DEFAULT_IMAGE_SIZE, states=None) -> Episode:
    return Episode(episode_id=uuid.uuid4().hex, task="put the red cube into the bowl", success=True,
                   fps=int(load_config("config", LEARNER_OVERRIDES).env.control_freq),
                   images=np.zeros((T, size, size, 3), np.uint8),
                   states=np.zeros((T, 8), np.float32) if states is None else states,
                   actions=np.zeros((T, 7), np.float32))


def test_wrong_real_episodes_are_refused_with_a_reason_and_quarantined(tmp_path):
    proc, eps = spawn_learner(tmp_path, [])
    transport = load_config("config", [f"transport.{k}_endpoint={v}" for k, v in eps.items()]).transport
    box = Outbox(tmp_path / "outbox")
    pusher = EpisodePusher.from_transport(box, transport, OutboxConfig(resend_after_s=30.0, max_sends_per_pump=8),
                                          "test-collector")
    ctx = zmq.Context.instance()
    raw_push, raw_ctl = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    raw_push.connect(eps["data"])
    raw_ctl.connect(eps["control"])
    try:
        assert poll_until(lambda: learner_status(eps["control"]), 60) is not None
        nan_states = np.zeros((T, 8), np.float32)
        nan_states[2, 3] = np.nan
        tiny, nan, good = episode(size=2), episode(states=nan_states), episode()
        for ep in (tiny, nan, good):  # the good one after the wrongly sized one
            box.put(ep)

        def settled():
            pusher.pump()
            return not box.pending() and not box.unacked()

        assert poll_until(settled, 60), (tmp_path / "learner.log").read_text()[-3000:]
        quarantine = tmp_path / "outbox" / QUARANTINE
        assert "image_size" in (quarantine / f"{tiny.episode_id}.reason.txt").read_text()
        assert "non_finite_state" in (quarantine / f"{nan.episode_id}.reason.txt").read_text()  # kept, never sent
        assert (quarantine / f"{nan.episode_id}.npz").exists()
        assert box.is_acked(good.episode_id) and not (quarantine / f"{good.episode_id}.reason.txt").exists()
        assert pusher.counts["rejected"] == 1 and pusher.counts["resent"] == 0

        # a client written from the README alone: NaN states, and success "no" (once stored as true)
        nan_msg = episode_to_message(episode(), sender="raw")
        nan_msg.arrays[STATE_KEY][2, 3] = np.nan
        liar = episode()
        liar_msg = episode_to_message(liar, sender="raw")
        liar_msg.meta["success"] = "no"
        for msg in (nan_msg, liar_msg):
            raw_push.send_multipart(encode(msg))

        def refused():
            raw_ctl.send_multipart(encode(ack_request([liar.episode_id], sender="raw")))
            if not raw_ctl.poll(3000):
                return None
            reply = decode(raw_ctl.recv_multipart())
            return reply.meta.get("rejected", {}).get(liar.episode_id)

        reason = poll_until(refused, 30)
        assert reason is not None and reason.startswith("success_label")
        dropped = learner_status(eps["control"]).meta["dropped"]
        assert dropped.get("bad_episode:image_size") == 1 and dropped.get("bad_episode:non_finite_state") == 1
        assert dropped.get("bad_episode:success_label") == 1, dropped
        assert proc.poll() is None
    finally:
        pusher.close()
        raw_push.close(linger=0)
        raw_ctl.close(linger=0)
        stop(proc)
