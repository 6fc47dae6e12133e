"""tandem-deploy on the sim rig: the policy follows the learner's weight broadcast, switching
versions only between episodes, and the evaluation episodes land in a LeRobot dataset."""
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from common.channels import WeightPublisher
from common.config import load_config
from common.policy import make_policy
from realrobot.dataset_writer import read_labels
from realrobot.deployer import Deployer, WeightFollower
from realrobot.rig import make_rig

STEPS = 6
TINY_IMAGES = ["env.camera.width=64", "env.camera.height=64"]


@pytest.fixture(scope="module")
def rig():
    """One sim rig for the module (making a twin env costs seconds)."""
    cfg = load_config("deploy", TINY_IMAGES)
    rig = make_rig(cfg.robot, cfg.env, seed=0)
    rig.connect()
    yield rig
    rig.disconnect()


def scaled_weights(policy, scale):
    return {k: (v * scale if v.dtype.kind == "f" else v) for k, v in policy.get_weights().items()}


@pytest.mark.parametrize("apply_at", ["episode", "chunk"])
def test_deployer_switches_weights_only_at_boundaries(tmp_path, apply_at, rig):
    endpoint = f"ipc://{tmp_path}/weights.ipc"
    cfg = load_config("deploy", [f"run_dir={tmp_path}", "robot.pace=false", "deploy.prompt.type=auto",
                                 *TINY_IMAGES, "deploy.num_episodes=2",
                                 f"deploy.max_episode_steps={STEPS}", f"transport.weights_endpoint={endpoint}",
                                 f"deploy.apply_weights_at={apply_at}",
                                 "robot.safety.max_rate_hz=1000", "deploy.wait_for_weights_s=30"])
    reference = make_policy(cfg.policy)
    versions = {1: scaled_weights(reference, 1.0), 2: scaled_weights(reference, 0.5)}
    current, stop = {"v": 1}, threading.Event()
    publisher = WeightPublisher(endpoint)
    frame_versions = []

    def publish():  # a learner that re-broadcasts its current version (slow-joiner safe)
        while not stop.wait(0.05):
            v = current["v"]
            publisher.publish(v, versions[v])

    class SwitchingDeployer(Deployer):
        def _chunk(self, image, state, task):
            out = super()._chunk(image, state, task)
            if current["v"] == 1:  # the learner moves on while the first chunk executes
                current["v"] = 2
                stop.wait(0.5)  # let v2 arrive before the next boundary
            return out

        def run_episode(self, task):
            buffer, per_frame = super().run_episode(task)
            frame_versions.append(per_frame)
            return buffer, per_frame

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        deployer = SwitchingDeployer(cfg, rig=rig)
        assert deployer.run() == 0
    finally:
        stop.set()
        thread.join()
        publisher.close()

    k = deployer.policy.exec_horizon
    assert 0 < k < STEPS
    if apply_at == "episode":
        assert frame_versions == [[1] * STEPS, [2] * STEPS]  # never switched mid-episode
    else:
        assert frame_versions == [[1] * k + [2] * (STEPS - k), [2] * STEPS]  # at the first chunk boundary
    final = deployer.policy.get_weights()
    name = next(k for k, v in versions[2].items() if v.dtype.kind == "f" and np.abs(v).sum() > 0)
    np.testing.assert_allclose(final[name], versions[2][name], rtol=1e-6)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds = LeRobotDataset("local/tandem_real_eval", root=tmp_path / "real_eval")
    assert ds.num_episodes == 2 and len(ds) == 2 * STEPS
    labels = read_labels(tmp_path / "real_eval")
    assert [l["policy_version"] for l in labels] == [frame_versions[0][-1], 2]
    assert all(l["source"] == "deploy" and l["success"] is False for l in labels)  # 6 steps: too short


def test_pinned_version_applies_only_that_version():
    policy = make_policy(load_config("deploy").policy)
    weights = policy.get_weights()
    follower = WeightFollower(policy, make_subscriber=None, pinned_version=4)
    applied = []
    for v in (3, 4, 5):
        follower.offer(SimpleNamespace(policy_version=v, arrays=weights))
        applied.append(follower.apply())
    assert applied == [False, True, False]
    assert follower.version == 4 and follower.skipped_unpinned == 2


def test_only_the_newest_received_version_is_applied_at_a_boundary():
    policy = make_policy(load_config("deploy").policy)
    weights = policy.get_weights()
    follower = WeightFollower(policy, make_subscriber=None)
    for v in (1, 2, 3):  # three versions arrive during one episode
        follower.offer(SimpleNamespace(policy_version=v, arrays=weights))
    assert follower.apply() and follower.version == 3 and follower.applied == 1
    assert not follower.apply()  # nothing new since
