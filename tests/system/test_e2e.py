"""End to end with real processes on this host: a learner and two actors over ZeroMQ (ipc) and
shared-memory rings. One scenario, in stages, because each process start costs seconds:
train -> SIGKILL an actor -> restart it -> stop and resume the learner -> actors reconnect."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.channels import ControlClient
from common.protocol import Message
from common.shm_ring import list_rings
from paths import REPO_ROOT

ROOT = REPO_ROOT
FAST = ["env.image_size=32", "env.max_episode_steps=20", "actor.rollout_steps=2", "policy=tiny", "device=cpu",
        "learner.global_batch_size=2", "learner.micro_batch_size=2", "learner.real_batch_size=4",
        "learner.weights_republish_s=0.5", "learner.checkpoint_interval=1000",
        "transport.heartbeat_interval_s=0.5", "transport.peer_timeout_s=3"]


def transport(tmp: Path) -> list[str]:
    return [f"transport.{k}_endpoint=ipc://{tmp}/{k}.ipc" for k in ("data", "weights", "control")]


class Procs:
    def __init__(self, tmp: Path, overrides: list[str]):
        self.tmp, self.overrides, self.procs = tmp, overrides, {}

    def start(self, name: str, module: str, *extra: str):
        log = open(self.tmp / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *self.overrides, *extra], cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        return self.procs[name]

    def actor(self, i: int):
        return self.start(f"actor-{i}", "actors.main", f"actor.id=actor-{i}", f"actor.seed_offset={i}")

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()


def learner_status(tmp: Path, timeout_ms: int = 2000) -> Message | None:
    client = ControlClient(f"ipc://{tmp}/control.ipc", identity="test-status")
    try:
        return client.request(Message(kind="status_request", sender="test-status"), timeout_ms=timeout_ms)
    finally:
        client.close()


def wait_until(pred, timeout_s: float, what: str, procs: Procs):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        for name, p in procs.procs.items():
            if name == "learner" and p.poll() is not None:
                pytest.fail(f"learner exited ({p.returncode}) while waiting for {what}:\n{procs.log('learner')[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in procs.procs))


def actor_versions(tmp: Path) -> dict:
    reply = learner_status(tmp)
    if reply is None:
        return {}
    return {n: a.get("policy_version", -1) for n, a in reply.meta.get("actors", {}).items()}


@pytest.mark.slow
def test_learner_and_actors_train_survive_kill_and_resume(tmp_path, real_proxy_dataset):
    run_dir = tmp_path / "run"
    procs = Procs(tmp_path, [f"run_dir={run_dir}", *FAST, *transport(tmp_path),
                             f"learner.real_datasets=[{{repo_id: local/real, root: {real_proxy_dataset}}}]"])
    try:
        procs.start("learner", "learner.main")
        procs.actor(0)
        procs.actor(1)
        # 1. both actors train with the learner and follow its weight versions
        wait_until(lambda: (v := actor_versions(tmp_path)) and len(v) == 2 and min(v.values()) >= 3,
                   240, "both actors at weights version >= 3", procs)
        rings = [r for r in list_rings() if "tandem_" in r]
        assert rings, "actors on the learner's host hand segments over in shared memory"

        # 2. SIGKILL one actor mid-run: the learner goes on training with the other
        procs.procs["actor-1"].kill()
        procs.procs["actor-1"].wait()
        before = learner_status(tmp_path).meta["updates"]
        wait_until(lambda: "actor-1" not in actor_versions(tmp_path), 30, "actor-1 marked gone", procs)
        wait_until(lambda: learner_status(tmp_path).meta["updates"] >= before + 2, 120,
                   "updates with one actor", procs)
        assert procs.procs["learner"].poll() is None

        # 3. a restarted actor rejoins and receives current weights
        procs.actor(1)
        wait_until(lambda: actor_versions(tmp_path).get("actor-1", -1) > 0, 120, "actor-1 rejoined", procs)

        # 4. stop the learner (checkpoint on SIGTERM), resume it: version numbering continues and
        #    the running actors reconnect by themselves
        procs.procs["learner"].send_signal(signal.SIGTERM)
        assert procs.procs["learner"].wait(60) == 0
        stopped_version = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("ckpt-*"))
        assert stopped_version > 0
        procs.start("learner", "learner.main")
        wait_until(lambda: (r := learner_status(tmp_path)) and r.meta["updates"] >= stopped_version + 2, 180,
                   "resumed learner training", procs)
        reply = learner_status(tmp_path)
        assert reply.policy_version >= stopped_version + 2  # resumed numbering, not from 0
        wait_until(lambda: (v := actor_versions(tmp_path)) and len(v) == 2 and min(v.values()) > stopped_version,
                   120, "both actors on the resumed learner's weights", procs)
        assert "resumed from" in procs.log("learner")
    finally:
        procs.stop_all()

    # co-training ran inside the asynchronous loop: the four tags are in the event files
    tags = set()
    for f in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/ppo_loss", "train/sft_loss", "actor/total_loss", "train/loss_ratio"} <= tags
    # the killed actor's ring was reaped, the others' unlinked on exit
    assert not [r for r in list_rings() if "tandem_" in r and any(str(p.pid) in r for p in procs.procs.values())]


def test_filtered_bc_joins_ring_segments_into_episodes(tmp_path, real_proxy_dataset):
    """The filtered-BC learner gets each segment's stream (env index, env_seq) through the shared-memory
    ring's notice, whose own "seq" is the slot's: episodes spanning segments are joined, none dropped.
    As tandem-experiment's fbc conditions run it: actors sampling the ODE from a random x_0, an EMA
    checkpointed as the deployable policy."""
    run_dir = tmp_path / "run"
    procs = Procs(tmp_path, [f"run_dir={run_dir}", *FAST, *transport(tmp_path), "learner.rl_objective=filtered_bc",
                             "learner.policy_noise.stochastic_steps=none",
                             f"learner.real_datasets=[{{repo_id: local/real, root: {real_proxy_dataset}}}]"])
    try:
        procs.start("learner", "learner.main")
        procs.actor(0)
        wait_until(lambda: (r := learner_status(tmp_path)) and r.meta["updates"] >= 6, 240, "6 updates", procs)
        dropped = learner_status(tmp_path).meta["dropped"]
    finally:
        procs.stop_all()
    assert not any(v for v in dropped.values()), dropped
    assembled = []
    for f in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        assembled += [e.value for e in acc.Scalars("replay/assembled_episodes")]
        assert not [e for e in acc.Scalars("replay/discarded_partial_episodes") if e.value > 0]
    # 20-step episodes of 4-step chunks over 2-chunk-step segments: each episode spans 3 segments
    assert max(assembled) >= 2
    last = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    assert (last / "policy").is_dir() and (last / "trained_policy").is_dir()
