"""Synthetic actors: valid trajectory segments through the real protocol and rings, without a
simulator, so that many of them fit on a small machine (fuzz, load and fault benchmarks).

Every segment carries a self-check: the first row of its last image holds a tag
(actor number, incarnation: random per process, sequence number, CRC-32 of everything else in
the segment). ``verify_segment`` recomputes it, so a reader can tell a whole segment from a torn,
mixed or corrupted one, and which actor process and sequence number it was.

    python -m tools.synthetic --actor 3 --rate 20 --duration 60 [key=value config overrides]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import time
import zlib
from dataclasses import asdict

import numpy as np

from common.channels import ControlClient, DataSender, WeightSubscriber
from common.protocol import Message, cfg_get
from common.segment import SegmentSpec
from common.shm_ring import ShmRingWriter

log = logging.getLogger("tandem.synthetic")

TAG_DTYPE = np.dtype([("actor", "<u4"), ("incarnation", "<u4"), ("seq", "<u8"), ("crc", "<u4")])
DEFAULT_IMAGE_SIZE = 32
# Chain and log-prob magnitudes of a plausible behaviour policy (keeps PPO ratios finite).
CHAIN_SCALE = 0.5
LOGP_VALUE = -10.0
DONE_PROBABILITY = 0.1


class CorruptSegment(ValueError):
    pass


def spec_from_config(cfg, image_size: int = DEFAULT_IMAGE_SIZE) -> SegmentSpec:
    """The segment layout an actor with ``cfg``'s policy and rollout length would send."""
    p = cfg.policy
    return SegmentSpec(steps=int(cfg.actor.rollout_steps), image_hw=(image_size, image_size),
                       token_len=int(p.token_len), state_dim=int(p.state_dim),
                       num_denoise_steps=int(p.num_denoise_steps), chunk_size=int(p.chunk_size),
                       action_dim=int(cfg_get(p, "action_dim", 7)))


def _tag_region(image: np.ndarray) -> np.ndarray:
    return image[-1, 0].reshape(-1)[:TAG_DTYPE.itemsize]


def _crc(arrays: dict[str, np.ndarray]) -> int:
    crc = 0
    for name in sorted(arrays):
        a = arrays[name]
        if name == "image":
            saved = _tag_region(a).copy()
            _tag_region(a)[:] = 0
            crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
            _tag_region(a)[:] = saved
        else:
            crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
    return crc


def fill_segment(arrays: dict[str, np.ndarray], actor: int, seq: int, incarnation: int = 0,
                 vocab: int = 258) -> None:
    """Write the deterministic segment (actor, incarnation, seq) into ``arrays`` (a ring slot or
    fresh buffers)."""
    rng = np.random.default_rng([actor, incarnation, seq])
    arrays["image"][...] = rng.integers(0, 256, arrays["image"].shape, dtype=np.uint8)
    arrays["tokens"][...] = rng.integers(0, vocab, arrays["tokens"].shape, dtype=np.int32)
    arrays["state"][...] = rng.standard_normal(arrays["state"].shape, dtype=np.float32)
    arrays["chain"][...] = CHAIN_SCALE * rng.standard_normal(arrays["chain"].shape, dtype=np.float32)
    arrays["behaviour_logp"][...] = LOGP_VALUE
    arrays["behaviour_value"][...] = rng.standard_normal(arrays["behaviour_value"].shape, dtype=np.float32)
    arrays["reward"][...] = rng.random(arrays["reward"].shape, dtype=np.float32)
    arrays["done"][...] = rng.random(arrays["done"].shape) < DONE_PROBABILITY
    arrays["success"][...] = 0
    tag = np.array([(actor, incarnation, seq, 0)], TAG_DTYPE)
    _tag_region(arrays["image"])[:] = tag.view(np.uint8)
    tag["crc"] = _crc(arrays)
    _tag_region(arrays["image"])[:] = tag.view(np.uint8)


def verify_segment(arrays: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(actor, incarnation, seq) of a whole segment; CorruptSegment when its tag or checksum
    does not match."""
    try:
        tag = _tag_region(np.asarray(arrays["image"])).copy().view(TAG_DTYPE)[0]
    except (KeyError, IndexError, ValueError) as e:
        raise CorruptSegment(f"no tag: {e}") from None
    if int(tag["crc"]) != _crc({k: np.array(v) for k, v in arrays.items()}):
        raise CorruptSegment(f"checksum mismatch (actor {int(tag['actor'])}, seq {int(tag['seq'])})")
    return int(tag["actor"]), int(tag["incarnation"]), int(tag["seq"])


class SyntheticActor:
    """Sends segments at ``rate`` per second: through a ring + notice (``use_shm``) or inline."""

    def __init__(self, cfg, actor: int, spec: SegmentSpec, use_shm: bool = True, follow_weights: bool = True,
                 heartbeat: bool = True):
        self.actor, self.spec, self.id = actor, spec, f"synthetic-{actor}"
        t = cfg.transport
        self.sender = DataSender.from_config(t)
        self.weights = WeightSubscriber.from_config(t) if follow_weights else None
        self.control = ControlClient.from_config(t, identity=self.id) if heartbeat else None
        self.heartbeat_interval_s = float(t.heartbeat_interval_s)
        self.ring = ShmRingWriter.from_config(t, spec.arrays()) if use_shm else None
        self.ring_meta = {"spec": asdict(spec), "num_slots": self.ring.num_slots} if self.ring else {}
        self.version = 0
        self.seq = 0
        self.incarnation = int.from_bytes(os.urandom(4), "little")  # tells restarts of one actor apart
        self.stats = dict(sent=0, ring_full=0, send_failures=0)
        self.session = None
        self._last_hb = 0.0

    def _follow(self):
        if self.weights is not None and (msg := self.weights.poll_latest(timeout_ms=0)) is not None:
            self.version = msg.policy_version
        now = time.monotonic()
        if self.control is not None and now - self._last_hb > self.heartbeat_interval_s:
            self._last_hb = now
            reply = self.control.request(Message("heartbeat", sender=self.id, policy_version=self.version,
                                                 meta={"pid": os.getpid(), **self.stats}))
            if reply is not None:
                session = reply.meta.get("session")
                if self.session is not None and session != self.session and self.ring is not None:
                    self.ring.reclaim_unread()  # the restarted learner never saw those notices
                self.session = session

    def send_one(self) -> bool:
        self._follow()
        self.seq += 1
        if self.ring is not None:
            slot = self.ring.acquire()
            if slot is None:
                self.stats["ring_full"] += 1
                return False
            fill_segment(slot, self.actor, self.seq, self.incarnation)
            notice = self.ring.commit(slot, self.version)
            msg = Message("segment_notice", sender=self.id, policy_version=self.version,
                          meta=dict(notice, **self.ring_meta))
        else:
            arrays = self.spec.empty()
            fill_segment(arrays, self.actor, self.seq, self.incarnation)
            msg = Message("segment", sender=self.id, policy_version=self.version, arrays=arrays)
        ok = self.sender.send(msg)
        self.stats["sent" if ok else "send_failures"] += 1
        return ok

    def run(self, rate: float, duration_s: float, stop=lambda: False) -> dict:
        period = 1.0 / rate if rate > 0 else 0.0
        t0 = time.monotonic()
        next_t = t0
        while not stop() and (duration_s <= 0 or time.monotonic() - t0 < duration_s):
            self.send_one()
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
        return self.stats

    def close(self):
        for c in (self.sender, self.weights, self.control, self.ring):
            if c is not None:
                c.close()


def main(argv=None) -> int:
    from common.config import load_config
    ap = argparse.ArgumentParser(prog="python -m tools.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--actor", type=int, required=True, help="actor number (in every segment's tag)")
    ap.add_argument("--rate", type=float, default=10.0, help="segments per second (0: as fast as possible)")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds (0: until SIGTERM)")
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument("--inline", action="store_true", help="segments as ZeroMQ frames, not through a ring")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of configs/config.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config("config", args.overrides)
    actor = SyntheticActor(cfg, args.actor, spec_from_config(cfg, args.image_size), use_shm=not args.inline)
    # Installed after the ring exists, so it replaces shm_ring's SIGTERM handler (which would
    # unmap the ring under the running loop); close() and atexit still unlink the ring.
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        stats = actor.run(args.rate, args.duration, stop=lambda: bool(stopping))
    finally:
        actor.close()
    print(f"synthetic-{args.actor}: {stats}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def poll_until(pred, timeout_s: float, poll_s: float = 0.25):
    """``pred()``'s first truthy value within ``timeout_s``, else None (benchmarks and fuzzing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    return None
