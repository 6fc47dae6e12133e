"""The outbox: episodes saved while no learner listens reach it later, none lost, none twice."""
import time
import uuid

import numpy as np
import pytest
from omegaconf import OmegaConf

from common.channels import ControlClient, DataSender
from common.episode_msg import Episode, episode_to_message, message_to_episode
from realrobot.outbox import EpisodePusher, Outbox, OutboxConfig, PusherThread
from realrobot_standin import StandInLearner


def make_episode(frames=3, success=True, seed=0) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(episode_id=uuid.uuid4().hex, task="put the red cube into the bowl", success=success, fps=10,
                   images=rng.integers(0, 255, (frames, 8, 8, 3), dtype=np.uint8),
                   states=rng.standard_normal((frames, 8)).astype(np.float32),
                   actions=rng.standard_normal((frames, 7)).astype(np.float32))


@pytest.fixture
def endpoints(tmp_path):
    return {"data_endpoint": f"ipc://{tmp_path}/data.ipc", "control_endpoint": f"ipc://{tmp_path}/control.ipc",
            "request_timeout_ms": 300}


def pusher(box, endpoints, **cfg):
    config = OutboxConfig(ack_timeout_ms=300, **cfg)
    return EpisodePusher(box, DataSender(endpoints["data_endpoint"], send_timeout_ms=300),
                         ControlClient(endpoints["control_endpoint"], "collector-test", request_timeout_ms=300),
                         config, "collector-test")


def pump_until(p, done, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p.pump()
        if done():
            return True
        time.sleep(0.05)
    return False


def test_episode_message_round_trip():
    ep = make_episode(success=False)
    back = message_to_episode(episode_to_message(ep, sender="c"))
    assert back.episode_id == ep.episode_id and back.success is False and back.task == ep.task
    np.testing.assert_array_equal(back.images, ep.images)
    np.testing.assert_array_equal(back.actions, ep.actions)


def test_outbox_survives_reopen(tmp_path):
    box = Outbox(tmp_path / "out")
    ep = make_episode()
    box.put(ep)
    again = Outbox(tmp_path / "out")
    assert again.pending() == [ep.episode_id]
    np.testing.assert_array_equal(again.load(ep.episode_id).states, ep.states)


def test_saved_while_learner_away_are_delivered_once_it_appears(tmp_path, endpoints):
    box = Outbox(tmp_path / "out")
    episodes = [make_episode(seed=i, success=i % 2 == 0) for i in range(5)]
    for ep in episodes:
        box.put(ep)
    p = pusher(box, endpoints, max_sends_per_pump=2)
    try:
        result = p.pump()  # no learner: nothing leaves the disk
        assert not result.reachable and result.sent == []
        assert len(box.pending()) == 5

        with StandInLearner(**{k: endpoints[k] for k in ("data_endpoint", "control_endpoint")}) as learner:
            assert pump_until(p, lambda: not box.pending() and not box.unacked())
            # more pumps after everything is acknowledged send nothing again
            for _ in range(3):
                assert p.pump().sent == []
            time.sleep(0.2)
        assert set(learner.episodes) == {ep.episode_id for ep in episodes}
        assert all(n == 1 for n in learner.receipts.values()), learner.receipts
        for ep in episodes:
            got = learner.episodes[ep.episode_id]
            assert got.success == ep.success
            np.testing.assert_array_equal(got.images, ep.images)
        assert all(box.is_acked(ep.episode_id) for ep in episodes)
    finally:
        p.close()


def test_restarted_collector_does_not_resend_what_the_learner_holds(tmp_path, endpoints):
    """An episode sent just before a crash has no sent-marker; the ack query finds it stored."""
    box = Outbox(tmp_path / "out")
    ep = make_episode()
    box.put(ep)
    with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"]) as learner:
        with DataSender(endpoints["data_endpoint"]) as raw:  # the crashed run's send
            raw.send(episode_to_message(ep, sender="collector-old"))
        deadline = time.monotonic() + 5
        while ep.episode_id not in learner.episodes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert box.pending() == [ep.episode_id]  # the marker was never written
        p = pusher(box, endpoints)
        try:
            result = p.pump()
        finally:
            p.close()
        assert result.acked == [ep.episode_id] and result.sent == []
        assert learner.receipts[ep.episode_id] == 1


def test_unacknowledged_episode_is_resent_after_learner_lost_it(tmp_path, endpoints):
    box = Outbox(tmp_path / "out")
    ep = make_episode()
    box.put(ep)
    box.mark_sent(ep.episode_id)  # sent to a learner that died before storing it
    p = pusher(box, endpoints, resend_after_s=0.2)
    try:
        with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"]) as learner:
            assert p.pump().resent == []  # too early to call it lost
            time.sleep(0.3)
            assert pump_until(p, lambda: box.is_acked(ep.episode_id))
        assert learner.receipts[ep.episode_id] == 1
    finally:
        p.close()


def test_learner_without_ack_support_gets_no_duplicates(tmp_path, endpoints):
    box = Outbox(tmp_path / "out")
    ep = make_episode()
    box.put(ep)
    p = pusher(box, endpoints, resend_after_s=0.1)
    try:
        with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"], ack=False) as learner:
            for _ in range(5):
                p.pump()
                time.sleep(0.15)
        assert learner.receipts[ep.episode_id] == 0  # never sent: no answer, no send
    finally:
        p.close()


def test_pusher_thread_flushes_on_close(tmp_path, endpoints):
    box = Outbox(tmp_path / "out")
    config = OutboxConfig(ack_timeout_ms=300, pump_interval_s=0.05)
    with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"]) as learner:
        thread = PusherThread(box, OmegaConf.create(endpoints), config, "collector-thread").start()
        ids = [box.put(make_episode(seed=i)) for i in range(3)]
        thread.wake()
        thread.close(flush_timeout_s=10)
    assert set(learner.episodes) == set(ids)
    assert box.pending() == [] and box.unacked() == []


def test_damaged_entry_is_set_aside_and_does_not_block_the_rest(tmp_path, endpoints):
    box = Outbox(tmp_path / "out")
    bad, good = make_episode(seed=1), make_episode(seed=2)
    box.put(bad)
    box.put(good)
    (tmp_path / "out" / f"{bad.episode_id}.npz").write_bytes(b"not an npz")
    p = pusher(box, endpoints)
    try:
        with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"]) as learner:
            assert pump_until(p, lambda: box.is_acked(good.episode_id))
        assert set(learner.episodes) == {good.episode_id}
        assert (tmp_path / "out" / "quarantine" / f"{bad.episode_id}.json").exists()
        assert bad.episode_id not in box.ids()
    finally:
        p.close()


def test_episode_over_the_receive_limits_is_set_aside_not_resent_forever(tmp_path, endpoints):
    from common.protocol import Limits
    box = Outbox(tmp_path / "out")
    big = make_episode(frames=20)
    box.put(big)
    p = pusher(box, endpoints)
    p.limits = Limits(max_array_bytes=1024)  # 20 frames of 8x8x3 images = 3840 bytes
    try:
        with StandInLearner(endpoints["data_endpoint"], endpoints["control_endpoint"]) as learner:
            result = p.pump()
        assert result.reachable and result.sent == [] and learner.receipts[big.episode_id] == 0
        assert (tmp_path / "out" / "quarantine" / f"{big.episode_id}.npz").exists()
        assert box.pending() == []
    finally:
        p.close()
