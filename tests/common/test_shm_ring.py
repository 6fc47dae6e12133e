import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from common.protocol import decode, encode
from common.segment import SegmentSpec
from common.shm_ring import (FREE, READING, SHM_DIR, ShmRingReader, ShmRingWriter, list_rings,
                             notice_message, reap_dead_rings)

pytestmark = pytest.mark.timeout(30)

SPEC_ARGS = dict(steps=4, image_hw=(8, 10), token_len=5, state_dim=3, num_denoise_steps=2, chunk_size=4)
SPEC = SegmentSpec(**SPEC_ARGS).arrays()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fill(slot: dict, value: int) -> None:
    for a in slot.values():
        a[...] = value % 100


def check(views: dict, value: int) -> None:
    for name, (dtype, shape) in SPEC.items():
        assert views[name].dtype == dtype and views[name].shape == shape, name
        assert np.all(views[name] == value % 100), name


@pytest.fixture
def prefix():
    """A prefix of this test's own, so reaping never touches rings of tests running in parallel."""
    p = f"tandemtest{uuid.uuid4().hex[:8]}_"
    yield p
    for name in list_rings(p):  # leave nothing behind, whatever happened
        os.unlink(os.path.join(SHM_DIR, name))


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def test_write_read_release_wraps_around(prefix):
    with ShmRingWriter(None, SPEC, num_slots=3, prefix=prefix) as writer, \
            ShmRingReader.attach(writer.name, SPEC, num_slots=3) as reader:
        assert writer.name.startswith(f"{prefix}{os.getpid()}_")
        for i in range(10):  # more segments than slots
            slot = writer.acquire()
            assert slot is not None and slot.index == i % 3 and slot.seq == i + 1
            fill(slot, i)
            notice = writer.commit(slot, policy_version=100 + i)
            msg = decode(encode(notice_message(notice, sender="actor-0")))
            assert msg.kind == "segment_notice" and msg.policy_version == 100 + i
            views = reader.read(msg.meta)
            check(views, i)
            assert reader.policy_version(msg.meta) == 100 + i
            assert not views["image"].flags.writeable
            assert reader.release(msg.meta)
        assert writer.drops == 0 and reader.drops.total == 0
        assert reader.states() == ["FREE"] * 3
    assert not shm_exists(writer.name)


def test_full_ring_drops_or_waits(prefix):
    with ShmRingWriter(None, SPEC, num_slots=2, full_policy="drop", prefix=prefix) as writer:
        assert writer.acquire() is not None and writer.acquire() is not None
        assert writer.acquire() is None and writer.drops == 1

    with ShmRingWriter(None, SPEC, num_slots=2, full_policy="wait", wait_timeout_s=0.05,
                       prefix=prefix) as writer, ShmRingReader.attach(writer.name, SPEC) as reader:
        notices = [writer.commit(writer.acquire(), 0) for _ in range(2)]
        t0 = time.monotonic()
        assert writer.acquire() is None
        assert time.monotonic() - t0 >= 0.05 and writer.waits == 1 and writer.drops == 1

        writer.wait_timeout_s = 5.0
        release = threading.Timer(0.1, lambda: reader.release(notices[1]))
        release.start()
        slot = writer.acquire()  # waits until the reader frees slot 1
        release.join()
        assert slot is not None and slot.index == 1 and writer.waits == 2


def test_reader_rejects_what_is_not_ready(prefix):
    with ShmRingWriter(None, SPEC, num_slots=2, prefix=prefix) as writer, \
            ShmRingReader.attach(writer.name, SPEC) as reader:
        slot = writer.acquire()
        in_progress = {"ring": writer.name, "slot": slot.index, "seq": slot.seq}
        assert reader.read(in_progress) is None  # still WRITING
        notice = writer.commit(slot, 1)
        assert reader.read({**notice, "seq": notice["seq"] + 1}) is None  # stale/forged seq
        assert reader.read({**notice, "slot": 7}) is None
        assert reader.read({**notice, "ring": "other"}) is None
        assert reader.read({"slot": "x"}) is None
        assert reader.drops.counts == {"slot_not_ready": 2, "bad_notice": 3}
        views = reader.read(notice)
        assert views is not None and reader.read(notice) is None  # READING: not twice
        reader.release(notice)
        assert not reader.release(notice)  # already free

        slot = writer.acquire()  # a READY slot may be discarded unread (e.g. too stale)
        notice = writer.commit(slot, 2)
        assert reader.release(notice) and reader.states()[slot.index] == "FREE"
        reader.close()  # with views still alive: must not raise


def test_restarted_reader_recovers_slots(prefix):
    with ShmRingWriter(None, SPEC, num_slots=3, full_policy="drop", prefix=prefix) as writer:
        first = ShmRingReader.attach(writer.name, SPEC)
        notices = []
        for v in range(3):
            slot = writer.acquire()
            fill(slot, v)
            notices.append(writer.commit(slot, v))
        assert first.read(notices[0]) is not None
        first.close()  # the learner dies: slot 0 READING, slots 1-2 READY, their notices lost
        assert writer.acquire() is None

        second = ShmRingReader.attach(writer.name, SPEC)
        assert second.states() == ["FREE", "READY", "READY"]
        resent = writer.ready_notices()
        assert [n["slot"] for n in resent] == [1, 2]
        for n in resent:
            check(second.read(n), n["policy_version"])
            assert second.release(n)
        assert second.read(notices[0]) is None  # a late duplicate of the reclaimed slot
        assert writer.acquire() is not None
        second.close()


def test_writer_reclaims_unread_slots_after_learner_restart(prefix):
    with ShmRingWriter(None, SPEC, num_slots=3, full_policy="drop", prefix=prefix) as writer, \
            ShmRingReader.attach(writer.name, SPEC) as reader:
        notices = [writer.commit(writer.acquire(), v) for v in range(2)]
        writing = writer.acquire()
        assert reader.read(notices[0]) is not None
        assert writer.reclaim_unread() == 1  # only the READY slot: never one being read or written
        assert reader.states() == ["READING", "FREE", "WRITING"]
        assert reader.read(notices[1]) is None  # its old notice arrives late: rejected
        assert reader.release(notices[0])
        writer.commit(writing, 2)


def test_take_detects_a_slot_reused_during_the_copy(prefix):
    with ShmRingWriter(None, SPEC, num_slots=1, prefix=prefix) as writer, \
            ShmRingReader.attach(writer.name, SPEC) as reader:
        slot = writer.acquire()
        fill(slot, 5)
        check(reader.take(writer.commit(slot, 1)), 5)
        assert reader.states() == ["FREE"]
        slot = writer.acquire()
        fill(slot, 6)
        out = {k: np.zeros(shape, dtype) for k, (dtype, shape) in SPEC.items()}
        assert reader.take(writer.commit(slot, 2), out) is out
        check(out, 6)

        # The interleaving that reclaim_unread can race into: the reader takes a READY slot
        # just as the writer frees it, and the writer reuses it during the reader's copy.
        notice = writer.commit(writer.acquire(), 3)
        assert reader.read(notice) is not None
        writer._ring.slots["state"][0] = FREE  # the writer's store, after the reader's check
        reuse = writer.acquire()
        reader._ring.slots["state"][0] = READING  # the reader's store lands last
        assert not reader.release(notice)  # so the reader discards its copy
        fresh = writer.commit(reuse, 4)  # and the writer's new segment still goes through
        assert writer.reclaim_races == 1
        assert reader.read(notice) is None and reader.read(fresh) is not None


def test_attach_checks_spec_and_slots(prefix):
    with ShmRingWriter(None, SPEC, num_slots=2, prefix=prefix) as writer:
        other = dict(SPEC, reward=(np.dtype(np.float64), (4,)))
        with pytest.raises(ValueError, match="spec"):
            ShmRingReader.attach(writer.name, other)
        with pytest.raises(ValueError, match="slots"):
            ShmRingReader.attach(writer.name, SPEC, num_slots=3)
    with pytest.raises(FileNotFoundError):
        ShmRingReader.attach(writer.name, SPEC)


def test_full_dev_shm_is_a_clear_error_not_sigbus(prefix, monkeypatch):
    def no_space(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="use_shm=false"):
        ShmRingWriter(None, SPEC, num_slots=2, prefix=prefix)
    assert list_rings(prefix) == []  # nothing left behind


def test_reap_handles_half_created_and_foreign_segments(prefix):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    half = f"{prefix}{dead}_0000"  # its writer died between shm_open and ftruncate
    foreign = f"{prefix}notaring"
    for name in (half, foreign):
        open(os.path.join(SHM_DIR, name), "wb").close()
    with ShmRingWriter(None, SPEC, num_slots=1, prefix=prefix) as alive:
        assert reap_dead_rings(prefix) == [half]
        assert sorted(list_rings(prefix)) == sorted([alive.name, foreign])


def test_bad_arguments():
    with pytest.raises(ValueError):
        ShmRingWriter(None, SPEC, num_slots=2, full_policy="block")
    with pytest.raises(ValueError):
        ShmRingWriter(None, SPEC, num_slots=0)


# ---- across processes (spawn) ---------------------------------------------------------------


def writer_process(prefix: str, count: int, notices, done) -> None:
    writer = ShmRingWriter(None, SPEC, num_slots=2, full_policy="wait", wait_timeout_s=10,
                           prefix=prefix)
    for i in range(count):
        slot = writer.acquire()
        fill(slot, i)
        notices.put(writer.commit(slot, policy_version=i))
    done.wait(10)
    writer.close()


def test_writer_and_reader_in_separate_processes(prefix):
    ctx = mp.get_context("spawn")
    notices, done = ctx.Queue(), ctx.Event()
    count = 7
    proc = ctx.Process(target=writer_process, args=(prefix, count, notices, done))
    proc.start()
    try:
        reader = None
        for i in range(count):
            notice = notices.get(timeout=20)
            if reader is None:
                reader = ShmRingReader.attach(notice["ring"], SPEC, num_slots=2)
                assert reader.owner_alive()
            check(reader.read(notice), i)
            assert reader.policy_version(notice) == i
            reader.release(notice)
        done.set()
        proc.join(10)
        assert proc.exitcode == 0
        assert not shm_exists(reader.name)  # unlinked by its writer on close
        reader.close()
    finally:
        if proc.is_alive():
            proc.kill()


def killed_writer_process(prefix: str, notices, writing) -> None:
    writer = ShmRingWriter(None, SPEC, num_slots=2, prefix=prefix)
    notices.put(writer.commit(writer.acquire(), policy_version=1))  # one whole segment
    slot = writer.acquire()
    slot["reward"][:2] = 1.0  # half-way through the copy...
    notices.put({"ring": writer.name, "slot": slot.index, "seq": slot.seq, "policy_version": 2})
    writing.set()
    time.sleep(60)  # ...when SIGKILL arrives


def test_writer_killed_mid_write_is_never_read_and_reaped(prefix):
    ctx = mp.get_context("spawn")
    notices, writing = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=killed_writer_process, args=(prefix, notices, writing))
    proc.start()
    try:
        assert writing.wait(20)
        committed, half = notices.get(timeout=5), notices.get(timeout=5)
        reader = ShmRingReader.attach(half["ring"], SPEC)
        assert reader.owner_alive() and reap_dead_rings(prefix) == []
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert reader.states()[half["slot"]] == "WRITING"
        assert reader.read(half) is None
        assert not reader.owner_alive()
        assert reap_dead_rings(prefix) == [half["ring"]]
        assert not shm_exists(half["ring"])
        assert reader.read(committed) is not None  # our mapping outlives the name
        reader.close()
    finally:
        if proc.is_alive():
            proc.kill()


def sigterm_writer_process(prefix: str, names) -> None:
    writer = ShmRingWriter(None, SPEC, num_slots=2, prefix=prefix)
    names.put(writer.name)
    time.sleep(60)


READER_SCRIPT = """
import sys
from common.segment import SegmentSpec
from common.shm_ring import ShmRingReader
reader = ShmRingReader.attach(sys.argv[1], SegmentSpec(**{args}).arrays())
reader.close()
"""


def test_sigterm_unlinks_and_reader_exit_does_not(prefix):
    ctx = mp.get_context("spawn")
    names = ctx.Queue()
    proc = ctx.Process(target=sigterm_writer_process, args=(prefix, names))
    proc.start()
    try:
        name = names.get(timeout=20)
        # An independent reader process (its own resource tracker) attaches and exits: with a
        # plain SharedMemory attach, Python 3.11's tracker would unlink the ring here.
        script = READER_SCRIPT.format(args=repr(SPEC_ARGS))
        reader = subprocess.run([sys.executable, "-c", script, name], cwd=REPO, timeout=20,
                                capture_output=True, text=True)
        assert reader.returncode == 0, reader.stderr
        assert shm_exists(name)
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(10)
        assert proc.exitcode == -signal.SIGTERM
        assert not shm_exists(name)
    finally:
        if proc.is_alive():
            proc.kill()
