"""Disk-first spooling of recorded episodes to the learner: none lost, none sent twice.

Every saved episode is first written to the outbox directory (one ``<id>.npz`` with its arrays,
then ``<id>.json`` with its meta: the json's atomic rename commits the entry). A pusher then
sends it to the learner's real replay and waits for the learner's acknowledgement
(common/episode_msg.py describes the exchange):

    pending --send--> sent (<id>.sent marker) --learner says stored--> acked (<id>.acked)

- Nothing is sent while the learner does not answer the ack query, so episodes wait on disk,
  not in ZeroMQ queues, and survive a collector restart.
- Before sending, the pusher asks about pending episodes too: one that was sent just before a
  crash (and so lacks its marker) is acknowledged instead of sent again.
- A sent episode is sent again only when the learner, answering, still does not hold it
  ``resend_after_s`` after the last send (the learner died before storing it); the learner
  de-duplicates on ``episode_id`` in any case.
- An entry that cannot be read, that exceeds the learner's receive limits (it would be dropped
  there and resent forever), or that the learner refused (its ack reply names it under "rejected",
  with the reason: non-finite values, another image size or fps, ...) is moved to ``quarantine/``
  beside the outbox with a ``<id>.reason.txt``, and an error in the log: kept, never resent.
- With ``require_ack: false`` (a learner without episode_ack) an episode counts as done once
  ZeroMQ has queued it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from common.episode_msg import (ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode, EpisodeFormatError, ack_request,
                                episode_to_message, parse_ack_rejections, parse_ack_reply)
from common.protocol import Limits
from realrobot.device_config import DeviceConfig

log = logging.getLogger(__name__)
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # becomes a file name
QUARANTINE = "quarantine"  # beside the outbox's entries: episodes kept but never (re)sent


@dataclass
class OutboxConfig(DeviceConfig):
    dir: str = "runs/outbox"
    require_ack: bool = True
    resend_after_s: float = 60.0
    pump_interval_s: float = 1.0  # how often the pusher thread looks for work and asks for acks
    ack_timeout_ms: int = 1000
    max_ids_per_query: int = 256  # keeps the ack request far below the header size limit
    max_sends_per_pump: int = 4
    delete_acked_arrays: bool = True  # the LeRobot dataset keeps the frames; the outbox only spools
    flush_timeout_s: float = 10.0  # at exit, how long to keep pushing before leaving the rest on disk


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Outbox:
    """Per-episode files plus sent/acked markers in one directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):  # a write cut short by a crash never committed
            tmp.unlink(missing_ok=True)  # gone already: another process's write just committed it

    def _path(self, episode_id: str, suffix: str) -> Path:
        return self.dir / f"{episode_id}{suffix}"

    def put(self, ep: Episode) -> str:
        """Commit ``ep`` to disk; one the learner would refuse (non-finite values, a bad layout) is
        kept too, in ``quarantine/`` with its reason, and never sent."""
        if not (isinstance(ep.episode_id, str) and SAFE_ID.fullmatch(ep.episode_id)):
            raise ValueError(f"episode_id {ep.episode_id!r:.80} must be 1-64 letters, digits, '_' or '-'")
        arrays = {IMAGE_KEY: ep.images, STATE_KEY: ep.states, ACTION_KEY: ep.actions}
        _write_atomic(self._path(ep.episode_id, ".npz"), lambda f: np.savez(f, **arrays))
        meta = {"episode_id": ep.episode_id, "task": ep.task, "success": bool(ep.success), "fps": ep.fps,
                "source": ep.source, "policy_version": ep.policy_version, "extra": ep.extra,
                "created_at": time.time()}
        _write_atomic(self._path(ep.episode_id, ".json"), lambda f: f.write(json.dumps(meta)), "w")
        fd = os.open(self.dir, os.O_RDONLY)  # make the renames themselves durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            ep.validate()
        except EpisodeFormatError as e:
            where = self.quarantine(ep.episode_id, f"{e.reason}: {e}")
            log.error("outbox: episode %s would be refused by the learner (%s); kept in %s, not sent",
                      ep.episode_id, e, where)
        return ep.episode_id

    def load(self, episode_id: str) -> Episode:
        meta = json.loads(self._path(episode_id, ".json").read_text())
        with np.load(self._path(episode_id, ".npz")) as z:
            arrays = {k: z[k] for k in z.files}
        return Episode(episode_id=meta["episode_id"], task=meta["task"], success=meta["success"],
                       fps=meta["fps"], images=arrays[IMAGE_KEY], states=arrays[STATE_KEY],
                       actions=arrays[ACTION_KEY], source=meta["source"],
                       policy_version=meta["policy_version"], extra=meta.get("extra") or {})

    def ids(self) -> list[str]:
        """Committed episodes, oldest first."""
        entries = [(p.stat().st_mtime, p.stem) for p in self.dir.glob("*.json")]
        return [stem for _, stem in sorted(entries)]

    def is_sent(self, episode_id: str) -> bool:
        return self._path(episode_id, ".sent").exists()

    def is_acked(self, episode_id: str) -> bool:
        return self._path(episode_id, ".acked").exists()

    def sent_at(self, episode_id: str) -> float:
        return json.loads(self._path(episode_id, ".sent").read_text())["sent_at"]

    def pending(self) -> list[str]:
        return [i for i in self.ids() if not self.is_sent(i) and not self.is_acked(i)]

    def unacked(self) -> list[str]:
        return [i for i in self.ids() if self.is_sent(i) and not self.is_acked(i)]

    def mark_sent(self, episode_id: str) -> None:
        path = self._path(episode_id, ".sent")
        attempts = json.loads(path.read_text())["attempts"] + 1 if path.exists() else 1
        _write_atomic(path, lambda f: f.write(json.dumps({"sent_at": time.time(), "attempts": attempts})), "w")

    def quarantine(self, episode_id: str, reason: str) -> Path:
        """Move an entry aside (``quarantine/``, with its reason) so that it does not block the others."""
        folder = self.dir / QUARANTINE
        folder.mkdir(exist_ok=True)
        for path in self.dir.glob(f"{episode_id}.*"):
            os.replace(path, folder / path.name)
        _write_atomic(folder / f"{episode_id}.reason.txt", lambda f: f.write(reason + "\n"), "w")
        return folder

    def mark_acked(self, episode_id: str, delete_arrays: bool = False) -> None:
        _write_atomic(self._path(episode_id, ".acked"), lambda f: f.write(json.dumps({"acked_at": time.time()})), "w")
        if delete_arrays:
            self._path(episode_id, ".npz").unlink(missing_ok=True)


@dataclass
class PumpResult:
    reachable: bool = False
    acked: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    resent: list = field(default_factory=list)


class EpisodePusher:
    """One pump of the outbox per call; owns its sockets (use it from one thread)."""

    def __init__(self, outbox: Outbox, sender, control, config: OutboxConfig, identity: str,
                 limits: Optional[Limits] = None):
        self.outbox, self.sender, self.control = outbox, sender, control
        self.config, self.identity = config, identity
        self.limits = limits or Limits()  # the learner's receive limits: larger episodes never arrive
        self.counts = {"sent": 0, "resent": 0, "acked": 0, "send_failures": 0, "rejected": 0}
        self._warned_no_ack = False

    @classmethod
    def from_transport(cls, outbox: Outbox, transport_cfg: Any, config: OutboxConfig, identity: str):
        from common.channels import ControlClient, DataSender
        return cls(outbox, DataSender.from_config(transport_cfg, name=f"{identity}-data"),
                   ControlClient.from_config(transport_cfg, identity), config, identity,
                   Limits.from_config(transport_cfg))

    def close(self) -> None:
        self.sender.close()
        self.control.close()

    def _query_stored(self, ids: list[str]) -> Optional[tuple[set[str], set[str]]]:
        """(the subset of ``ids`` the learner holds, the subset it refused, which are quarantined on
        the way); None when it did not answer."""
        stored: set[str] = set()
        refused: set[str] = set()
        step = self.config.max_ids_per_query
        for i in range(0, max(len(ids), 1), step):
            reply = self.control.request(ack_request(ids[i:i + step], sender=self.identity),
                                         timeout_ms=self.config.ack_timeout_ms)
            if reply is None:
                return None
            got = parse_ack_reply(reply)
            if got is None:
                if not self._warned_no_ack:
                    log.warning("the learner answered the episode_ack query without 'stored': it does "
                                "not acknowledge episodes; sent ones stay unacknowledged in %s "
                                "(set outbox.require_ack=false to not wait for acks)", self.outbox.dir)
                    self._warned_no_ack = True
                return stored, refused
            stored |= got
            for episode_id, reason in parse_ack_rejections(reply).items():
                if episode_id in ids[i:i + step] and episode_id not in got:
                    where = self.outbox.quarantine(episode_id, f"refused by the learner: {reason}")
                    refused.add(episode_id)
                    log.error("outbox: the learner refused episode %s (%s); moved to %s, not resent",
                              episode_id, reason, where)
        self.counts["rejected"] += len(refused)
        return stored, refused

    def _send(self, episode_id: str) -> bool:
        try:
            ep = self.outbox.load(episode_id)
        except Exception as e:  # a damaged file must not hold up the episodes behind it
            where = self.outbox.quarantine(episode_id, f"unreadable: {type(e).__name__}: {e}")
            log.error("outbox: episode %s is unreadable (%s: %s); moved to %s", episode_id,
                      type(e).__name__, e, where)
            return False
        msg = episode_to_message(ep, sender=self.identity)
        largest = max(a.nbytes for a in msg.arrays.values())
        if largest > self.limits.max_array_bytes or msg.nbytes() > self.limits.max_message_bytes:
            where = self.outbox.quarantine(episode_id, f"exceeds the learner's receive limits ({msg.nbytes()} bytes)")
            log.error("outbox: episode %s (%d frames, %d bytes) exceeds the learner's receive limits "
                      "(transport.limits: max_array_bytes %d, max_message_bytes %d); moved to %s",
                      episode_id, ep.num_frames, msg.nbytes(), self.limits.max_array_bytes,
                      self.limits.max_message_bytes, where)
            return False
        if not self.sender.send(msg):
            self.counts["send_failures"] += 1
            log.warning("outbox: the data queue stayed full; episode %s waits for the next pump", episode_id)
            return False
        self.outbox.mark_sent(episode_id)
        return True

    def pump(self) -> PumpResult:
        c, box, result = self.config, self.outbox, PumpResult()
        pending, unacked = box.pending(), box.unacked()
        if not c.require_ack:
            result.reachable = True
            for episode_id in pending[:c.max_sends_per_pump]:
                if self._send(episode_id):
                    box.mark_acked(episode_id, c.delete_acked_arrays)
                    result.sent.append(episode_id)
            self.counts["sent"] += len(result.sent)
            return result
        if not pending and not unacked:
            return result
        answer = self._query_stored(unacked + pending)
        if answer is None:
            return result  # learner away: everything waits on disk
        stored, refused = answer  # the refused ones are in quarantine now
        result.reachable = True
        pending, unacked = [i for i in pending if i not in refused], [i for i in unacked if i not in refused]
        for episode_id in unacked + pending:
            if episode_id in stored:
                box.mark_acked(episode_id, c.delete_acked_arrays)
                result.acked.append(episode_id)
        now = time.time()
        budget = c.max_sends_per_pump
        for episode_id in unacked:
            if budget and episode_id not in stored and now - box.sent_at(episode_id) > c.resend_after_s:
                log.warning("outbox: episode %s unacknowledged %.0f s after sending: sending it again",
                            episode_id, now - box.sent_at(episode_id))
                if self._send(episode_id):
                    result.resent.append(episode_id)
                    budget -= 1
        for episode_id in pending:
            if budget and episode_id not in stored and self._send(episode_id):
                result.sent.append(episode_id)
                budget -= 1
        self.counts["sent"] += len(result.sent)
        self.counts["resent"] += len(result.resent)
        self.counts["acked"] += len(result.acked)
        if result.sent or result.acked or result.resent:
            log.info("outbox: sent %d, re-sent %d, acknowledged %d; %d waiting", len(result.sent),
                     len(result.resent), len(result.acked), len(box.pending()) + len(box.unacked()))
        return result

    def outstanding(self) -> int:
        return len(self.outbox.pending()) + (len(self.outbox.unacked()) if self.config.require_ack else 0)


class PusherThread:
    """Runs an EpisodePusher in a background thread (its sockets are made in that thread)."""

    def __init__(self, outbox: Outbox, transport_cfg: Any, config: OutboxConfig, identity: str,
                 make_pusher: Optional[Callable[[], EpisodePusher]] = None):
        self.outbox, self.config = outbox, config
        self._make = make_pusher or (lambda: EpisodePusher.from_transport(outbox, transport_cfg, config, identity))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_deadline: Optional[float] = None
        self.counts: dict = {}
        self._thread = threading.Thread(target=self._run, name="outbox-pusher", daemon=True)

    def start(self) -> "PusherThread":
        self._thread.start()
        return self

    def wake(self) -> None:
        """A new episode is in the outbox: pump now instead of at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        pusher = self._make()
        try:
            while True:
                try:
                    pusher.pump()
                except Exception:
                    log.exception("outbox: pump failed; retrying in %.1f s", self.config.pump_interval_s)
                self.counts = dict(pusher.counts)
                if self._stop.is_set():
                    if pusher.outstanding() == 0 or time.monotonic() > self._flush_deadline:
                        break
                self._wake.wait(self.config.pump_interval_s)
                self._wake.clear()
        finally:
            left = pusher.outstanding()
            if left:
                log.warning("outbox: %d episode(s) not yet acknowledged stay in %s and go out on the "
                            "next run", left, self.outbox.dir)
            pusher.close()

    def close(self, flush_timeout_s: Optional[float] = None) -> None:
        """Keep pushing up to ``flush_timeout_s`` (config default) until all is acknowledged, then stop."""
        timeout = self.config.flush_timeout_s if flush_timeout_s is None else flush_timeout_s
        self._flush_deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        self._thread.join()
