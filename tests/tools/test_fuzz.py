"""A bounded fuzz of a live learner process (ipc): it stays up, counts every bad message under the
reason its validation gives, and keeps training on a valid segment stream sent beside the fuzz.
The long run (>= 10,000 messages) is `python -m tools.fuzz --messages 10000`."""
import math
import os
import sys

import pytest

from common.config import load_config
from tools.fuzz import LEARNER_OVERRIDES, run_fuzz, spawn_learner
from common.procinfo import rss_mib
from processes import stop

pytestmark = pytest.mark.timeout(120)

MESSAGES = 2000
# Reasons the generators are built to reach; each must show up in a run of this size.
PROTOCOL_REASONS = {"not_msgpack", "bad_header", "bad_version", "bad_kind", "frame_count", "dtype",
                    "shape_mismatch", "array_too_large", "message_too_large", "too_many_arrays",
                    "header_too_large", "bad_name"}
INGEST_KEYS = {"bad_ring", "slot_not_ready", "ring", "protocol_control"}


def test_learner_survives_fuzz_and_counts_every_bad_message(tmp_path):
    proc, eps = spawn_learner(tmp_path, [])
    try:
        cfg = load_config("config", [*LEARNER_OVERRIDES, *[f"transport.{k}_endpoint={v}" for k, v in eps.items()]])
        report = run_fuzz(MESSAGES, cfg, eps["data"], eps["control"], seed=1, alive=lambda: proc.poll() is None,
                          learner_pid=proc.pid)
        assert proc.poll() is None, (tmp_path / "learner.log").read_text()[-3000:]
    finally:
        stop(proc)
    r = report.as_dict()
    assert report.sent == MESSAGES
    assert report.learner_alive
    assert not report.mismatches, r  # every bad message counted, under the predicted reason
    assert PROTOCOL_REASONS <= set(report.local_reasons), r
    assert INGEST_KEYS <= set(report.observed), r
    assert any(k.startswith("unexpected_kind:") for k in report.observed)
    assert any(k.startswith("bad_episode:") for k in report.observed)  # counted by reason
    # value-level and control-plane mutators (issue #18): well-formed messages that would do harm
    for prefix in ("bad_segment_value:", "control_field:", "control_eval_result"):
        assert any(k.startswith(prefix) for k in report.observed), (prefix, r)
    # each message is counted once, except a bad notice on a live ring (the ring's own counter too)
    # every message counted once ("ring" repeats slot_not_ready; "protocol_*/reason" break totals down)
    totals = {k: v for k, v in report.expected.items() if "/" not in k}
    assert sum(totals.values()) - report.expected["ring"] == MESSAGES
    for channel in ("protocol_data", "protocol_control"):
        assert sum(v for k, v in report.expected.items() if k.startswith(channel + "/")) == report.expected[channel]
    assert report.updates_after > report.updates_before, "the valid stream stopped training"
    assert report.good_segments_sent > 0
    rss = r["learner_rss_mib"]  # before, after each quarter, after the learner handled everything
    assert [sent for sent, _ in rss["samples"]] == [0, 500, 1000, 1500, 2000, 2000], rss
    assert all(100 < mib < 10_000 for _, mib in rss["samples"]), rss


def test_rss_from_proc_when_psutil_is_missing(monkeypatch):
    with_psutil = rss_mib(os.getpid())
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    from_proc = rss_mib(os.getpid())
    assert from_proc == pytest.approx(with_psutil, rel=0.2) and from_proc > 10
    assert math.isnan(rss_mib(2 ** 22 + 7))  # no such process
