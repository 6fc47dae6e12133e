"""Shared-memory ring of trajectory-segment slots: actor (writer) -> learner (reader), one host.

The writer creates one POSIX shared-memory segment::

    ring header | slot headers (num_slots) | slot 0 arrays | slot 1 arrays | ...

Each slot holds one segment laid out from an array spec ``{name: (dtype, shape)}`` (see
``SegmentSpec.arrays()``); every array starts on a 64-byte boundary. A slot's header holds its
state, a sequence number, the writer's pid and the policy version of the segment.

    writer: FREE -> WRITING (acquire) -> fill arrays in place -> READY (commit) -> notice
    reader: READY -> READING (read, seq must match the notice) -> copy out -> FREE (release)

Exactly one writer process and one reader process use a ring at a time, and each transition
is made by one side only (the writer FREE->WRITING->READY, the reader READY->READING->FREE),
so single-byte stores are enough: no lock, no compare-and-swap. Ordering: commit stores the
state byte after the array copies have returned. On x86-64 (TSO) stores become visible to the
other process in program order, and CPython does not reorder across those calls, so a reader
that sees READY sees the whole segment. (A weakly ordered CPU such as aarch64 would need a
store fence that Python does not expose.)

Restarts. A slot left WRITING by a writer that died mid-write is never READY, so it is never
read. The writer unlinks its segment on close, at exit and on SIGTERM; after a SIGKILL the
learner calls ``reap_dead_rings`` (or checks ``owner_alive``) to unlink rings whose writer is
gone. When the learner restarts, the notices of READY slots may be lost: the writer either
re-sends ``ready_notices()`` or frees them with ``reclaim_unread()`` (the one writer-side
READY->FREE store; should it race with a reader taking that slot, the reader's ``release``
returns False and ``take`` discards the copy). A new reader's ``attach`` frees the slots that
a dead reader left READING.

Python < 3.13 registers even an *attach* with the resource tracker, which then unlinks the
segment when the attaching process exits; rings are therefore opened untracked, and cleanup is
done here explicitly.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import mmap
import os
import re
import secrets
import signal
import threading
import time
import weakref
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Mapping

import msgpack
import numpy as np

from common.protocol import DropCounter, Message, cfg_get

log = logging.getLogger(__name__)

RING_PREFIX = "tandem_"
# what a reader accepts as a ring name from a notice (no path separators, bounded length)
RING_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")
SHM_DIR = "/dev/shm"  # where Linux lists POSIX shared memory
FREE, WRITING, READY, READING = 0, 1, 2, 3
STATE_NAMES = {FREE: "FREE", WRITING: "WRITING", READY: "READY", READING: "READING"}
MAGIC = b"TANDRING"
LAYOUT_VERSION = 1
ALIGN = 64  # cache line: arrays never share a line with another array's tail
# Defaults of configs/transport/default.yaml (ring:).
DEFAULT_NUM_SLOTS = 8
DEFAULT_WAIT_TIMEOUT_S = 5.0
DEFAULT_POLL_INTERVAL_S = 0.0005

RING_HEADER = np.dtype([
    ("magic", "S8"), ("layout_version", "<u4"), ("num_slots", "<u4"), ("slot_bytes", "<u8"),
    ("writer_pid", "<i8"), ("writer_start_time", "<f8"), ("spec_digest", "S16"),
], align=True)
SLOT_HEADER = np.dtype([
    ("state", "u1"), ("seq", "<u8"), ("writer_pid", "<i8"), ("policy_version", "<i8"),
], align=True)

ArraySpec = Mapping[str, "tuple[np.dtype, tuple[int, ...]]"]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def spec_digest(spec: ArraySpec) -> bytes:
    layout = [[name, np.dtype(d).str, [int(n) for n in shape]] for name, (d, shape) in spec.items()]
    return hashlib.blake2b(msgpack.packb(layout), digest_size=16).digest()


def slot_layout(spec: ArraySpec) -> tuple[dict[str, tuple[int, np.dtype, tuple]], int]:
    """Offsets of each array inside a slot, and the slot's size in bytes."""
    offsets, off = {}, 0
    for name, (dtype, shape) in spec.items():
        dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
        offsets[name] = (off, dtype, shape)
        off = _align(off + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return offsets, max(off, ALIGN)


def ring_bytes(spec: ArraySpec, num_slots: int) -> int:
    _, slot_bytes = slot_layout(spec)
    return _data_offset(num_slots) + num_slots * slot_bytes


def _data_offset(num_slots: int) -> int:
    return _align(RING_HEADER.itemsize + num_slots * SLOT_HEADER.itemsize)


# ----------------------------------------------------------------------------------------------
# untracked shared memory and process liveness


_tracker_lock = threading.Lock()


@contextmanager
def _untracked():
    """Keep SharedMemory from registering with the resource tracker (Python < 3.13 has no
    ``track=False``); the tracker would unlink a ring when a mere reader exits."""
    with _tracker_lock:
        register, unregister = resource_tracker.register, resource_tracker.unregister
        resource_tracker.register = resource_tracker.unregister = lambda *a, **k: None
        try:
            yield
        finally:
            resource_tracker.register, resource_tracker.unregister = register, unregister


def _open_shm(name: str, create: bool = False, size: int = 0) -> SharedMemory:
    with _untracked():
        shm = SharedMemory(name=name, create=create, size=size)
    try:  # huge pages cut TLB misses on slot copies where the kernel allows them for shmem
        shm._mmap.madvise(mmap.MADV_HUGEPAGE)  # (/sys/kernel/mm/transparent_hugepage/shmem_enabled)
    except (AttributeError, OSError, ValueError):
        pass
    return shm


def _unlink_shm(shm: SharedMemory) -> None:
    with _untracked():
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def _reserve(shm: SharedMemory, size: int) -> None:
    """Allocate the segment's memory now: a full /dev/shm (Docker's default is 64 MiB) then
    fails here with a clear error instead of killing the writer with SIGBUS mid-copy."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"cannot reserve {size / 2**20:.1f} MiB of shared memory for ring "
                               f"{shm.name} ({os.strerror(e.errno)}): free space in {SHM_DIR}, use "
                               "fewer ring slots, or set transport.use_shm=false") from e


def _close_shm(shm: SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:
        # numpy views handed out are still alive; the mapping goes when the last one does.
        pass


def _process_start_time(pid: int) -> float:
    """Start time of ``pid`` (0.0 if unknown); with the pid it identifies a process despite pid reuse."""
    try:
        import psutil
        return float(psutil.Process(pid).create_time())
    except Exception:
        return 0.0


def pid_alive(pid: int, start_time: float = 0.0) -> bool:
    """Whether process ``pid`` runs and, when ``start_time`` is known, is the same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start_time:
        now_start = _process_start_time(pid)
        if now_start and abs(now_start - start_time) > 1.0:
            return False  # the pid was reused by another process
    try:  # a killed child that its parent has not reaped yet is dead for our purposes
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


# ----------------------------------------------------------------------------------------------
# ring views shared by writer and reader


class SlotView(dict):
    """name -> numpy array inside one slot; ``index`` and ``seq`` identify the acquisition."""

    def __init__(self, arrays: dict[str, np.ndarray], index: int, seq: int):
        super().__init__(arrays)
        self.index = index
        self.seq = seq


class _Ring:
    def __init__(self, shm: SharedMemory, spec: ArraySpec, num_slots: int):
        self.shm = shm
        self.name = shm.name.lstrip("/")
        self.spec = dict(spec)
        self.num_slots = num_slots
        self.header = np.ndarray((), RING_HEADER, buffer=shm.buf, offset=0)
        self.slots = np.ndarray((num_slots,), SLOT_HEADER, buffer=shm.buf, offset=RING_HEADER.itemsize)
        offsets, self.slot_bytes = slot_layout(spec)
        base = _data_offset(num_slots)
        self.arrays = [
            {name: np.ndarray(shape, dtype, buffer=shm.buf, offset=base + i * self.slot_bytes + off)
             for name, (off, dtype, shape) in offsets.items()}
            for i in range(num_slots)
        ]

    def states(self) -> list[str]:
        return [STATE_NAMES.get(int(s), str(s)) for s in self.slots["state"]]

    def _release_views(self) -> None:
        self.header = self.slots = None
        self.arrays = []


# ----------------------------------------------------------------------------------------------
# writer (actor)


_owned_rings: "weakref.WeakSet[ShmRingWriter]" = weakref.WeakSet()
_atexit_installed = False
_sigterm_installed = False


def _unlink_owned_rings() -> None:
    for ring in list(_owned_rings):
        ring.close()


def _on_sigterm(signum, frame, previous=None):
    _unlink_owned_rings()
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_cleanup_handlers() -> None:
    """Unlink owned rings at exit and on SIGTERM (chaining to any handler already installed)."""
    global _atexit_installed, _sigterm_installed
    if not _atexit_installed:
        atexit.register(_unlink_owned_rings)
        _atexit_installed = True
    if not _sigterm_installed and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda s, f: _on_sigterm(s, f, previous))
        _sigterm_installed = True


class ShmRingWriter:
    """The actor's side: create a ring, fill slots in place, commit them.

    ``full_policy`` says what ``acquire`` does when no slot is FREE: "wait" up to
    ``wait_timeout_s`` for the learner to free one (then drop), or "drop" at once.
    """

    def __init__(self, name: str | None, spec: ArraySpec, num_slots: int = DEFAULT_NUM_SLOTS,
                 full_policy: str = "wait", wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 prefix: str = RING_PREFIX):
        if full_policy not in ("wait", "drop"):
            raise ValueError(f"full_policy must be 'wait' or 'drop', not {full_policy!r}")
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        name = name or f"{prefix}{os.getpid()}_{secrets.token_hex(4)}"
        self.full_policy = full_policy
        self.wait_timeout_s = wait_timeout_s
        self.poll_interval_s = poll_interval_s
        self.pid = os.getpid()
        self.drops = 0  # segments not written because every slot stayed busy
        self.waits = 0  # acquisitions that had to wait for a free slot
        self.wait_time_s = 0.0
        self.reclaimed = 0  # committed slots freed unread by reclaim_unread
        self.reclaim_races = 0
        self._seq = 0
        self._next = 0
        size = ring_bytes(spec, num_slots)
        shm = _open_shm(name, create=True, size=size)
        try:
            _reserve(shm, size)
            self._ring = _Ring(shm, spec, num_slots)
            h = self._ring.header
            h["num_slots"], h["slot_bytes"] = num_slots, self._ring.slot_bytes
            h["layout_version"] = LAYOUT_VERSION
            h["writer_pid"], h["writer_start_time"] = self.pid, _process_start_time(self.pid)
            h["spec_digest"] = spec_digest(spec)
            self._ring.slots["state"] = FREE
            self._ring.slots["writer_pid"] = self.pid
            h["magic"] = MAGIC  # last: a reader attaching to a half-built ring sees no magic
        except BaseException:
            _unlink_shm(shm)
            _close_shm(shm)
            raise
        self.name = self._ring.name
        self._closed = False
        _owned_rings.add(self)
        _install_cleanup_handlers()

    @classmethod
    def from_config(cls, cfg: Any, spec: ArraySpec, name: str | None = None) -> "ShmRingWriter":
        t = cfg_get(cfg, "transport", cfg)
        r = cfg_get(t, "ring", {})
        return cls(name, spec, num_slots=int(cfg_get(r, "num_slots", DEFAULT_NUM_SLOTS)),
                   full_policy=str(cfg_get(r, "full_policy", "wait")),
                   wait_timeout_s=float(cfg_get(r, "wait_timeout_s", DEFAULT_WAIT_TIMEOUT_S)),
                   poll_interval_s=float(cfg_get(r, "poll_interval_s", DEFAULT_POLL_INTERVAL_S)),
                   prefix=str(cfg_get(r, "name_prefix", RING_PREFIX)))

    @property
    def num_slots(self) -> int:
        return self._ring.num_slots

    def _claim_free_slot(self) -> int | None:
        states = self._ring.slots["state"]
        for k in range(self.num_slots):
            i = (self._next + k) % self.num_slots
            if states[i] == FREE:
                return i
        return None

    def acquire(self) -> SlotView | None:
        """A FREE slot, now WRITING, to fill in place; None when the full policy gives up.

        If that keeps happening, the learner may have restarted and lost notices: send the
        ``ready_notices()`` again (a duplicate notice is rejected by its sequence number)."""
        if self._closed:  # e.g. closed by the SIGTERM handler while the owner finishes its loop
            self.drops += 1
            return None
        index = self._claim_free_slot()
        if index is None and self.full_policy == "wait":
            self.waits += 1
            t0 = time.monotonic()
            deadline = t0 + self.wait_timeout_s
            while index is None and time.monotonic() < deadline:
                time.sleep(self.poll_interval_s)
                index = self._claim_free_slot()
            self.wait_time_s += time.monotonic() - t0
        if index is None:
            self.drops += 1
            return None
        self._seq += 1
        slot = self._ring.slots[index]
        slot["seq"] = self._seq
        slot["state"] = WRITING
        self._next = (index + 1) % self.num_slots
        return SlotView(self._ring.arrays[index], index, self._seq)

    def commit(self, slot: SlotView, policy_version: int) -> dict:
        """Publish a filled slot (state READY, stored last) and return the notice for the reader."""
        header = self._ring.slots[slot.index]
        state = int(header["state"])
        if int(header["seq"]) != slot.seq or state not in (WRITING, READING):
            raise RuntimeError(f"ring {self.name} slot {slot.index}: commit of seq {slot.seq} but "
                               f"the slot is {STATE_NAMES.get(state)} seq {int(header['seq'])}")
        if state == READING:
            # A reader took this slot for a notice of its previous seq at the instant
            # reclaim_unread freed it; that reader's release() fails and it drops its copy.
            self.reclaim_races += 1
        header["policy_version"] = int(policy_version)
        header["state"] = READY
        return {"ring": self.name, "slot": slot.index, "seq": slot.seq,
                "policy_version": int(policy_version), "writer_pid": self.pid}

    def ready_notices(self) -> list[dict]:
        """Notices of every slot committed but not yet taken by the reader."""
        slots = self._ring.slots
        return [{"ring": self.name, "slot": i, "seq": int(slots["seq"][i]),
                 "policy_version": int(slots["policy_version"][i]), "writer_pid": self.pid}
                for i in range(self.num_slots) if int(slots["state"][i]) == READY]

    def reclaim_unread(self) -> int:
        """Free every committed slot that no reader has taken (its notice went to a learner that
        has restarted since); returns how many. Slots being read are left to the reader, whose
        own attach frees those of a reader that died."""
        states = self._ring.slots["state"]
        freed = 0
        for i in range(self.num_slots):
            if int(states[i]) == READY:
                states[i] = FREE
                freed += 1
        self.reclaimed += freed
        return freed

    def states(self) -> list[str]:
        return self._ring.states()

    def close(self) -> None:
        """Unlink the ring (a reader's existing mapping stays valid) and unmap it here."""
        if getattr(self, "_closed", True) or os.getpid() != self.pid:
            return  # a forked child does not own its parent's ring
        self._closed = True
        _owned_rings.discard(self)
        shm = self._ring.shm
        self._ring._release_views()
        _unlink_shm(shm)
        _close_shm(shm)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# reader (learner)


class ShmRingReader:
    """The learner's side of one ring: read committed slots, then release them."""

    def __init__(self, ring: _Ring):
        self._ring = ring
        self.name = ring.name
        self.drops = DropCounter(f"ring:{ring.name}")
        h = ring.header
        self.writer_pid = int(h["writer_pid"])
        self.writer_start_time = float(h["writer_start_time"])

    @classmethod
    def attach(cls, name: str, spec: ArraySpec, num_slots: int | None = None,
               reclaim: bool = True) -> "ShmRingReader":
        """Attach to an existing ring; ValueError if it is not a Tandem ring of this spec.

        A ring has one reader at a time, so with ``reclaim`` the slots that a previous reader
        (a learner that crashed) left READING are freed for the writer."""
        shm = _open_shm(name)
        try:
            if shm.size < RING_HEADER.itemsize:
                raise ValueError(f"shared memory {name!r} is too small to be a Tandem ring")
            h = np.ndarray((), RING_HEADER, buffer=shm.buf).copy()
            if bytes(h["magic"]) != MAGIC or int(h["layout_version"]) != LAYOUT_VERSION:
                raise ValueError(f"shared memory {name!r} is not an initialised Tandem ring "
                                 f"(layout version {LAYOUT_VERSION})")
            n = int(h["num_slots"])
            if num_slots is not None and n != num_slots:
                raise ValueError(f"ring {name!r} has {n} slots, expected {num_slots}")
            if bytes(h["spec_digest"]) != spec_digest(spec):
                raise ValueError(f"ring {name!r} was created for another array spec")
            if shm.size < ring_bytes(spec, n):
                raise ValueError(f"ring {name!r} is {shm.size} bytes, its layout needs {ring_bytes(spec, n)}")
            ring = _Ring(shm, spec, n)
        except BaseException:
            _close_shm(shm)
            raise
        if reclaim:
            states = ring.slots["state"]
            for i in np.flatnonzero(states == READING):
                log.info("ring %s: freeing slot %d left READING by a previous reader", name, i)
                states[i] = FREE
        return cls(ring)

    @property
    def num_slots(self) -> int:
        return self._ring.num_slots

    def owner_alive(self) -> bool:
        return pid_alive(self.writer_pid, self.writer_start_time)

    def _check_notice(self, notice: Mapping) -> tuple[int, int] | None:
        try:
            index, seq = int(notice["slot"]), int(notice["seq"])
        except (KeyError, TypeError, ValueError):
            self.drops.record("bad_notice", peer=self.name)
            return None
        if notice.get("ring") != self.name or not 0 <= index < self.num_slots:
            self.drops.record("bad_notice", peer=self.name)
            return None
        return index, seq

    def read(self, notice: Mapping) -> dict[str, np.ndarray] | None:
        """Read-only views of the slot named by ``notice``, now READING; None (counted in
        ``drops``) unless the slot is READY with the notice's sequence number. The views are
        valid until ``release``: copy what you keep."""
        checked = self._check_notice(notice)
        if checked is None:
            return None
        index, seq = checked
        slot = self._ring.slots[index]
        state, slot_seq = int(slot["state"]), int(slot["seq"])
        if state != READY or slot_seq != seq:
            self.drops.record("slot_not_ready", peer=self.name)
            log.debug("ring %s slot %d: notice seq %d, slot %s seq %d", self.name, index, seq,
                      STATE_NAMES.get(state, state), slot_seq)
            return None
        slot["state"] = READING
        views = {}
        for name, a in self._ring.arrays[index].items():
            v = a.view()
            v.flags.writeable = False
            views[name] = v
        return views

    def take(self, notice: Mapping, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        """read + copy out (into ``out`` when given, else new arrays) + release, in one call;
        None when the slot was not ready or its content may have changed during the copy."""
        views = self.read(notice)
        if views is None:
            return None
        if out is None:
            out = {name: np.array(v) for name, v in views.items()}
        else:
            for name, v in views.items():
                np.copyto(out[name], v)
        del views
        if not self.release(notice):
            self.drops.record("torn_read", peer=self.name)
            return None
        return out

    def release(self, notice: Mapping) -> bool:
        """Free the slot (READING, or READY when discarding unread). False when the slot no
        longer holds the notice's segment (the writer reclaimed and reused it): a copy made
        since ``read`` may then be torn, discard it."""
        checked = self._check_notice(notice)
        if checked is None:
            return False
        index, seq = checked
        slot = self._ring.slots[index]
        if int(slot["seq"]) != seq or int(slot["state"]) not in (READY, READING):
            return False
        slot["state"] = FREE
        return True

    def policy_version(self, notice: Mapping) -> int:
        return int(self._ring.slots["policy_version"][int(notice["slot"])])

    def states(self) -> list[str]:
        return self._ring.states()

    def unlink(self) -> None:
        """Remove the ring's name (for a ring whose writer is dead); the mapping stays until close."""
        _unlink_shm(self._ring.shm)

    def close(self) -> None:
        if self._ring is None:
            return
        shm = self._ring.shm
        self._ring._release_views()
        self._ring = None
        _close_shm(shm)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# notices and cleanup


def notice_message(notice: dict, sender: str = "") -> Message:
    """The small control-plane message that tells the learner a slot is READY."""
    return Message("segment_notice", sender=sender, policy_version=int(notice["policy_version"]),
                   meta=dict(notice))



def list_rings(prefix: str = RING_PREFIX) -> list[str]:
    """Names of the shared-memory segments starting with ``prefix`` (Linux: /dev/shm)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _writer_of(name: str, prefix: str) -> tuple[int, float]:
    """(pid, start time) of a ring's writer from its header, else from its name; pid -1 if
    neither tells (not a Tandem ring)."""
    try:
        shm = _open_shm(name)
    except FileNotFoundError:
        return -1, 0.0
    except (OSError, ValueError):  # an empty segment (its writer died creating it) cannot be mapped
        shm = None
    if shm is not None:
        try:
            if shm.size >= RING_HEADER.itemsize:
                h = np.ndarray((), RING_HEADER, buffer=shm.buf).copy()
                if bytes(h["magic"]) == MAGIC:
                    return int(h["writer_pid"]), float(h["writer_start_time"])
        finally:
            _close_shm(shm)
    try:  # "<prefix><pid>_<token>"
        return int(name[len(prefix):].split("_", 1)[0]), 0.0
    except ValueError:
        return -1, 0.0


def reap_dead_rings(prefix: str = RING_PREFIX) -> list[str]:
    """Unlink every ring of this user with ``prefix`` whose writer process is gone; returns their names."""
    reaped = []
    for name in list_rings(prefix):
        try:
            if os.stat(os.path.join(SHM_DIR, name)).st_uid != os.getuid():
                continue  # another user's run on this host: not ours to open or unlink
        except FileNotFoundError:
            continue
        pid, start_time = _writer_of(name, prefix)
        if pid == -1 or pid_alive(pid, start_time):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))  # what shm_unlink does on Linux
        except FileNotFoundError:
            continue
        reaped.append(name)
        log.info("unlinked ring %s of dead writer pid %d", name, pid)
    return reaped
