"""The real-robot side against a real `tandem-learner` process: a collected episode is pushed,
stored (disk first) and acknowledged; the deployer runs on the learner's broadcast weights."""
import json
import os
import subprocess
import sys

import pytest

from common.config import load_config
from realrobot.collector import Collector
from realrobot.dataset_writer import read_labels
from realrobot.deployer import Deployer
from realrobot.rig import make_rig
from paths import REPO_ROOT
from processes import stop

ROOT = REPO_ROOT
TINY_IMAGES = ["env.camera.width=64", "env.camera.height=64"]


@pytest.mark.slow
def test_collect_and_deploy_against_the_learner(tmp_path):
    transport = [f"transport.data_endpoint=ipc://{tmp_path}/data.ipc",
                 f"transport.control_endpoint=ipc://{tmp_path}/control.ipc",
                 f"transport.weights_endpoint=ipc://{tmp_path}/weights.ipc"]
    learner_dir = tmp_path / "learner"
    log = open(tmp_path / "learner.log", "w")
    learner = subprocess.Popen([sys.executable, "-m", "learner.main", f"run_dir={learner_dir}", "device=cpu",
                                "learner.max_duration_s=300", "learner.weights_republish_s=0.5", *TINY_IMAGES, *transport],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        common = [f"run_dir={tmp_path}", "robot.pace=false", "robot.safety.max_rate_hz=1000", *TINY_IMAGES, *transport]
        cfg = load_config("collect", [*common, "teleop=scripted", "collect.prompt.type=auto", "collect.num_episodes=1",
                                      "collect.max_episode_steps=70", "collect.outbox.pump_interval_s=0.2",
                                      "collect.outbox.flush_timeout_s=90"])
        rig = make_rig(cfg.robot, cfg.env, seed=0)
        rig.connect()
        try:
            assert Collector(cfg, rig=rig).run() == 0
            labels = read_labels(tmp_path / "real_demos")
            assert len(labels) == 1 and labels[0]["success"]  # seed 0: the expert succeeds
            episode_id = labels[0]["episode_id"]
            assert (tmp_path / "outbox" / "collect" / f"{episode_id}.acked").exists()
            stored = json.loads((learner_dir / "stored_episode_ids.json").read_text())
            assert stored == [episode_id]

            dcfg = load_config("deploy", [*common, "deploy.prompt.type=auto", "deploy.num_episodes=1",
                                          "deploy.max_episode_steps=4", "deploy.wait_for_weights_s=60"])
            deployer = Deployer(dcfg, rig=rig)
            assert deployer.run() == 0
            assert deployer.follower.version >= 0 and deployer.follower.applied >= 1
            eval_labels = read_labels(tmp_path / "real_eval")
            assert [l["policy_version"] for l in eval_labels] == [deployer.follower.version]
        finally:
            rig.disconnect()
    finally:
        stop(learner)
        log.close()
    text = (tmp_path / "learner.log").read_text()
    assert f"stored real episode {episode_id}" in text, text[-3000:]
