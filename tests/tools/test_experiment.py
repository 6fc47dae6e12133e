"""tandem-experiment's bookkeeping: curve points from a run's checkpoints, distinct sockets per
concurrent run, the issue's targets judged per seed, curve points scored on one seed set, and
which runs a re-run continues."""
import json
import types

import pytest
import torch

from common.config import load_config
from common.policy import make_policy
from learner.checkpoint import LearnerCounters, save_checkpoint
from tools.experiment import check_targets, needs_stage2, paired_change, run_points, stage2_runs, success_on


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


def test_conditions_are_configured_runs_and_an_unknown_one_is_named(tmp_path):
    cfg = load_config("cotrain_experiment", ["experiment.seeds=[0]", "experiment.conditions=[cotrain_beta2,sft]"])
    runs = stage2_runs(cfg, types.SimpleNamespace(run=tmp_path))
    assert list(runs) == [("cotrain_beta2", 0)]
    assert "learner.sft_loss_weight=2.0" in cfg.experiment.condition_overrides.cotrain_beta2
    cfg = load_config("cotrain_experiment", ["experiment.conditions=[cotrain,ppo_typo]"])
    with pytest.raises(ValueError, match=r"\['ppo_typo'\]: no experiment.condition_overrides entry"):
        stage2_runs(cfg, types.SimpleNamespace(run=tmp_path))


def test_targets_are_judged_per_seed():
    stage1 = {"twin": 0.32, "real_proxy": 0.39, "heldout_real_sft_loss": 0.22}
    results = {"sft": {0: stage1, 1: stage1},
               "cotrain": {0: {"twin": 0.50, "real_proxy": 0.37, "heldout_real_sft_loss": 0.23},
                           1: {"twin": 0.40, "real_proxy": 0.30, "heldout_real_sft_loss": 0.25}},
               "ppo": {0: {"twin": 0.45, "real_proxy": 0.30, "heldout_real_sft_loss": 0.30},
                       1: {"twin": 0.45, "real_proxy": 0.35, "heldout_real_sft_loss": 0.24}}}
    lines = check_targets(results, {"cotrain": "ppo", "fbc_cotrain": "fbc"})  # fbc_cotrain did not run: no lines
    assert len(lines) == 4
    assert "+0.180" in lines[0] and "met)" in lines[0] and "not met" not in lines[0]
    assert "(shows what" in lines[1]
    assert lines[2].count("not met") == 2  # seed 1: +0.08 twin, -0.09 real
    assert "does not show" in lines[3]  # PPO kept more real success and a lower loss than co-training


def test_a_change_of_exactly_minus_three_points_meets_the_real_proxy_target():
    stage1 = {"twin": 0.32, "real_proxy": 0.39, "heldout_real_sft_loss": 0.22}
    results = {"sft": {0: stage1}, "cotrain": {0: {"twin": 0.34, "real_proxy": 0.36, "heldout_real_sft_loss": 0.23}}}
    assert 0.36 - 0.39 < -0.03  # the float arithmetic the check must not trip on
    assert "real proxy -0.030 (target >= -0.03: met)" in check_targets(results, {"cotrain": "ppo"})[0]


def test_curve_success_counts_only_the_curve_seeds():
    episodes = [{"env": "twin", "seed": 100000 + i, "success": i % 2 == 0} for i in range(10)]
    episodes += [{"env": "real_proxy", "seed": 100000 + i, "success": True} for i in range(10)]
    assert success_on(episodes, "twin", set(range(100000, 100004))) == 0.5
    assert success_on(episodes, "twin", {100000, 100002}) == 1.0
    with pytest.raises(ValueError, match="no evaluated twin episode"):
        success_on(episodes, "twin", {5})


def test_a_rerun_continues_only_unfinished_runs_and_only_when_asked(tmp_path):
    fresh, short, done = tmp_path / "fresh", tmp_path / "short", tmp_path / "done"
    for d, updates in ((short, 39), (done, 60)):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"updates": updates}))
    assert needs_stage2(fresh, 60, continue_runs=False)
    assert not needs_stage2(short, 60, continue_runs=False)
    assert needs_stage2(short, 60, continue_runs=True)
    assert not needs_stage2(done, 60, continue_runs=True)


def test_paired_change_counts_episodes_solved_and_lost_against_stage1():
    seeds = list(range(10))
    def evals_of(successes):
        return {"episodes": [{"env": "twin", "seed": s, "success": ok} for s, ok in zip(seeds, successes)]}
    evals = {"s1": evals_of([1, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
             "a": evals_of([1, 0, 1, 1, 0, 0, 0, 0, 0, 0]),   # +2 solved, 1 lost
             "b": evals_of([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])}   # unchanged
    p = paired_change(evals, "s1", ["a", "b"], "twin", seeds, resamples=2000)
    assert p["gained"] == [2, 0] and p["lost"] == [1, 0]
    assert abs(p["change"] - 0.05) < 1e-9  # (+0.1 + 0) / 2
    assert p["ci95"][0] <= p["change"] <= p["ci95"][1]
