"""Fuzzer of the learner's receivers (``python -m tools.fuzz``).

Sends random and mutated messages to a live learner's data (PULL) and control (ROUTER) sockets
while a synthetic actor keeps sending a valid segment stream beside them, then reads the
learner's status (``dropped`` by reason) over the control channel and checks that

- the learner stays up and answers,
- every bad message was counted, under the reason the learner's own validation gives it
  (predicted here message by message by running the same checks: ``protocol.decode`` with the
  learner's limits, ``episode_msg.message_to_episode``, the ring attach of a notice),
- the good stream still trains: the learner's update count advances,
- and, given the learner's pid, reports its resident memory (RSS) before, during and after.

Messages whose outcome cannot be predicted without touching the learner's state (a valid
segment, a notice that would attach a real ring, a well-formed episode) are drawn again, so
the accounting is exact.

    python -m tools.fuzz --messages 10000                       # spawns learner.main on ipc
    python -m tools.fuzz --messages 10000 --data-endpoint ipc:///tmp/x/data.ipc \\
        --control-endpoint ipc:///tmp/x/control.ipc [overrides matching that learner's limits]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np
import zmq

from common.channels import ControlClient
from common.episode_msg import (ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode, EpisodeFormatError, EpisodeSpec,
                                episode_to_message, expected_episode_spec, message_to_episode)
from common.protocol import KINDS, PROTOCOL_VERSION, Limits, Message, ProtocolError, decode, encode
from common.peer_meta import eval_report, sanitize_peer_meta
from common.policy import make_policy
from common.procinfo import rss_mib
from common.segment import SegmentSpec, check_segment_values
from common.shm_ring import RING_NAME, ShmRingReader, ShmRingWriter
from tools.synthetic import DEFAULT_IMAGE_SIZE, SyntheticActor, poll_until, spec_from_config

log = logging.getLogger("tandem.fuzz")

ROOT = Path(__file__).resolve().parent.parent
# Learner settings for a spawned learner: small and fast on a CPU; receive limits small enough
# that "message too large" is reachable with messages of a few hundred KiB.
LEARNER_OVERRIDES = ["policy=tiny", "device=cpu", "actor.rollout_steps=2", f"env.image_size={DEFAULT_IMAGE_SIZE}", "learner.global_batch_size=2",
                     "learner.micro_batch_size=2", "learner.checkpoint_interval=1000000",
                     "learner.log_interval=1000", "transport.limits.max_message_bytes=1048576",
                     "transport.limits.max_array_bytes=524288", "transport.limits.max_arrays=64",
                     "transport.limits.max_header_bytes=65536", "transport.heartbeat_interval_s=0.5"]
# Learner drop keys that the good stream itself may raise under load (not fuzz outcomes).
LOAD_KEYS = ("stale", "overflow")
STATUS_TIMEOUT_MS = 3000
BAD_DTYPES = [">f4", ">i8", "|O", "<c8", "<U4", "|V8", "<M8[s]", "float32", "", "<f16", "f4"]
BAD_VERSIONS = [0, 2, PROTOCOL_VERSION + 1, -1, 2 ** 63 - 1, "1", 1.0, True, None]
MAX_RANDOM_BYTES = 512
SEQ_NEVER_USED = 2 ** 40  # bad notices on the live ring use sequence numbers above this
RSS_SAMPLES = 4  # the learner's RSS is read before the fuzz, after each quarter of it, and at the end


@dataclass
class FuzzReport:
    sent: int = 0
    redrawn: int = 0
    by_generator: Counter = field(default_factory=Counter)
    local_reasons: Counter = field(default_factory=Counter)   # protocol reason codes predicted here
    expected: Counter = field(default_factory=Counter)        # learner drop key -> predicted count
    observed: dict = field(default_factory=dict)              # learner drop key -> delta
    updates_before: int = 0
    updates_after: int = 0
    good_segments_sent: int = 0
    learner_alive: bool = True
    duration_s: float = 0.0
    rss_samples: list = field(default_factory=list)           # [messages sent, learner RSS in MiB]

    @property
    def mismatches(self) -> dict:
        keys = set(self.expected) | {k for k, v in self.observed.items() if v and k not in LOAD_KEYS}
        return {k: (self.expected.get(k, 0), self.observed.get(k, 0)) for k in sorted(keys)
                if self.expected.get(k, 0) != self.observed.get(k, 0)}

    @property
    def ok(self) -> bool:
        return self.learner_alive and not self.mismatches and self.updates_after > self.updates_before

    def as_dict(self) -> dict:
        return {"ok": self.ok, "sent": self.sent, "redrawn": self.redrawn, "duration_s": round(self.duration_s, 1),
                "by_generator": dict(self.by_generator), "protocol_reasons": dict(self.local_reasons),
                "expected": dict(self.expected), "observed": self.observed, "mismatches": self.mismatches,
                "updates_before": self.updates_before, "updates_after": self.updates_after,
                "good_segments_sent": self.good_segments_sent, "learner_alive": self.learner_alive,
                "learner_rss_mib": self.rss_summary()}

    def rss_summary(self) -> dict | None:
        if not self.rss_samples:
            return None
        values = [v for _, v in self.rss_samples]
        return {"start": values[0], "end": values[-1], "max": max(values), "growth": round(values[-1] - values[0], 1),
                "samples": self.rss_samples}


# ----------------------------------------------------------------------------------------------
# prediction: what the learner's ingest does with a message (mirrors learner/main.py Ingest)


class Predictor:
    def __init__(self, limits: Limits, live_rings: set[str], spec: SegmentSpec, ring_prefix: str = "tandem_",
                 episode_spec: EpisodeSpec | None = None, vocab_size: int = 2 ** 31 - 1):
        self.limits, self.spec, self.ring_prefix = limits, spec, ring_prefix
        self.episode_spec, self.vocab_size = episode_spec, vocab_size
        self.live_rings = live_rings  # rings the learner has attached (the good stream's)

    def data(self, frames: list) -> tuple[dict, str] | None:
        """Learner drop-key deltas and a reason label for ``frames`` on the data socket; None
        when the message would not be dropped (or its outcome depends on the learner's state)."""
        try:
            msg = decode(frames, self.limits)
        except ProtocolError as e:
            return {"protocol_data": 1, f"protocol_data/{e.reason}": 1}, e.reason
        if msg.kind == "segment":
            return self.segment(msg)
        if msg.kind == "segment_notice":
            return self.notice(msg)
        if msg.kind == "episode":
            return self.episode(msg)
        return {f"unexpected_kind:{msg.kind}": 1}, "unexpected_kind"

    def control(self, frames: list) -> tuple[dict, str] | None:
        try:
            msg = decode(frames, self.limits)
        except ProtocolError as e:
            return {"protocol_control": 1, f"protocol_control/{e.reason}": 1}, e.reason
        if msg.kind not in ("hello", "heartbeat"):
            return None
        # a peer seen for the first time (the generator never reuses a name): it registers now
        meta, rejected = sanitize_peer_meta(msg.meta)
        counts = Counter(f"control_field:{r}" for r in rejected)
        if "eval_success" in meta:
            try:
                eval_report(meta, meta.get("mode", "train"))
            except ValueError:
                counts["control_eval_result"] += 1
        return (dict(counts), "control_value") if counts else None

    def segment(self, msg: Message) -> tuple[dict, str] | None:
        try:
            self.spec.check(dict(msg.arrays))
        except ValueError:
            return {"bad_segment": 1}, "bad_segment"
        fault = check_segment_values(dict(msg.arrays), self.vocab_size)
        if fault is None:
            return None  # it would be trained on
        return {f"bad_segment_value:{fault}": 1}, f"bad_segment_value:{fault}"

    def notice(self, msg: Message) -> tuple[dict, str] | None:
        meta = msg.meta
        name = meta.get("ring")
        try:
            live = name in self.live_rings
        except TypeError:  # unhashable ring name: the learner's dict lookup raises
            return {"ingest_error": 1}, "ingest_error"
        if live:
            try:
                index, seq = int(meta["slot"]), int(meta["seq"])
            except (KeyError, TypeError, ValueError):
                return {"ring": 1, "slot_not_ready": 1}, "bad_notice"
            if 0 <= seq < SEQ_NEVER_USED:
                return None  # could name a real slot of the good stream
            return {"ring": 1, "slot_not_ready": 1}, "bad_notice" if not 0 <= index else "slot_not_ready"
        if not (isinstance(name, str) and name.startswith(self.ring_prefix) and RING_NAME.fullmatch(name)):
            return {"bad_ring": 1}, "bad_ring"
        try:  # the learner's own attach code path
            spec = SegmentSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
            if spec != self.spec:
                return {"bad_ring": 1}, "bad_ring"
            reader = ShmRingReader.attach(name, spec.arrays(), meta.get("num_slots"))
        except (KeyError, TypeError, ValueError, OSError):
            return {"bad_ring": 1}, "bad_ring"
        except Exception:
            return {"ingest_error": 1}, "ingest_error"
        reader.close()
        return None  # it would attach a real ring

    def episode(self, msg: Message) -> tuple[dict, str] | None:
        try:
            message_to_episode(msg, self.episode_spec)
        except EpisodeFormatError as e:
            return {f"bad_episode:{e.reason}": 1}, f"bad_episode:{e.reason}"
        except Exception:
            return {"ingest_error": 1}, "ingest_error"
        return None  # well formed: the learner would store it


# ----------------------------------------------------------------------------------------------
# generators: each returns (channel, frames)


def _header(kind="segment", version=PROTOCOL_VERSION, sender="fuzz", policy_version=0, meta=None, arrays=None,
            **extra) -> dict:
    h = {"version": version, "kind": kind, "sender": sender, "policy_version": policy_version,
         "meta": meta or {}, "arrays": arrays or []}
    h.update(extra)
    return h


def _pack(h) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


class Generators:
    def __init__(self, rng: np.random.Generator, spec: SegmentSpec, limits: Limits, live_ring: str | None,
                 decoy_ring: str | None, not_a_ring: str | None, vocab_size: int = 258):
        self.rng, self.spec, self.limits = rng, spec, limits
        self.live_ring, self.decoy_ring, self.not_a_ring = live_ring, decoy_ring, not_a_ring
        self.table: list[tuple[str, float, Callable[[], tuple[str, list]]]] = [
            ("random_bytes", 1, self.random_bytes), ("msgpack_not_a_map", 1, self.msgpack_not_a_map),
            ("truncated_frames", 2, self.truncated_frames), ("extra_frames", 2, self.extra_frames),
            ("wrong_dtype", 2, self.wrong_dtype), ("huge_shape", 2, self.huge_shape),
            ("bad_shape", 1, self.bad_shape), ("wrong_version", 2, self.wrong_version),
            ("lying_length", 2, self.lying_length), ("bad_kind", 2, self.bad_kind),
            ("header_fields", 1, self.header_fields), ("bad_names", 1, self.bad_names),
            ("too_many_arrays", 0.3, self.too_many_arrays), ("header_too_large", 0.2, self.header_too_large),
            ("message_too_large", 0.2, self.message_too_large), ("mutated_header", 3, self.mutated_header),
            ("notice_missing_ring", 2, self.notice_missing_ring), ("notice_bad_spec", 1, self.notice_bad_spec),
            ("notice_live_ring_bad_slot", 2, self.notice_live_ring_bad_slot),
            ("bad_episode", 3, self.bad_episode), ("unexpected_kind", 1, self.unexpected_kind),
            ("control_garbage", 2, self.control_garbage),
            ("hostile_segment", 3, self.hostile_segment), ("hostile_hello", 2, self.hostile_hello),
        ]
        self.vocab_size = vocab_size
        self._peers = 0
        w = np.array([x[1] for x in self.table], float)
        self.p = w / w.sum()

    def draw(self) -> tuple[str, str, list]:
        name, _, fn = self.table[int(self.rng.choice(len(self.table), p=self.p))]
        channel, frames = fn()
        return name, channel, frames

    # -- helpers ------------------------------------------------------------------------------
    def _bytes(self, n: int | None = None) -> bytes:
        n = int(self.rng.integers(0, MAX_RANDOM_BYTES)) if n is None else n
        return self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()

    def _valid_segment(self) -> list:
        arrays = {k: np.zeros(s, d) for k, (d, s) in self.spec.arrays().items()}
        return encode(Message("segment", sender="fuzz", policy_version=0, arrays=arrays))

    def _valid_episode_message(self, frames_n: int = 3) -> Message:
        ep = Episode(episode_id=self._bytes(8).hex(), task="fuzz", success=False, fps=10,
                     images=np.zeros((frames_n, 8, 8, 3), np.uint8), states=np.zeros((frames_n, 8), np.float32),
                     actions=np.zeros((frames_n, 7), np.float32))
        return episode_to_message(ep, "fuzz")

    def _one_array(self, dtype="<f4", shape=(4,), payload: bytes | None = None, **hkw) -> list:
        payload = bytes(int(np.prod(shape)) * 4) if payload is None else payload
        return [_pack(_header(arrays=[["x", dtype, list(shape)]], **hkw)), payload]

    # -- protocol-level -----------------------------------------------------------------------
    def random_bytes(self):
        return "data", [self._bytes() for _ in range(int(self.rng.integers(1, 4)))]

    def msgpack_not_a_map(self):
        obj = [int(self.rng.integers(-5, 5)), "text", [1, 2, 3], None, 3.5, b"\x00\x01", True][int(self.rng.integers(7))]
        return "data", [_pack(obj)]

    def truncated_frames(self):
        frames = self._valid_segment()
        k = int(self.rng.integers(1, len(frames)))
        return "data", frames[:len(frames) - k]

    def extra_frames(self):
        return "data", self._valid_segment() + [self._bytes(int(self.rng.integers(0, 64)))
                                                for _ in range(int(self.rng.integers(1, 4)))]

    def wrong_dtype(self):
        return "data", self._one_array(dtype=BAD_DTYPES[int(self.rng.integers(len(BAD_DTYPES)))])

    def huge_shape(self):
        big = int(self.limits.max_array_bytes)
        shape = [[big, big], [2 ** 62], [2 ** 31, 2 ** 31, 2 ** 31], [big // 4 + 1], [2 ** 63 - 1, 2 ** 63 - 1]][int(self.rng.integers(5))]
        return "data", [_pack(_header(arrays=[["x", "<f4", shape]])), b"\x00" * 16]

    def bad_shape(self):
        shape = [[-1], [1.5], "abc", None, [[2]], [True, 2], {"a": 1}][int(self.rng.integers(7))]
        return "data", [_pack(_header(arrays=[["x", "<f4", shape]])), b"\x00" * 4]

    def wrong_version(self):
        return "data", self._one_array(version=BAD_VERSIONS[int(self.rng.integers(len(BAD_VERSIONS)))])

    def lying_length(self):
        n = int(self.rng.integers(1, 64))
        delta = int(self.rng.choice([-1, 1])) * int(self.rng.integers(1, 4 * n))
        return "data", [_pack(_header(arrays=[["x", "<f4", [n]]])), bytes(max(0, 4 * n + delta))]

    def bad_kind(self):
        kind = [self._bytes(6).hex(), "", "SEGMENT", 7, None, ["segment"], "segment " * 3][int(self.rng.integers(7))]
        return "data", self._one_array(kind=kind)

    def header_fields(self):
        h = _header()
        choice = int(self.rng.integers(4))
        if choice == 0:
            h.pop(list(h)[int(self.rng.integers(len(h)))])
        elif choice == 1:
            h["extra"] = 1
        elif choice == 2:
            h[["sender", "policy_version", "meta", "arrays"][int(self.rng.integers(4))]] = 1.5
        else:
            h["meta"] = {1: "non-string key"}
        return "data", [msgpack.packb(h, use_bin_type=True, strict_types=False)]

    def bad_names(self):
        name = ["", "\x00bad", "n" * 300, 5, None, "tab\tname"][int(self.rng.integers(6))]
        if self.rng.random() < 0.3:
            return "data", [_pack(_header(arrays=[["x", "<f4", [1]], ["x", "<f4", [1]]])), bytes(4), bytes(4)]
        return "data", [_pack(_header(arrays=[[name, "<f4", [1]]])), bytes(4)]

    def too_many_arrays(self):
        n = self.limits.max_arrays + 1 + int(self.rng.integers(0, 8))
        return "data", [_pack(_header(arrays=[[f"a{i}", "|u1", [0]] for i in range(n)]))] + [b""] * n

    def header_too_large(self):
        return "data", [_pack(_header(meta={"pad": "x" * (self.limits.max_header_bytes + 16)}))]

    def message_too_large(self):
        n = self.limits.max_message_bytes // 2 + 1  # two arrays, each below the per-array limit
        n = min(n, self.limits.max_array_bytes)
        k = self.limits.max_message_bytes // n + 1
        return "data", [_pack(_header(arrays=[[f"a{i}", "|u1", [n]] for i in range(k)]))] + [bytes(n)] * k

    def mutated_header(self):
        src = [self._valid_segment, lambda: encode(self._valid_episode_message()),
               lambda: encode(Message("segment_notice", sender="fuzz", meta={"ring": "x", "slot": 0, "seq": 1}))]
        frames = list(src[int(self.rng.integers(len(src)))]())
        h = bytearray(bytes(frames[0]))
        for _ in range(int(self.rng.integers(1, 9))):
            op = int(self.rng.integers(3))
            i = int(self.rng.integers(len(h)))
            if op == 0:
                h[i] = int(self.rng.integers(256))
            elif op == 1:
                del h[i:]
                if not h:
                    break
            else:
                h[i:i] = self._bytes(int(self.rng.integers(1, 8)))
        frames[0] = bytes(h)
        return "data", frames

    # -- ingest-level -------------------------------------------------------------------------
    def _notice(self, meta: dict) -> list:
        return encode(Message("segment_notice", sender="fuzz", policy_version=0, meta=meta))

    def notice_missing_ring(self):
        name = [f"tandem_fuzz_{self._bytes(6).hex()}", self.not_a_ring or "none", "", None, 5, "a" * 300,
                "with/slash"][int(self.rng.integers(7))]
        return "data", self._notice({"ring": name, "slot": 0, "seq": 1, "spec": asdict(self.spec), "num_slots": 8})

    def notice_bad_spec(self):
        spec = asdict(self.spec)
        choice = int(self.rng.integers(5))
        if choice == 0:
            spec["steps"] += 1  # the decoy ring exists but has another layout
        elif choice == 1:
            spec["bogus"] = 1
        elif choice == 2:
            spec["image_hw"] = "ab"
        elif choice == 3:
            spec = {}
        else:
            return "data", self._notice({"ring": self.decoy_ring, "slot": 0, "seq": 1, "spec": spec, "num_slots": 3})
        return "data", self._notice({"ring": self.decoy_ring, "slot": 0, "seq": 1, "spec": spec, "num_slots": 4})

    def notice_live_ring_bad_slot(self):
        slot = [-1, 10 ** 6, "abc", None, 0, 1][int(self.rng.integers(6))]
        seq = [SEQ_NEVER_USED + int(self.rng.integers(10 ** 6)), -5, "x", None][int(self.rng.integers(4))]
        meta = {"ring": self.live_ring, "slot": slot, "seq": seq}
        if self.rng.random() < 0.2:
            meta.pop(["slot", "seq"][int(self.rng.integers(2))])
        return "data", self._notice(meta)

    def bad_episode(self):
        msg = self._valid_episode_message(int(self.rng.integers(1, 4)))
        a, m = dict(msg.arrays), dict(msg.meta)
        choice = int(self.rng.integers(10))
        if choice == 0:
            m.pop(["episode_id", "task", "success", "fps"][int(self.rng.integers(4))])
        elif choice == 1:
            a.pop([IMAGE_KEY, STATE_KEY, ACTION_KEY][int(self.rng.integers(3))])
        elif choice == 2:
            a[IMAGE_KEY] = a[IMAGE_KEY].astype(np.float32)
        elif choice == 3:
            a[STATE_KEY] = np.zeros((a[STATE_KEY].shape[0], 9), np.float32)
        elif choice == 4:
            a[ACTION_KEY] = np.zeros((a[ACTION_KEY].shape[0] + 1, 7), np.float32)
        elif choice == 5:
            a = {IMAGE_KEY: np.zeros((0, 8, 8, 3), np.uint8), STATE_KEY: np.zeros((0, 8), np.float32),
                 ACTION_KEY: np.zeros((0, 7), np.float32)}
        elif choice == 6:
            m["schema"] = 2
        elif choice == 7:
            m["episode_id"] = "" if self.rng.random() < 0.5 else "e" * 65
        elif choice == 8:
            a[IMAGE_KEY] = np.zeros((a[ACTION_KEY].shape[0], 8, 8), np.uint8)
        else:
            m["fps"] = "fast"  # not an int
        return "data", encode(Message("episode", sender="fuzz", meta=m, arrays=a))

    def unexpected_kind(self):
        kind = sorted(KINDS - {"segment", "segment_notice", "episode"})[int(self.rng.integers(6))]
        return "data", encode(Message(kind, sender="fuzz", meta={"x": 1}))

    # -- value level: well-formed, harmful ------------------------------------------------------
    def hostile_segment(self):
        """A segment of the right layout with one poisoned value (issue #18)."""
        arrays = {k: np.zeros(sh, d) for k, (d, sh) in self.spec.arrays().items()}
        kind = int(self.rng.integers(6))
        bad_float = float(self.rng.choice([np.nan, np.inf, -np.inf]))
        if kind == 0:
            tokens = arrays["tokens"].reshape(-1)
            tokens[int(self.rng.integers(tokens.size))] = self.vocab_size + int(self.rng.integers(0, 1000))
        elif kind == 1:
            name = str(self.rng.choice(["reward", "state", "chain", "behaviour_logp", "behaviour_value"]))
            flat = arrays[name].reshape(-1)
            flat[int(self.rng.integers(flat.size))] = bad_float
        elif kind == 2:
            arrays["done"][int(self.rng.integers(arrays["done"].size))] = int(self.rng.integers(2, 256))
        elif kind == 3:
            arrays["success"][int(self.rng.integers(arrays["success"].size))] = 1  # without done
        elif kind == 4:
            arrays["tokens"].reshape(-1)[0] = -int(self.rng.integers(1, 1000))
        else:
            arrays["success"][0] = int(self.rng.integers(2, 256))
            arrays["done"][0] = 1
        return "data", encode(Message("segment", sender="fuzz", policy_version=0, arrays=arrays))

    def hostile_hello(self):
        """A hello/heartbeat of a new peer with typed-field violations or a spoofed eval result."""
        self._peers += 1
        meta: dict = {"episodes": 3}
        choice = int(self.rng.integers(6))  # one violation: one count per message
        if choice == 0:
            meta["mode"] = [5, "admin", "", None][int(self.rng.integers(4))]
        elif choice == 1:
            meta["env_steps_per_s"] = float(self.rng.choice([np.nan, np.inf]))
        elif choice == 2:
            meta["x" * int(self.rng.integers(65, 300))] = 1
        elif choice == 3:
            meta["note"] = "y" * int(self.rng.integers(129, 2000))
        elif choice == 4:
            meta["nested"] = {"a": [1, 2, 3]}
        else:
            meta.update(eval_success=float(self.rng.choice([1.0, 7.0, -1.0])), eval_episodes=4)
        kind = "hello" if self.rng.random() < 0.5 else "heartbeat"
        return "control", encode(Message(kind, sender=f"fuzz-peer-{self._peers}", policy_version=0, meta=meta))

    def control_garbage(self):
        gens = [self.random_bytes, self.truncated_frames, self.wrong_version, self.lying_length, self.bad_kind,
                self.wrong_dtype, self.huge_shape]
        return "control", gens[int(self.rng.integers(len(gens)))]()[1]


# ----------------------------------------------------------------------------------------------
# the run


def learner_status(control_endpoint: str, identity: str = "fuzz-status") -> Message | None:
    client = ControlClient(control_endpoint, identity=identity)
    try:
        return client.request(Message("status_request", sender=identity), timeout_ms=STATUS_TIMEOUT_MS)
    finally:
        client.close()


class GoodStream(threading.Thread):
    """A synthetic actor in a thread: valid segments through a ring, at a steady rate."""

    def __init__(self, cfg, rate: float):
        super().__init__(name="good-stream", daemon=True)
        self.actor = SyntheticActor(cfg, actor=0, spec=spec_from_config(cfg), use_shm=True)
        self.rate = rate
        self.halt = threading.Event()

    def run(self):
        try:
            self.actor.run(self.rate, 0, stop=self.halt.is_set)
        finally:
            self.actor.close()


def spawn_learner(workdir: Path, overrides: list[str]) -> tuple[subprocess.Popen, dict]:
    eps = {k: f"ipc://{workdir}/sockets/{k}.ipc" for k in ("data", "weights", "control")}  # sockets/: made 0700
    args = [f"run_dir={workdir}/run", *LEARNER_OVERRIDES, *[f"transport.{k}_endpoint={v}" for k, v in eps.items()],
            *overrides]
    logf = open(workdir / "learner.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "learner.main", *args], cwd=ROOT, stdout=logf,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, eps




def run_fuzz(messages: int, cfg, data_endpoint: str, control_endpoint: str, seed: int = 0,
             good_rate: float = 20.0, settle_timeout_s: float = 30.0, alive: Callable[[], bool] = lambda: True,
             progress: bool = False, learner_pid: int | None = None) -> FuzzReport:
    rng = np.random.default_rng(seed)
    limits = Limits.from_config(cfg.transport)
    report = FuzzReport()
    spec = spec_from_config(cfg)
    rss_every = max(1, messages // RSS_SAMPLES)

    def sample_rss():
        if learner_pid is not None:
            report.rss_samples.append([report.sent, round(rss_mib(learner_pid), 1)])

    good = GoodStream(cfg, good_rate)
    good.start()
    decoy = ShmRingWriter(None, spec.arrays(), num_slots=4, prefix="tandem_fuzzdecoy_")
    not_a_ring = SharedMemory(name=f"fuzz_notring_{os.getpid()}", create=True, size=64)
    ctx = zmq.Context.instance()
    data = ctx.socket(zmq.PUSH)
    control = ctx.socket(zmq.DEALER)
    for s in (data, control):
        s.setsockopt(zmq.LINGER, 0)
    data.connect(data_endpoint)
    control.connect(control_endpoint)
    t0 = time.monotonic()
    try:
        # The good stream first: the learner attaches its ring and trains before any fuzz.
        first = poll_until(lambda: (r := learner_status(control_endpoint)) and r.meta["updates"] > 0 and r, 120)
        if first is None:
            raise RuntimeError("the learner did not start training on the good stream")
        before = first.meta["dropped"]
        report.updates_before = first.meta["updates"]
        vocab_size = int(make_policy(cfg.policy).tokenizer.vocab_size)
        predictor = Predictor(limits, {good.actor.ring.name}, spec, episode_spec=expected_episode_spec(cfg),
                              vocab_size=vocab_size)
        gens = Generators(rng, spec, limits, good.actor.ring.name, decoy.name, not_a_ring.name, vocab_size)
        sample_rss()
        while report.sent < messages:
            name, channel, frames = gens.draw()
            outcome = (predictor.data if channel == "data" else predictor.control)(frames)
            if outcome is None:
                report.redrawn += 1
                continue
            deltas, reason = outcome
            (data if channel == "data" else control).send_multipart(frames, copy=False)
            report.sent += 1
            report.by_generator[name] += 1
            report.local_reasons[reason] += 1
            report.expected.update(deltas)
            if progress and report.sent % 1000 == 0:
                print(f"  sent {report.sent}/{messages}", flush=True)
            if report.sent % rss_every == 0:
                sample_rss()
            if report.sent % 500 == 0 and not alive():
                break

        def settled():
            r = learner_status(control_endpoint)
            if r is None:
                return None
            d = r.meta["dropped"]
            obs = {k: d.get(k, 0) - before.get(k, 0) for k in d if d.get(k, 0) != before.get(k, 0)}
            done = all(obs.get(k, 0) >= v for k, v in report.expected.items())
            return (r, obs) if done else None

        got = poll_until(settled, settle_timeout_s)
        time.sleep(0.5)  # then one more read, so late extra counts would show as mismatches
        last = learner_status(control_endpoint)
        # and the good stream must still train after the fuzz
        after = poll_until(lambda: (r := learner_status(control_endpoint)) and r.meta["updates"] > (
            last.meta["updates"] if last else report.updates_before) and r, 60)
        final = after or last
        sample_rss()  # after the learner has handled every message
        report.learner_alive = alive() and final is not None
        if final is not None:
            d = final.meta["dropped"]
            report.observed = {k: d.get(k, 0) - before.get(k, 0) for k in d if d.get(k, 0) != before.get(k, 0)}
            report.updates_after = final.meta["updates"] if after else report.updates_before
        elif got is not None:
            report.observed = got[1]
    finally:
        report.duration_s = time.monotonic() - t0
        good.halt.set()
        good.join(timeout=10)
        report.good_segments_sent = good.actor.stats["sent"]
        data.close()
        control.close()
        decoy.close()
        not_a_ring.close()
        not_a_ring.unlink()
    return report


def main(argv=None) -> int:
    from common.config import load_config
    ap = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--good-rate", type=float, default=20.0, help="valid segments per second beside the fuzz")
    ap.add_argument("--data-endpoint", help="fuzz a running learner (else one is spawned on ipc)")
    ap.add_argument("--control-endpoint")
    ap.add_argument("--learner-pid", type=int, help="a running learner's pid on this host, to report its RSS")
    ap.add_argument("--workdir", help="for a spawned learner (default: a temporary directory)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (a spawned learner gets them too)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    proc = None
    tmp = None
    if args.data_endpoint:
        eps = {"data": args.data_endpoint, "control": args.control_endpoint}
        overrides = list(args.overrides)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tandem_fuzz_") if not args.workdir else None
        workdir = Path(args.workdir or tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        proc, eps = spawn_learner(workdir, args.overrides)
        overrides = [*LEARNER_OVERRIDES, *[f"transport.{k}_endpoint={v}" for k, v in eps.items()], *args.overrides]
        print(f"learner pid {proc.pid}, log {workdir / 'learner.log'}", flush=True)
    cfg = load_config("config", overrides)
    try:
        report = run_fuzz(args.messages, cfg, eps["data"], eps["control"], seed=args.seed, good_rate=args.good_rate,
                          alive=(lambda: proc.poll() is None) if proc else (lambda: True), progress=True,
                          learner_pid=proc.pid if proc else args.learner_pid)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    out = report.as_dict()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
