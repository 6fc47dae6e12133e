"""Fault injection: SIGKILL actors, the collector and the learner at random moments, restart them,
and check that no batch ever holds a corrupted segment and that no real episode is lost or
stored twice; report how long each kind of recovery takes.

Processes (all on this host, ipc endpoints, real rings):
- learner: the real ingest of learner/main.py (``Ingest``: data and control sockets, ring
  attach/take/reap, episode decode, episode_ack) and the real ``Batcher``, under a checking
  stand-in for the training step (``--role learner``): every segment is verified on arrival and
  again inside every batch (tools/synthetic.py tags and CRCs), and every episode is stored the way
  Learner.store_episode does it (store durably, then remember its id), into an append-only log;
- actors: synthetic actors (tools/synthetic.py), half through rings, half inline;
- collector (``--role collector``): episodes through realrobot/outbox.py (disk first, push,
  episode_ack), the collector's real path, with contents derived from the episode id.

    python -m benchmarks.fault_injection --cycles 20 --actors 4 --json runs/faults.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from common.channels import ControlClient
from common.protocol import Message
from tools.synthetic import DEFAULT_IMAGE_SIZE, poll_until, spec_from_config

log = logging.getLogger("tandem.faults")

CONFIG_OVERRIDES = ["policy=tiny", "actor.rollout_steps=2", f"env.image_size={DEFAULT_IMAGE_SIZE}", "transport.heartbeat_interval_s=0.3",
                    "transport.peer_timeout_s=3", "transport.request_timeout_ms=500",
                    "transport.reconnect_ivl_ms=50", "transport.reconnect_ivl_max_ms=200"]
EPISODE_FRAMES = 3
EPISODE_IMAGE = DEFAULT_IMAGE_SIZE  # the learner refuses episodes of another size than its camera's
STATUS_TIMEOUT_MS = 500
# dtypes the Batcher changed on the way to the batch (learner/batcher.py FLOAT_KEYS, LONG_KEYS)
WIRE_DTYPES = {"done": np.uint8, "success": np.uint8, "tokens": np.int32}


def endpoints(work: Path) -> list[str]:
    return [f"transport.{k}_endpoint=ipc://{work}/sockets/{k}.ipc" for k in ("data", "weights", "control")]  # sockets/: made 0700


def load_cfg(work: Path, extra=()):
    from common.config import load_config
    return load_config("config", [*CONFIG_OVERRIDES, *endpoints(work), *extra])


def episode_arrays(episode_id: str) -> dict[str, np.ndarray]:
    """An episode's contents derived from its id, so the learner can check it arrived whole."""
    rng = np.random.default_rng(zlib.crc32(episode_id.encode()))
    from common.episode_msg import ACTION_KEY, IMAGE_KEY, STATE_KEY
    return {IMAGE_KEY: rng.integers(0, 256, (EPISODE_FRAMES, EPISODE_IMAGE, EPISODE_IMAGE, 3), dtype=np.uint8),
            STATE_KEY: rng.standard_normal((EPISODE_FRAMES, 8), dtype=np.float32),
            ACTION_KEY: rng.standard_normal((EPISODE_FRAMES, 7), dtype=np.float32)}


class Journal:
    """Append-only, fsynced lines: what must survive a SIGKILL of the process that writes them."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def write(self, **record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by SIGKILL before its newline was never a commit
    return out


# ----------------------------------------------------------------------------------------------
# learner role: real Ingest + Batcher, checking stand-in for training


class CheckingLearner:
    """An ``IngestSink`` (learner/ingest.py) with the real Ingest and Batcher, plus checks on every
    segment and batch."""

    def __init__(self, cfg, work: Path, update_delay_s: float, batch_size: int, store_delay_s: float = 0.0):
        from common.channels import WeightPublisher
        from learner.batcher import Batcher
        from common.episode_msg import expected_episode_spec
        from learner.ingest import Ingest
        self.cfg = cfg
        self.session = uuid.uuid4().hex[:8]
        self.version = 0
        self.updates = 0
        self.update_delay_s = update_delay_s
        self.store_delay_s = store_delay_s  # stands for the time a real dataset write takes
        self.batcher = Batcher(batch_size, int(cfg.learner.max_policy_lag), int(cfg.learner.max_queued_segments))
        self.batch_lock = threading.Lock()
        self.events = Journal(work / "events.jsonl")     # corrupt segments, duplicates
        self.stores = Journal(work / "stores.jsonl")     # one line per episode stored
        self.ids_file = work / "stored_episode_ids.json"
        self.stored_episode_ids: set[str] = set(json.loads(self.ids_file.read_text())) if self.ids_file.exists() else set()
        self.trained = Counter()  # actor -> segments trained this session
        self.seen: set[tuple[int, int]] = set()
        self.republish = threading.Event()
        self.stop = threading.Event()
        self.publisher = WeightPublisher.from_config(cfg.transport)
        # the layouts the real learner checks segments, notices and real episodes against
        self.ingest = Ingest(cfg.transport, self, spec_from_config(cfg), expected_episode_spec(cfg))

    # -- IngestSink ------------------------------------------------------------------------
    def add_segment(self, segment: dict, policy_version: int, stream=None):
        from tools.synthetic import CorruptSegment, verify_segment
        try:
            verify_segment(segment)
        except CorruptSegment as e:
            self.events.write(type="corrupt_on_arrival", session=self.session, detail=str(e))
        with self.batch_lock:
            self.batcher.add(segment, policy_version, self.version)

    def store_episode(self, ep) -> str:
        from learner.episode_store import write_json
        from learner.ingest import DUPLICATE, STORED
        if ep.episode_id in self.stored_episode_ids:
            self.events.write(type="resend_ignored", session=self.session, episode_id=ep.episode_id)
            return DUPLICATE
        time.sleep(self.store_delay_s)
        want = episode_arrays(ep.episode_id)
        got = {"observation.image": ep.images, "observation.state": ep.states, "action": ep.actions}
        intact = all(np.array_equal(want[k], got[k]) for k in want)
        # as Learner.store_episode: durable store first, then the id (the ack says "stored")
        self.stores.write(episode_id=ep.episode_id, session=self.session, intact=bool(intact))
        self.stored_episode_ids.add(ep.episode_id)
        write_json(self.ids_file, sorted(self.stored_episode_ids))
        return STORED

    def is_stored(self, episode_id: str) -> bool:
        return episode_id in self.stored_episode_ids

    def record_eval(self, meta):
        pass

    def status(self, peers: dict) -> dict:
        return {"session": self.session, "updates": self.updates, "trained": {str(k): v for k, v in self.trained.items()},
                "stored_episodes": len(self.stored_episode_ids), "dropped": self.ingest.dropped_total(),
                "actors": {n: {"policy_version": p.get("policy_version", -1)} for n, p in peers.items()}}

    # -- training stand-in ------------------------------------------------------------------
    def check_batch(self, batch) -> None:
        from tools.synthetic import CorruptSegment, verify_segment
        B = batch["reward"].shape[1]
        for b in range(B):
            seg = {k: v[:, b].numpy().astype(WIRE_DTYPES.get(k, v.numpy().dtype)) for k, v in batch.items()
                   if k != "policy_lag"}
            try:
                actor, incarnation, seq = verify_segment(seg)
            except CorruptSegment as e:
                self.events.write(type="corrupt_in_batch", session=self.session, detail=str(e))
                continue
            if (actor, incarnation, seq) in self.seen:
                self.events.write(type="duplicate_segment", session=self.session, actor=actor, seq=seq)
            self.seen.add((actor, incarnation, seq))
            self.trained[actor] += 1

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        self.ingest.start()
        weights = {"w": np.zeros(16, np.float32)}
        self.publisher.publish(self.version, weights)
        last_publish = time.monotonic()
        while not self.stop.is_set():
            if self.republish.is_set() or time.monotonic() - last_publish > 0.5:
                self.republish.clear()
                self.publisher.publish(self.version, weights)
                last_publish = time.monotonic()
            with self.batch_lock:
                batch = self.batcher.next_batch(self.version)
            if batch is None:
                time.sleep(0.005)
                continue
            self.check_batch(batch)
            self.updates += 1
            self.version += 1
            self.publisher.publish(self.version, weights)
            time.sleep(self.update_delay_s)
        self.ingest.stop.set()
        self.ingest.join(timeout=10)
        self.publisher.close()
        return 0


# ----------------------------------------------------------------------------------------------
# collector role: the real outbox push path


def run_collector(cfg, outbox_dir: Path, rate: float, resend_after_s: float) -> int:
    from common.episode_msg import ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode
    from realrobot.outbox import Outbox, OutboxConfig, PusherThread
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ocfg = OutboxConfig(dir=str(outbox_dir), resend_after_s=resend_after_s, pump_interval_s=0.2, ack_timeout_ms=500)
    box = Outbox(outbox_dir)
    pusher = PusherThread(box, cfg.transport, ocfg, identity=f"collector-{os.getpid()}").start()
    while not stop.wait(1.0 / rate):
        episode_id = uuid.uuid4().hex
        a = episode_arrays(episode_id)
        box.put(Episode(episode_id=episode_id, task="fault test", success=True, fps=10,
                        images=a[IMAGE_KEY], states=a[STATE_KEY], actions=a[ACTION_KEY]))
        pusher.wake()
    pusher.close(flush_timeout_s=ocfg.flush_timeout_s)
    return 0


# ----------------------------------------------------------------------------------------------
# orchestrator


class Cluster:
    def __init__(self, work: Path, args):
        self.work, self.args = work, args
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.control = f"ipc://{work}/sockets/control.ipc"

    def command(self, name: str) -> list[str]:
        me = [sys.executable, "-m", "benchmarks.fault_injection", "--workdir", str(self.work)]
        if name == "learner":
            return [*me, "--role", "learner", "--update-delay", str(self.args.update_delay),
                    "--store-delay", str(self.args.store_delay)]
        if name == "collector":
            return [*me, "--role", "collector", "--episode-rate", str(self.args.episode_rate),
                    "--resend-after", str(self.args.resend_after)]
        i = int(name.split("-")[1])
        inline = ["--inline"] if i % 2 else []
        return [sys.executable, "-m", "tools.synthetic", "--actor", str(i), "--rate", str(self.args.actor_rate),
                *inline, *CONFIG_OVERRIDES, *endpoints(self.work)]

    def start(self, name: str):
        log_f = open(self.work / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(self.command(name), cwd=ROOT, env=self.env, stdout=log_f,
                                            stderr=subprocess.STDOUT)

    def kill(self, name: str):
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()

    def status(self) -> dict | None:
        c = ControlClient(self.control, identity="faults")
        try:
            r = c.request(Message("status_request", sender="faults"), timeout_ms=STATUS_TIMEOUT_MS)
            return None if r is None else r.meta
        finally:
            c.close()

    def stop_all(self):
        order = [n for n in self.procs if n.startswith("actor")] + ["collector", "learner"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()




def recovered(cluster: Cluster, victim: str, baseline: dict | None):
    """Whether the system works again after ``victim`` was restarted (see module doc)."""
    s = cluster.status()
    if s is None:
        return False
    if victim == "learner":
        actors = [str(i) for i in range(cluster.args.actors)]
        return (baseline is None or s["session"] != baseline["session"]) and all(s["trained"].get(a, 0) > 0 for a in actors)
    if victim == "collector":
        return baseline is not None and s["stored_episodes"] > baseline["stored_episodes"]
    actor = victim.split("-")[1]
    return baseline is not None and s["session"] == baseline["session"] and \
        s["trained"].get(actor, 0) > baseline["trained"].get(actor, 0)


def orchestrate(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tandem_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "outbox").mkdir(exist_ok=True)
    rng = random.Random(args.seed)
    cluster = Cluster(work, args)
    names = ["learner", "collector", *[f"actor-{i}" for i in range(args.actors)]]
    recoveries: dict[str, list[float]] = {"learner": [], "collector": [], "actor": []}
    failures = []
    t0 = time.monotonic()
    try:
        for n in names:
            cluster.start(n)
        if not poll_until(lambda: recovered(cluster, "learner", None), args.recovery_timeout, 0.1):
            raise RuntimeError("the system did not start")
        # each kind of victim at least once, then at random
        kinds = ["learner", "collector", "actor"]
        rng.shuffle(kinds)
        plan = kinds + [rng.choice(["learner", "collector", "actor", "actor"]) for _ in range(max(0, args.cycles - 3))]
        for kind in plan[:args.cycles]:
            victim = kind if kind != "actor" else f"actor-{rng.randrange(args.actors)}"
            time.sleep(rng.uniform(0.0, args.max_kill_delay))  # a random moment of its work
            cluster.kill(victim)
            time.sleep(rng.uniform(0.0, args.max_restart_delay))
            baseline = cluster.status() if victim != "learner" else None
            t_restart = time.monotonic()
            cluster.start(victim)
            if poll_until(lambda: recovered(cluster, victim, baseline), args.recovery_timeout, 0.1):
                recoveries[kind].append(round(time.monotonic() - t_restart, 2))
            else:
                failures.append(f"{victim} did not recover within {args.recovery_timeout}s")
        # let the collector's outbox drain, then stop everything cleanly
        from realrobot.outbox import Outbox
        box = Outbox(work / "outbox")
        cluster.procs["collector"].send_signal(signal.SIGTERM)
        cluster.procs["collector"].wait(60)
        if not poll_until(lambda: not box.pending() and not box.unacked(), args.recovery_timeout, 0.25):
            failures.append(f"outbox not drained: {len(box.pending())} pending, {len(box.unacked())} unacked")
    finally:
        cluster.stop_all()
    return verify(work, recoveries, failures, time.monotonic() - t0, args)


def verify(work: Path, recoveries, failures, duration_s, args) -> dict:
    from realrobot.outbox import Outbox
    box = Outbox(work / "outbox")
    committed = set(box.ids())
    stores = read_journal(work / "stores.jsonl")
    events = read_journal(work / "events.jsonl")
    store_counts = Counter(s["episode_id"] for s in stores)
    duplicated = sorted(i for i, n in store_counts.items() if n > 1)
    lost = sorted(committed - set(store_counts))
    acked_not_stored = sorted(i for i in committed if box.is_acked(i) and i not in store_counts)
    damaged = sorted(s["episode_id"] for s in stores if not s["intact"])
    corrupt = [e for e in events if e["type"].startswith("corrupt")]
    dup_segments = [e for e in events if e["type"] == "duplicate_segment"]
    collector_log = work / "collector.log"
    resent = collector_log.read_text(errors="replace").count("sending it again") if collector_log.exists() else 0
    problems = list(failures)
    for what, items in (("lost episodes", lost), ("duplicated episodes", duplicated),
                        ("acknowledged but not stored", acked_not_stored), ("damaged episodes", damaged),
                        ("corrupted segments", corrupt), ("duplicated segments in a session", dup_segments)):
        if items:
            problems.append(f"{what}: {items[:5]}{' ...' if len(items) > 5 else ''} ({len(items)})")

    def stats(xs):
        return {"n": len(xs), "mean_s": round(sum(xs) / len(xs), 2), "max_s": max(xs)} if xs else {"n": 0}

    return {"ok": not problems, "problems": problems, "duration_s": round(duration_s, 1), "cycles": args.cycles,
            "episodes_committed": len(committed), "episodes_stored": len(store_counts),
            "duplicated_episodes": len(duplicated), "lost_episodes": len(lost), "corrupted_segments": len(corrupt),
            "duplicated_segments": len(dup_segments), "episodes_resent": resent,
            "resends_ignored_by_learner": sum(e["type"] == "resend_ignored" for e in events),
            "recovery": {k: stats(v) for k, v in recoveries.items()}, "recovery_times": recoveries,
            "workdir": str(work)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=("orchestrator", "learner", "collector"), default="orchestrator")
    ap.add_argument("--workdir")
    ap.add_argument("--cycles", type=int, default=20, help="SIGKILL + restart cycles")
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--actor-rate", type=float, default=10.0, help="segments per second per actor")
    ap.add_argument("--episode-rate", type=float, default=4.0, help="collector episodes per second")
    ap.add_argument("--resend-after", type=float, default=2.0, help="outbox resend_after_s")
    ap.add_argument("--update-delay", type=float, default=0.02, help="learner seconds per update")
    ap.add_argument("--store-delay", type=float, default=0.1, help="learner seconds to store an episode")
    ap.add_argument("--max-kill-delay", type=float, default=2.0, help="kill at a random moment within this")
    ap.add_argument("--max-restart-delay", type=float, default=1.0)
    ap.add_argument("--recovery-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "learner":
        work = Path(args.workdir)
        return CheckingLearner(load_cfg(work), work, args.update_delay, batch_size=2,
                               store_delay_s=args.store_delay).run()
    if args.role == "collector":
        work = Path(args.workdir)
        return run_collector(load_cfg(work), work / "outbox", args.episode_rate, args.resend_after)
    out = orchestrate(args)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
