"""tandem-experiment's bookkeeping: curve points from a run's checkpoints, distinct sockets per
concurrent run, and the issue's targets judged per seed."""
import types

import torch

from common.config import load_config
from common.policy import make_policy
from learner.checkpoint import LearnerCounters, save_checkpoint
from learner.experiment import check_targets, run_points, stage2_runs


def test_curve_points_count_env_steps_from_the_checkpoints(tmp_path):
    policy = make_policy(load_config("config", ["policy=tiny", "device=cpu"]).policy)
    optimizer = torch.optim.Adam(policy.parameters())
    for updates, chunk_steps in ((15, 960), (30, 1920)):
        save_checkpoint(tmp_path / "checkpoints", policy, optimizer,
                        LearnerCounters(updates=updates, sim_samples=chunk_steps), keep=0)
    points = run_points(tmp_path, exec_horizon=4)
    assert [(p["updates"], p["env_steps"]) for p in points] == [(15, 3840), (30, 7680)]
    assert points[-1]["policy"].endswith("ckpt-0000000030/policy")


def test_concurrent_runs_get_disjoint_sockets(tmp_path):
    cfg = load_config("cotrain_experiment", ["experiment.seeds=[0,1]"])
    runs = stage2_runs(cfg, types.SimpleNamespace(run=tmp_path))
    assert len(runs) == 4
    endpoints = {getattr(load_config("config", [f"run_dir={d}"]).transport, f"{k}_endpoint")
                 for d in runs.values() for k in ("data", "weights", "control")}
    assert len(endpoints) == 12 and all(e.startswith("ipc://") for e in endpoints)


def test_targets_are_judged_per_seed():
    stage1 = {"twin": 0.32, "real_proxy": 0.39, "heldout_real_sft_loss": 0.22}
    results = {"sft": {0: stage1, 1: stage1},
               "cotrain": {0: {"twin": 0.50, "real_proxy": 0.37, "heldout_real_sft_loss": 0.23},
                           1: {"twin": 0.40, "real_proxy": 0.30, "heldout_real_sft_loss": 0.25}},
               "ppo": {0: {"twin": 0.45, "real_proxy": 0.30, "heldout_real_sft_loss": 0.30},
                       1: {"twin": 0.45, "real_proxy": 0.35, "heldout_real_sft_loss": 0.24}}}
    lines = check_targets(results)
    assert "+0.180" in lines[0] and "met)" in lines[0] and "not met" not in lines[0]
    assert "(shows what" in lines[1]
    assert lines[2].count("not met") == 2  # seed 1: +0.08 twin, -0.09 real
    assert "does not show" in lines[3]  # PPO kept more real success and a lower loss than co-training
