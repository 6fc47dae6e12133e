"""Load: many synthetic actors against one slow learner; memory, lag and liveness over time.

Starts the real learner (learner.main, tiny policy on the CPU: slow by construction next to the
actors' offered load) and ``--actors`` synthetic actor processes (tools/synthetic.py: real
protocol, real rings, no simulator), samples the learner's RSS and status every
``--sample-interval`` seconds for ``--duration`` seconds, and checks:

- memory stays bounded: the learner's RSS grows less than ``--max-rss-growth-mib`` over the
  second half of the run (the batcher's queue bound drops the oldest, counted as ``overflow``;
  full rings make actors wait or drop, counted per actor as ``ring_full``; full ZeroMQ queues
  make inline senders time out, counted as ``send_failures``),
- lag stays bounded: no batch trains on a segment older than ``learner.max_policy_lag``,
- no deadlock: the update count advances in every ``--stall-window`` and status always answers.

    python -m benchmarks.bench_load --actors 16 --duration 180 --json runs/bench_load.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from common.channels import ControlClient
from common.procinfo import rss_mib
from common.protocol import Message
from common.shm_ring import list_rings
from tools.synthetic import DEFAULT_IMAGE_SIZE

LEARNER_OVERRIDES = ["policy=tiny", "device=cpu", "actor.rollout_steps=2", f"env.image_size={DEFAULT_IMAGE_SIZE}", "learner.global_batch_size=2",
                     "learner.micro_batch_size=2", "learner.checkpoint_interval=1000000",
                     "learner.log_interval=100", "transport.heartbeat_interval_s=1.0"]
STATUS_TIMEOUT_MS = 3000


def status(control: str) -> dict | None:
    c = ControlClient(control, identity="bench-load")
    try:
        r = c.request(Message("status_request", sender="bench-load"), timeout_ms=STATUS_TIMEOUT_MS)
        return None if r is None else {**r.meta, "version": r.policy_version}
    finally:
        c.close()


def run(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tandem_load_"))
    work.mkdir(parents=True, exist_ok=True)
    eps = {k: f"ipc://{work}/sockets/{k}.ipc" for k in ("data", "weights", "control")}  # sockets/: made 0700
    common = [*LEARNER_OVERRIDES, *[f"transport.{k}_endpoint={v}" for k, v in eps.items()],
              f"learner.max_queued_segments={args.max_queued}", f"transport.ring.num_slots={args.ring_slots}",
              f"transport.ring.full_policy={args.full_policy}", *args.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    procs: dict[str, subprocess.Popen] = {}
    rings_before = set(list_rings())

    def start(name, cmd):
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(work / f"{name}.log", "ab"),
                                       stderr=subprocess.STDOUT)

    start("learner", [sys.executable, "-m", "learner.main", f"run_dir={work}/run", *common])
    inline = set(range(int(round(args.actors * args.inline_fraction))))
    for i in range(args.actors):
        start(f"actor-{i}", [sys.executable, "-m", "tools.synthetic", "--actor", str(i), "--rate", str(args.rate),
                             *(["--inline"] if i in inline else []), *common])
    samples, problems = [], []
    try:
        # the clock starts once the learner answers: 17 processes starting on a small machine take a while
        t_start = time.monotonic()
        while status(eps["control"]) is None:
            if procs["learner"].poll() is not None or time.monotonic() - t_start > args.startup_timeout:
                raise RuntimeError(f"the learner did not come up; see {work / 'learner.log'}")
        t0 = time.monotonic()
        deadline = t0 + args.duration
        last_updates, last_progress = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(args.sample_interval)
            now = time.monotonic() - t0
            s = status(eps["control"])
            if procs["learner"].poll() is not None:
                problems.append(f"learner exited with {procs['learner'].returncode} at {now:.0f}s")
                break
            if s is None:
                problems.append(f"status timed out at {now:.0f}s")
                continue
            actors = s.get("actors", {})
            actor_lag = [s["version"] - a.get("policy_version", s["version"]) for a in actors.values()]
            sample = {"t": round(now, 1), "learner_rss_mib": round(rss_mib(procs["learner"].pid), 1),
                      "actors_rss_mib": round(sum(rss_mib(p.pid) for n, p in procs.items() if n != "learner"), 1),
                      "updates": s["updates"], "version": s["version"], "queue_depth": s["queue_depth"],
                      "lag_mean": s["lag_mean"], "lag_max": s["lag_max"],
                      "actor_version_lag_max": max(actor_lag, default=0), "actors_seen": len(actors),
                      "dropped": s["dropped"],
                      "actor_ring_full": sum(a.get("ring_full", 0) for a in actors.values()),
                      "actor_send_failures": sum(a.get("send_failures", 0) for a in actors.values()),
                      "actor_sent": sum(a.get("sent", 0) for a in actors.values()),
                      "rings": len(set(list_rings()) - rings_before)}
            samples.append(sample)
            if s["updates"] != last_updates:
                last_updates, last_progress = s["updates"], time.monotonic()
            elif time.monotonic() - last_progress > args.stall_window:
                problems.append(f"no update for {args.stall_window}s at {now:.0f}s (deadlock?)")
            if args.verbose:
                print(json.dumps({k: v for k, v in sample.items() if k != "dropped"}), flush=True)
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        exit_codes = {}
        for name, p in procs.items():
            try:
                exit_codes[name] = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                exit_codes[name] = "killed"
    # rings of this run's actors ("<prefix><pid>_<token>") still there after every process exited
    pids = {str(p.pid) for n, p in procs.items() if n != "learner"}
    leftover = sorted(r for r in set(list_rings()) - rings_before if r.split("_")[1] in pids)
    return summarize(args, samples, problems, exit_codes, work, leftover)


def summarize(args, samples, problems, exit_codes, work, leftover_rings) -> dict:
    if not samples:
        return {"ok": False, "problems": problems or ["no samples"]}
    half = [s for s in samples if s["t"] >= args.duration / 2] or samples
    rss = [s["learner_rss_mib"] for s in samples]
    growth = max(s["learner_rss_mib"] for s in half) - half[0]["learner_rss_mib"]
    last = samples[-1]
    lag_max = max(s["lag_max"] for s in samples)
    if growth > args.max_rss_growth_mib:
        problems.append(f"learner RSS grew {growth:.1f} MiB over the second half (limit {args.max_rss_growth_mib})")
    if lag_max > args.max_policy_lag:
        problems.append(f"trained on lag {lag_max} > max_policy_lag {args.max_policy_lag}")
    if leftover_rings:
        problems.append(f"rings left in shared memory after every process exited: {leftover_rings}")
    bad_exit = {n: c for n, c in exit_codes.items() if c != 0}
    if bad_exit:
        problems.append(f"non-zero exits after SIGTERM: {bad_exit}")
    duration = last["t"]
    return {
        "ok": not problems, "problems": problems, "actors": args.actors, "rate_per_actor": args.rate,
        "duration_s": duration, "workdir": str(work),
        "learner_rss_mib": {"first": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1],
                            "second_half_growth": round(growth, 1)},
        "actors_rss_mib_last": last["actors_rss_mib"],
        "updates": last["updates"], "updates_per_s": round(last["updates"] / max(duration, 1e-9), 2),
        "segments_offered": last["actor_sent"], "offered_per_s": round(last["actor_sent"] / max(duration, 1e-9), 1),
        "trained_segments": last["updates"] * 2,
        "lag_max_trained": lag_max, "lag_mean_last": last["lag_mean"],
        "actor_version_lag_max": max(s["actor_version_lag_max"] for s in samples),
        "queue_depth_max": max(s["queue_depth"] for s in samples),
        "dropped_last": last["dropped"], "actor_ring_full": last["actor_ring_full"],
        "actor_send_failures": last["actor_send_failures"],
        "rss_timeline": [(s["t"], s["learner_rss_mib"]) for s in samples][:: max(1, len(samples) // 20)],
        "rings_left_after_exit": leftover_rings,
        "samples": samples,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--actors", type=int, default=16)
    ap.add_argument("--rate", type=float, default=5.0, help="segments per second per actor")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds")
    ap.add_argument("--sample-interval", type=float, default=5.0)
    ap.add_argument("--inline-fraction", type=float, default=0.5,
                    help="share of actors that send inline ZeroMQ segments instead of ring notices")
    ap.add_argument("--max-queued", type=int, default=64, help="learner.max_queued_segments")
    ap.add_argument("--ring-slots", type=int, default=8)
    ap.add_argument("--full-policy", choices=("wait", "drop"), default="wait")
    ap.add_argument("--max-policy-lag", type=int, default=4, help="must match learner.max_policy_lag")
    ap.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    ap.add_argument("--stall-window", type=float, default=30.0)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the learner and the actors")
    args = ap.parse_args(argv)
    out = run(args)
    text = json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
