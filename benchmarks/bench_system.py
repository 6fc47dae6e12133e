"""System benchmark (issue #6 part 5): is the learner keeping up with its actors?

    python -m benchmarks.bench_system [--actors 2] [--duration 60] [--presets tiny base] [key=value ...]

Three phases, each its own processes, exactly as a user starts them (``python -m actors.main``,
``python -m learner.main``) over ipc endpoints in a temporary directory; trailing ``key=value``
arguments are Hydra overrides for every process (defaults: 64x64 images, tiny policy):

1. actors only: K actors with ``actor.dry_run=true`` (policy sampling and env stepping, segments
   discarded, no weights awaited), heartbeats answered by a stub; their env-steps/s is the baseline.
2. learner + the same K actors: env-steps/s consumed by the learner (updates x segments per
   batch x chunk-steps per segment x env steps per chunk), the actors' own env-steps/s, and the
   policy lag of every trained segment (the learner's ``lag_histogram`` in its status).
   Target: consumed >= ``--min-ratio`` x baseline; median lag <= ``--max-median-lag``.
3. weight broadcast latency per policy preset: a ``WeightPublisher`` here and a ``WeightSubscriber``
   in another process that applies each version (digest check + ``set_weights``); latency = the
   subscriber's clock when applied - the publisher's clock before ``get_weights`` (same host).

Each phase measures over ``--duration`` seconds after a warm-up (every actor stepping, and in
phase 2 the learner past its first update). Prints a table with PASS/FAIL and writes ``--out``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from common.channels import ControlClient, ControlServer, WeightPublisher, WeightSubscriber
from common.config import load_config
from common.protocol import Message

DEFAULT_OVERRIDES = ["env.image_size=64", "policy=tiny"]


# ---- processes ----------------------------------------------------------------------------------
class Procs:
    """Child processes with their logs in ``log_dir``; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, log_dir: Path, overrides: list[str], stop_timeout_s: float):
        self.log_dir, self.overrides, self.stop_timeout_s = log_dir, overrides, stop_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, *extra: str):
        log = open(self.log_dir / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *self.overrides, *extra], cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})

    def actors(self, k: int, *extra: str):
        for i in range(k):
            self.start(f"actor-{i}", "actors.main", f"actor.id=actor-{i}", f"actor.seed_offset={i}", *extra)

    def check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + self.stop_timeout_s
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def rate(first: dict, last: dict, key: str) -> float:
    """Sum over actors of (last - first)[key] / elapsed, from {actor: {key, "t"}} snapshots."""
    total = 0.0
    for name, a in last.items():
        if name in first and a["t"] > first[name]["t"]:
            total += (a[key] - first[name][key]) / (a["t"] - first[name]["t"])
    return total


def wait_for(pred, timeout_s: float, what: str, procs: Procs, poll_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        procs.check_alive()
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# ---- phase 1: actors only -----------------------------------------------------------------------
def actors_only(cfg, args, procs: Procs) -> dict:
    """Dry-run actors; a control stub answers their heartbeats and records their env steps."""
    server = ControlServer.from_config(cfg.transport)
    seen: dict[str, dict] = {}

    def serve(until: float):
        while time.time() < until:
            req = server.poll(timeout_ms=int(args.poll_s * 1000))
            if req is None:
                continue
            peer, msg = req
            if msg.kind == "heartbeat" and "env_steps" in msg.meta:
                seen[msg.sender] = {"env_steps": msg.meta["env_steps"], "t": time.time()}
            server.reply(peer, Message(kind="status", sender="bench", meta={"session": "bench-stub"}), in_reply_to=msg)

    try:
        procs.actors(args.actors, "actor.dry_run=true")
        deadline = time.time() + args.warmup_timeout
        while not (len(seen) == args.actors and all(a["env_steps"] > 0 for a in seen.values())):
            if time.time() > deadline:
                raise TimeoutError("actors did not start stepping")
            procs.check_alive()
            serve(time.time() + args.poll_s)
        first = {n: dict(a) for n, a in seen.items()}
        serve(time.time() + args.duration)
        return {"env_steps_per_s": rate(first, seen, "env_steps")}
    finally:
        procs.stop()
        server.close()


# ---- phase 2: learner + actors ------------------------------------------------------------------
def learner_status(cfg, timeout_ms: int) -> dict | None:
    client = ControlClient.from_config(cfg.transport, identity=f"bench-{os.getpid()}")
    try:
        reply = client.request(Message(kind="status_request", sender="bench"), timeout_ms=timeout_ms)
        return None if reply is None else dict(reply.meta, t=time.time())
    finally:
        client.close()


def next_update(cfg, timeout_ms: int, after: int) -> dict | None:
    status = learner_status(cfg, timeout_ms)
    return status if status is not None and status["updates"] > after else None


def actor_snapshot(status: dict) -> dict:
    # heartbeat values, timed by the heartbeat's arrival (age_s), not by this request
    return {n: {"env_steps": a.get("env_steps", 0), "t": status["t"] - a.get("age_s", 0.0)}
            for n, a in status.get("actors", {}).items()}


def with_learner(cfg, args, procs: Procs) -> dict:
    timeout_ms = int(cfg.transport.request_timeout_ms)
    try:
        procs.start("learner", "learner.main")
        procs.actors(args.actors)
        ready = lambda: ((s := learner_status(cfg, timeout_ms)) and s["updates"] >= 1  # noqa: E731
                         and len(s["actors"]) == args.actors and s)
        warm = wait_for(ready, args.warmup_timeout, "the learner's first update with every actor", procs, args.poll_s)
        # the window runs from one update's end to another's: updates/s is not rounded to whole updates
        first = wait_for(lambda: next_update(cfg, timeout_ms, warm["updates"]), args.warmup_timeout,
                         "an update", procs, args.update_poll_s)
        time.sleep(args.duration)
        last = learner_status(cfg, timeout_ms)
        last = wait_for(lambda: next_update(cfg, timeout_ms, last["updates"]), args.warmup_timeout,
                        "an update", procs, args.update_poll_s)
    finally:
        procs.stop()
    lcfg, elapsed = cfg.learner, last["t"] - first["t"]
    env_steps_per_update = lcfg.global_batch_size * cfg.actor.rollout_steps * cfg.policy.exec_horizon
    lags = np.asarray(last["lag_histogram"]) - np.asarray(first["lag_histogram"])
    return {"updates_per_s": (last["updates"] - first["updates"]) / elapsed,
            "consumed_env_steps_per_s": (last["updates"] - first["updates"]) * env_steps_per_update / elapsed,
            "produced_env_steps_per_s": rate(actor_snapshot(first), actor_snapshot(last), "env_steps"),
            "lag_histogram": lags.tolist(), "lag_median": histogram_quantile(lags, 0.5),
            "lag_p90": histogram_quantile(lags, 0.9), "lag_max": int(np.flatnonzero(lags).max()) if lags.any() else 0,
            "dropped": {k: last["dropped"].get(k, 0) - first["dropped"].get(k, 0) for k in ("stale", "overflow")}}


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """The q-quantile of values 0..len-1 given their counts (nan when empty)."""
    if counts.sum() == 0:
        return float("nan")
    return float(np.searchsorted(np.cumsum(counts), q * counts.sum()))


# ---- phase 3: weight broadcast latency ----------------------------------------------------------
def subscriber(endpoint: str, policy_cfg, results, timeout_s: float):
    """An actor's side: apply every new version and report (version, applied time - published time)."""
    from common.policy import make_policy
    policy = make_policy(policy_cfg)
    sub = WeightSubscriber(endpoint, name="bench-sub")
    results.put(("ready", None, None))
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        msg = sub.poll_latest(timeout_ms=100)
        if msg is None:
            continue
        policy.set_weights(msg.arrays)
        results.put(("applied", msg.policy_version, time.time() - msg.meta["t0"]))
        if msg.meta.get("last"):
            break
    sub.close()


def broadcast_latency(cfg, preset: str, args, endpoint: str) -> dict:
    from common.policy import make_policy
    policy_cfg = load_config("config", [f"policy={preset}"]).policy
    policy = make_policy(policy_cfg)
    pub = WeightPublisher(endpoint, name="bench-pub")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=subscriber, args=(endpoint, policy_cfg, results, args.warmup_timeout + args.duration))
    proc.start()
    try:
        assert results.get(timeout=args.warmup_timeout)[0] == "ready"
        version, latencies, publish_s, nbytes = 0, [], [], 0
        # PUB drops whatever is sent before the subscription is connected: publish until one arrives
        while True:
            version += 1
            weights = policy.get_weights()
            pub.publish(version, weights, meta={"t0": time.time()})
            try:
                results.get(timeout=args.poll_s * 10)
                break
            except queue.Empty:  # not connected yet
                if not proc.is_alive():
                    raise RuntimeError("weight subscriber died")
        nbytes = sum(w.nbytes for w in weights.values())
        for i in range(args.versions):
            version += 1
            t0 = time.time()
            weights = policy.get_weights()
            pub.publish(version, weights, meta={"t0": t0, "last": i == args.versions - 1})
            publish_s.append(time.time() - t0)
            while True:  # one version in flight at a time: latency without queueing
                _, got, latency = results.get(timeout=args.warmup_timeout)
                if got == version:
                    latencies.append(latency)
                    break
        ms = 1000 * np.asarray(latencies)
        return {"preset": preset, "megabytes": nbytes / 1e6, "tensors": len(weights), "versions": len(ms),
                "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max()),
                "publish_median_ms": 1000 * float(np.median(publish_s))}
    finally:
        proc.join(timeout=args.warmup_timeout)
        if proc.is_alive():
            proc.terminate()
        pub.close()


# ---- report -------------------------------------------------------------------------------------
def report(args, base: dict, run: dict, broadcasts: list[dict]) -> bool:
    ratio = run["consumed_env_steps_per_s"] / base["env_steps_per_s"]
    ok_ratio, ok_lag = ratio >= args.min_ratio, run["lag_median"] <= args.max_median_lag
    rows = [("actors only (dry run): env-steps/s", f"{base['env_steps_per_s']:.1f}", "", ""),
            ("with learner: actors' env-steps/s", f"{run['produced_env_steps_per_s']:.1f}", "", ""),
            ("with learner: consumed env-steps/s", f"{run['consumed_env_steps_per_s']:.1f}", "", ""),
            ("learner updates/s", f"{run['updates_per_s']:.2f}", "", ""),
            ("consumed / actors only", f"{ratio:.2f}", f">= {args.min_ratio}", "PASS" if ok_ratio else "FAIL"),
            # ~1 with a low ratio above: the actors slowed down (shared cores), the learner kept up
            ("consumed / actors' own with learner",
             f"{run['consumed_env_steps_per_s'] / run['produced_env_steps_per_s']:.2f}", "", ""),
            ("policy lag median (p90, max)", f"{run['lag_median']:.0f} ({run['lag_p90']:.0f}, {run['lag_max']})",
             f"<= {args.max_median_lag}", "PASS" if ok_lag else "FAIL"),
            ("policy lag histogram (0, 1, ...)", " ".join(map(str, run["lag_histogram"])), "", ""),
            ("segments dropped: stale, overflow", f"{run['dropped']['stale']}, {run['dropped']['overflow']}", "", "")]
    for b in broadcasts:
        rows.append((f"weight broadcast {b['preset']} ({b['megabytes']:.1f} MB): median (p90) ms",
                     f"{b['median_ms']:.1f} ({b['p90_ms']:.1f})", "", ""))
        rows.append(("  of which get_weights + digest + send (median) ms", f"{b['publish_median_ms']:.1f}", "", ""))
    print(f"\n{args.actors} actors, {args.duration:.0f} s per phase")
    print(f"{'metric':<58} {'value':>16} {'target':>8} {'result':>6}")
    for name, value, target, result in rows:
        print(f"{name:<58} {value:>16} {target:>8} {result:>6}")
    return ok_ratio and ok_lag


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra key=value overrides for every process")
    p.add_argument("--actors", type=int, default=2, help="K actor processes")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured per phase")
    p.add_argument("--presets", nargs="*", default=["tiny", "base"], help="policy presets for the broadcast latency")
    p.add_argument("--versions", type=int, default=20, help="weight versions timed per preset")
    p.add_argument("--min-ratio", type=float, default=0.9, help="target: consumed / actors-only env-steps/s")
    p.add_argument("--max-median-lag", type=float, default=1.0, help="target: median policy lag (versions)")
    p.add_argument("--warmup-timeout", type=float, default=300.0, help="seconds allowed for processes to start")
    p.add_argument("--poll-s", type=float, default=0.5, help="status polling interval")
    p.add_argument("--update-poll-s", type=float, default=0.1, help="polling interval for an update's end")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="SIGTERM grace before SIGKILL")
    p.add_argument("--out", default="bench_system.json")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_system_"))
    endpoints = [f"transport.{k}_endpoint=ipc://{tmp}/{k}.ipc" for k in ("data", "weights", "control")]
    overrides = [*DEFAULT_OVERRIDES, f"run_dir={tmp}/run", *endpoints, *args.overrides]
    cfg = load_config("config", overrides)
    procs = Procs(tmp, overrides, args.stop_timeout)
    print(f"logs and run directory: {tmp}", flush=True)
    base = actors_only(cfg, args, procs)
    print(f"phase 1 (actors only): {base}", flush=True)
    run = with_learner(cfg, args, procs)
    print(f"phase 2 (learner + actors): {run}", flush=True)
    broadcasts = [broadcast_latency(cfg, preset, args, f"ipc://{tmp}/bench_weights.ipc") for preset in args.presets]
    print(f"phase 3 (weight broadcast): {broadcasts}", flush=True)
    passed = report(args, base, run, broadcasts)
    Path(args.out).write_text(json.dumps({"args": vars(args), "actors_only": base, "with_learner": run,
                                          "broadcast": broadcasts, "passed": passed}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
