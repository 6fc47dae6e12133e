"""tandem-collect end to end on the sim rig: scripted teleop, auto labels, LeRobot dataset, and
the episodes pushed to a stand-in learner (acknowledged, each received once)."""
import os

import numpy as np

from realrobot import collector
from realrobot.dataset_writer import read_labels
from realrobot_standin import StandInLearner

MAX_STEPS = 70  # the scripted expert needs about 50-70 steps; shorter episodes end as failures


def test_collect_scripted_episodes_into_dataset_and_learner(tmp_path):
    data, control = f"ipc://{tmp_path}/data.ipc", f"ipc://{tmp_path}/control.ipc"
    overrides = [f"run_dir={tmp_path}", "teleop=scripted", "collect.prompt.type=auto", "robot.pace=false",
                 "env.camera.width=64", "env.camera.height=64", "collect.num_episodes=2",
                 f"collect.max_episode_steps={MAX_STEPS}", f"transport.data_endpoint={data}",
                 f"transport.control_endpoint={control}", "collect.outbox.pump_interval_s=0.1",
                 "robot.safety.max_rate_hz=1000"]
    with StandInLearner(data, control) as learner:
        assert collector.main(overrides) == 0

    os.environ["HF_HUB_OFFLINE"] = "1"
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    root = tmp_path / "real_demos"
    ds = LeRobotDataset("local/tandem_real_demos", root=root)
    assert ds.num_episodes == 2
    frame = ds[0]
    assert tuple(frame["observation.image"].shape) == (3, 64, 64)
    assert tuple(frame["observation.state"].shape) == (8,) and tuple(frame["action"].shape) == (7,)
    assert frame["task"].startswith("put the")

    labels = read_labels(root)
    assert [l["episode_index"] for l in labels] == [0, 1]
    assert any(l["success"] for l in labels)  # seed 0: the expert succeeds within MAX_STEPS
    for label in labels:
        # terminate_on_success: a success ends the episode early, a failure runs out of steps
        assert label["success"] == (label["num_frames"] < MAX_STEPS), label

    pushed = [l for l in labels if l["success"]]  # collect.push_failures is false by default
    assert set(learner.episodes) == {l["episode_id"] for l in pushed}
    assert all(n == 1 for n in learner.receipts.values())
    actions = np.stack([np.asarray(ds[i]["action"]) for i in range(len(ds))])
    starts = np.cumsum([0] + [l["num_frames"] for l in labels])
    for label in pushed:
        got = learner.episodes[label["episode_id"]]
        i = label["episode_index"]
        np.testing.assert_allclose(got.actions, actions[starts[i]:starts[i + 1]], atol=1e-6)
        assert got.success and got.task == label["task"]
    outbox = tmp_path / "outbox" / "collect"
    assert sorted(p.suffix for p in outbox.iterdir()).count(".acked") == len(pushed)
