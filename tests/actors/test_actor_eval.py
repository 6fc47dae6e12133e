"""An evaluation actor against a real learner process: it runs deterministic rounds on the real
proxy and the learner logs eval/real_proxy_success."""
import os
import subprocess
import sys
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from paths import REPO_ROOT
from processes import stop

ROOT = REPO_ROOT


def test_eval_actor_reports_success_to_the_learner(tmp_path):
    endpoints = [f"transport.{k}_endpoint=ipc://{tmp_path}/{k}.ipc" for k in ("data", "weights", "control")]
    common = [f"run_dir={tmp_path / 'run'}", "policy=tiny", "device=cpu", "env.image_size=32",
              "env.max_episode_steps=8", "learner.use_real_data_co_training=false",
              "learner.weights_republish_s=0.5", *endpoints]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "procs.log", "w")
    learner = subprocess.Popen([sys.executable, "-m", "learner.main", *common], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    actor = subprocess.Popen([sys.executable, "-m", "actors.main", *common, "actor.mode=eval", "actor.real_proxy=true",
                              "actor.eval_episodes=2", "actor.max_eval_rounds=1", "actor.id=eval-real-proxy"],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert actor.wait(240) == 0, (tmp_path / "procs.log").read_text()[-3000:]
    finally:
        stop(learner, timeout_s=60)
    values = []
    deadline = time.time() + 10
    while not values and time.time() < deadline:
        for f in (tmp_path / "run" / "tb").glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(f))
            acc.Reload()
            if "eval/real_proxy_success" in acc.Tags()["scalars"]:
                values = [e.value for e in acc.Scalars("eval/real_proxy_success")]
        time.sleep(0.5)
    assert len(values) == 1 and 0.0 <= values[0] <= 1.0
