"""Bounded fault injection (benchmarks/fault_injection.py): SIGKILL the learner, the collector and
an actor once each at random moments; afterwards no batch held a corrupted segment, every
committed real episode was stored exactly once and intact, and each restart recovered."""
import argparse

import pytest

from benchmarks.fault_injection import orchestrate

pytestmark = pytest.mark.timeout(150)


def test_sigkill_learner_collector_actor_loses_and_corrupts_nothing(tmp_path):
    args = argparse.Namespace(workdir=str(tmp_path), cycles=3, actors=2, actor_rate=10.0, episode_rate=4.0,
                              resend_after=1.0, update_delay=0.02, store_delay=0.1, max_kill_delay=1.5, max_restart_delay=0.5,
                              recovery_timeout=30.0, seed=3)
    out = orchestrate(args)
    assert out["ok"], out
    assert out["episodes_committed"] > 0 and out["episodes_stored"] == out["episodes_committed"]
    assert out["lost_episodes"] == out["duplicated_episodes"] == out["corrupted_segments"] == 0
    assert all(out["recovery"][k]["n"] >= 1 for k in ("learner", "collector", "actor")), out["recovery"]


def test_the_checks_catch_torn_segments_and_lost_or_duplicated_episodes(tmp_path):
    """The detectors above are not vacuous: a mixed segment fails its checksum, and a journal with
    one episode stored twice and one never stored is reported as such."""
    import json

    from benchmarks.fault_injection import episode_arrays, verify

    from common.episode_msg import ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode
    from common.segment import SegmentSpec
    from tools.synthetic import CorruptSegment, fill_segment, verify_segment
    from realrobot.outbox import Outbox

    spec = SegmentSpec(steps=2, image_hw=(8, 8), token_len=4, state_dim=8, num_denoise_steps=2, chunk_size=4)
    a, b = spec.empty(), spec.empty()
    fill_segment(a, 1, 5, incarnation=9)
    fill_segment(b, 1, 6, incarnation=9)
    assert verify_segment(a) == (1, 9, 5)
    a["chain"][1] = b["chain"][1]  # half of one segment, half of the next: a torn slot
    with pytest.raises(CorruptSegment):
        verify_segment(a)

    box = Outbox(tmp_path / "outbox")
    for i in ("e1", "e2"):
        x = episode_arrays(i)
        box.put(Episode(episode_id=i, task="t", success=True, fps=10, images=x[IMAGE_KEY], states=x[STATE_KEY],
                        actions=x[ACTION_KEY]))
    (tmp_path / "stores.jsonl").write_text("".join(json.dumps({"episode_id": "e1", "session": s, "intact": True}) + "\n"
                                                   for s in ("a", "b")))
    out = verify(tmp_path, {"learner": [], "collector": [], "actor": []}, [], 0.0, argparse.Namespace(cycles=0))
    assert not out["ok"] and out["duplicated_episodes"] == 1 and out["lost_episodes"] == 1
