"""The learner's ingest thread: everything sent to the learner comes in here, once.

It owns the data (PULL) and control (ROUTER) sockets and the shared-memory rings; turns segments
(ZeroMQ frames or ring notices) into validated arrays, decodes and checks real episodes, answers
peers' hellos, heartbeats, acknowledgement queries and status requests, and hands what passes to an
``IngestSink`` (the learner; ``benchmarks/fault_injection.py``'s checking stand-in). Every drop is
counted by reason; nothing a peer sends can raise out of the thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from typing import Optional, Protocol

from omegaconf import DictConfig

from common.channels import ControlServer, DataReceiver
from common.episode_msg import (MAX_REASON, Episode, EpisodeFormatError, EpisodeSpec, ack_reply, episode_id_of,
                                is_ack_request, message_to_episode)
from common.peer_meta import eval_report, sanitize_peer_meta
from common.protocol import Message
from common.ratelimited_log import RateLimitedLog
from common.segment import SegmentSpec, check_segment_values
from common.shm_ring import RING_NAME, ShmRingReader, reap_dead_rings

log = logging.getLogger("tandem.learner")
MAX_PEER_NAME = 64  # characters of a peer's self-chosen name kept in the peer table and logs
MAX_REMEMBERED_REJECTIONS = 10_000  # refused episode ids answered in ack replies (oldest forgotten)
MAX_GONE_NAMED = 5  # peers named in one "marked gone" line
NO_VOCAB_LIMIT = 2**31 - 1
STORED, DUPLICATE = "stored", "duplicate"  # IngestSink.store_episode outcomes; anything else is a drop reason


def segment_stream(msg: Message) -> Optional[tuple]:
    """(sender, env index, sequence number) of a segment message whose meta states both numbers as
    non-negative integers (``actors.rollout.SegmentStats.meta``), else None: the segment still trains,
    but cannot be joined with its neighbours into an episode."""
    meta = msg.meta if isinstance(msg.meta, dict) else {}
    env_index, seq = meta.get("env_index"), meta.get("env_seq")
    if not all(type(v) is int and 0 <= v < 2**63 for v in (env_index, seq)):
        return None
    return str(msg.sender)[:MAX_PEER_NAME], env_index, seq


class IngestSink(Protocol):
    """What the ingest thread hands data to. Called from the ingest thread."""
    session: str
    republish: threading.Event  # set when a peer asks for the weights

    @property
    def version(self) -> int: ...

    def add_segment(self, segment: dict, policy_version: int, stream: Optional[tuple] = None) -> None:
        """A segment that passed the layout and value checks; ``stream``: (sender, env index, sequence
        number) when the sender stated them as integers (``segment_stream``), else None."""

    def store_episode(self, ep: Episode) -> str:
        """STORED, DUPLICATE, or the reason it was dropped (counted under that name)."""

    def is_stored(self, episode_id: str) -> bool: ...

    def record_eval(self, report: dict) -> None:
        """An eval actor's result (``common.peer_meta.eval_report``)."""

    def status(self, peers: dict) -> dict: ...


class Ingest(threading.Thread):
    """Receives everything the learner is sent; the only user of the data and control sockets.
    Validates each message once against the expected layouts and hands what passes to ``sink``."""

    def __init__(self, cfg: DictConfig, sink: IngestSink, segment_spec: SegmentSpec, episode_spec: EpisodeSpec,
                 vocab_size: int = NO_VOCAB_LIMIT):
        """``cfg``: the ``transport`` config; ``vocab_size``: token ids must lie below it."""
        super().__init__(name="ingest", daemon=True)
        self.sink = sink
        self.segment_spec, self.episode_spec, self.vocab_size = segment_spec, episode_spec, vocab_size
        self.data = DataReceiver.from_config(cfg)
        self.control = ControlServer.from_config(cfg)
        self.rings: dict[str, ShmRingReader] = {}
        self.peers: dict[str, dict] = {}
        self.dropped = defaultdict(int)  # reason -> count, beyond the channels' own counters
        self.duplicate_episodes = 0
        self.rejected_episodes: OrderedDict[str, str] = OrderedDict()  # id -> reason, newest last
        self.stop = threading.Event()
        self.peer_timeout_s = float(cfg.peer_timeout_s)
        self.max_peers = int(cfg.max_peers)
        self._last_reap = time.time()
        self.ring_prefix = str(cfg.ring.name_prefix)
        self.drop_log = RateLimitedLog(log)

    # -- data ---------------------------------------------------------------------------------
    def on_segment(self, msg: Message):
        self.accept_segment(dict(msg.arrays), msg.policy_version, segment_stream(msg))

    def accept_segment(self, segment: dict, policy_version: int, stream: Optional[tuple] = None):
        try:
            self.segment_spec.check(segment)
        except ValueError as e:
            self.dropped["bad_segment"] += 1
            log.debug("dropping segment: %s", e)
            return
        fault = check_segment_values(segment, self.vocab_size)
        if fault is not None:
            self.dropped[f"bad_segment_value:{fault}"] += 1
            self.drop_log.warn(f"dropping segment: {fault}")
            return
        self.sink.add_segment(segment, policy_version, stream)

    def on_notice(self, msg: Message):
        meta = msg.meta
        name = meta.get("ring")
        reader = self.rings.get(name)
        if reader is None:
            if not (isinstance(name, str) and name.startswith(self.ring_prefix) and RING_NAME.fullmatch(name)):
                self.dropped["bad_ring"] += 1
                return
            try:
                spec = SegmentSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
                if spec != self.segment_spec:
                    raise ValueError(f"ring layout {spec} is not the learner's {self.segment_spec}")
                reader = ShmRingReader.attach(name, spec.arrays(), meta.get("num_slots"))
            except (KeyError, TypeError, ValueError, OSError) as e:
                self.dropped["bad_ring"] += 1
                self.drop_log.warn(f"dropping notice for ring {str(name)[:80]!r} from "
                                   f"{str(msg.sender)[:MAX_PEER_NAME]!r}: {e}", key="bad_ring")
                return
            self.rings[name] = reader
        segment = reader.take(meta)  # the one copy out of shared memory; then the slot is free
        if segment is None:  # not READY with this seq (writer died mid-write, stale notice) or torn
            self.dropped["slot_not_ready"] += 1
            return
        self.accept_segment(segment, msg.policy_version, segment_stream(msg))

    def on_episode(self, msg: Message):
        try:
            ep = message_to_episode(msg, self.episode_spec)
        except EpisodeFormatError as e:
            self.dropped[f"bad_episode:{e.reason}"] += 1
            episode_id = episode_id_of(msg)
            if episode_id is not None:  # the sender learns it from its next ack query, and quarantines it
                self.rejected_episodes[episode_id] = f"{e.reason}: {e}"[:MAX_REASON]
                while len(self.rejected_episodes) > MAX_REMEMBERED_REJECTIONS:
                    self.rejected_episodes.popitem(last=False)
            self.drop_log.warn(f"dropping episode {episode_id!r} from {str(msg.sender)[:MAX_PEER_NAME]!r}: {e}",
                               key="bad_episode")
            return
        outcome = self.sink.store_episode(ep)
        if outcome == DUPLICATE:
            self.duplicate_episodes += 1
        elif outcome != STORED:
            self.dropped[outcome] += 1

    # -- control ------------------------------------------------------------------------------
    def on_control(self, peer: bytes, msg: Message):
        name = msg.sender or peer.decode(errors="replace")
        if is_ack_request(msg):
            self.control.reply(peer, ack_reply(msg, self.sink.is_stored,
                                               rejected=self.rejected_episodes), in_reply_to=msg)
            return
        if msg.kind in ("hello", "heartbeat", "bye"):
            name = name[:MAX_PEER_NAME]
            meta, rejected = sanitize_peer_meta(msg.meta)
            for reason in rejected:
                self.dropped[f"control_field:{reason}"] += 1
            if rejected:
                self.drop_log.warn(f"control fields from {name!r} dropped: {', '.join(sorted(set(rejected)))}",
                                   key="control_field")
            if name not in self.peers and len(self.peers) >= self.max_peers:
                self.peers.pop(min(self.peers, key=lambda n: self.peers[n]["last_seen"]))
            info = self.peers.setdefault(name, {"registered_mode": meta.get("mode", "train")})
            if "mode" in meta and meta["mode"] != info["registered_mode"]:  # a peer keeps the role it registered with
                self.dropped["control_field:mode_change"] += 1
                meta.pop("mode")
            info.update(meta, last_seen=time.time(), policy_version=msg.policy_version)
            if msg.kind == "bye" or meta.get("bye"):
                self.peers.pop(name, None)
            if meta.get("want_weights"):
                self.sink.republish.set()
            if "eval_success" in meta:
                try:
                    self.sink.record_eval(eval_report(meta, info["registered_mode"]))
                except ValueError as e:
                    self.dropped["control_eval_result"] += 1
                    self.drop_log.warn(f"eval result from {name!r} ignored: {e}", key="control_eval_result")
        reply = Message(kind="status", sender="learner", policy_version=self.sink.version,
                        meta=self.sink.status(self.peers) if msg.kind == "status_request" else
                        {"session": self.sink.session})
        self.control.reply(peer, reply, in_reply_to=msg)

    def reap(self):
        now = time.time()
        gone = [n for n, p in self.peers.items() if now - p["last_seen"] > self.peer_timeout_s]
        for name in gone:
            self.peers.pop(name)
        if gone:  # one line per reap, rate-limited: a flood of one-off hellos must not fill the log
            more = f" and {len(gone) - MAX_GONE_NAMED} more" if len(gone) > MAX_GONE_NAMED else ""
            self.drop_log.warn(f"peers silent for over {self.peer_timeout_s:.0f}s, marked gone: "
                               f"{', '.join(map(repr, gone[:MAX_GONE_NAMED]))}{more}", key="peer_gone")
        for name in [n for n, r in self.rings.items() if not r.owner_alive()]:
            log.warning("ring %s: its writer died; unlinking it", name)
            reader = self.rings.pop(name)
            reader.unlink()
            reader.close()
        reap_dead_rings(self.ring_prefix)  # also rings of writers that died before any notice

    def run(self):
        handlers = {"segment": self.on_segment, "segment_notice": self.on_notice, "episode": self.on_episode}
        while not self.stop.is_set():
            try:
                for _ in range(64):  # serve control between bursts of data
                    msg = self.data.recv(timeout_ms=5)
                    if msg is None:
                        break
                    handler = handlers.get(msg.kind)
                    if handler is None:
                        self.dropped[f"unexpected_kind:{msg.kind}"] += 1
                    else:
                        handler(msg)
                while (req := self.control.poll(timeout_ms=0)) is not None:
                    self.on_control(*req)
                if time.time() - self._last_reap > 1.0:
                    self.reap()
                    self._last_reap = time.time()
            except Exception as e:  # the learner must outlive any one bad input
                self.dropped[f"ingest_error:{type(e).__name__}"] += 1
                if self.drop_log.warn(f"ingest error (message dropped): {type(e).__name__}: {e}", key="ingest_error"):
                    log.debug("ingest error traceback", exc_info=True)
        self.data.close()
        self.control.close()
        for r in self.rings.values():
            r.close()

    def dropped_total(self) -> dict:
        d = dict(self.dropped)
        d["protocol_data"] = self.data.drops.total
        d["protocol_control"] = self.control.drops.total
        d.update({f"protocol_data/{r}": n for r, n in self.data.drops.counts.items()})
        d.update({f"protocol_control/{r}": n for r, n in self.control.drops.counts.items()})
        d["ring"] = sum(r.drops.total for r in self.rings.values())
        return d
