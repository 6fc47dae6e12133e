"""Checkpoints: save/resume restores weights, optimiser state, normaliser and counters; atomic; last K kept."""
import numpy as np
import pytest
import torch

from common.config import load_config
from common.policy import make_policy
from common.policy import load_policy
from learner.checkpoint import LearnerCounters, list_checkpoints, load_latest_checkpoint, save_checkpoint
from learner.ema import make_ema, update_ema

torch.set_num_threads(1)
STATS = {"action": {"mean": np.arange(7) * 0.1, "std": np.full(7, 2.0)},
         "observation.state": {"mean": np.full(8, 0.5), "std": np.full(8, 3.0)}}


@pytest.fixture(scope="module")
def policy_cfg():
    return load_config("config", ["policy=tiny", "device=cpu"]).policy


def trained_policy_and_optimizer(policy_cfg, steps=2):
    torch.manual_seed(0)
    policy = make_policy(policy_cfg, STATS)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    obs = {"image": torch.zeros(2, 16, 16, 3, dtype=torch.uint8), "tokens": policy.tokenize(["a", "b"]),
           "state": torch.zeros(2, 8)}
    for _ in range(steps):
        optimizer.zero_grad()
        policy.sft_loss(obs, torch.randn(2, policy.chunk_size, 7)).backward()
        optimizer.step()
    return policy, optimizer


def test_save_and_resume_restores_everything(tmp_path, policy_cfg):
    policy, optimizer = trained_policy_and_optimizer(policy_cfg)
    counters = LearnerCounters(policy_version=17, updates=40, sim_samples=1234, real_samples=99, dropped_segments=3)
    path = save_checkpoint(tmp_path, policy, optimizer, counters, keep=3, extra={"note": "x"})
    assert path.name == "ckpt-0000000040" and (path / "policy").is_dir()

    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.counters == counters and ckpt.extra == {"note": "x"}
    # a fresh process: new policy (other init, no stats) and optimiser, then restore into them
    torch.manual_seed(1)
    fresh = make_policy(policy_cfg)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    assert not torch.equal(fresh.normalizer.action_std, policy.normalizer.action_std)
    ckpt.restore(fresh, fresh_optimizer)
    for (name, a), b in zip(policy.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(fresh.normalizer.action_mean, torch.arange(7, dtype=torch.float32) * 0.1)
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert restored["state"][0]["step"] == saved["state"][0]["step"] == 2
    for k in saved["state"]:
        assert torch.equal(saved["state"][k]["exp_avg_sq"], restored["state"][k]["exp_avg_sq"])

    # resuming continues the version numbering: the next checkpoint carries on from 17
    resumed = LearnerCounters(**{**ckpt.counters.__dict__, "policy_version": ckpt.counters.policy_version + 1,
                                 "updates": ckpt.counters.updates + 1})
    save_checkpoint(tmp_path, fresh, fresh_optimizer, resumed, keep=3)
    assert load_latest_checkpoint(tmp_path).counters.policy_version == 18


def test_with_an_ema_the_deployable_policy_is_the_ema_and_a_resume_gets_the_trained_weights(tmp_path, policy_cfg):
    policy, optimizer = trained_policy_and_optimizer(policy_cfg, steps=0)
    ema = make_ema(policy, 0.999)
    policy, optimizer = trained_policy_and_optimizer(policy_cfg, steps=3)  # same init (seed 0), then trained
    update_ema(ema, policy, 0.999, step=0)  # d = 0.1: the EMA sits between the two
    path = save_checkpoint(tmp_path, policy, optimizer, LearnerCounters(updates=5, ema_steps=1), ema=ema)
    deployed = load_policy(str(path / "policy"))  # what evaluations and the experiment read
    ckpt = load_latest_checkpoint(tmp_path)
    name = next(n for n, p in policy.named_parameters() if not torch.equal(p, dict(ema.named_parameters())[n]))
    assert torch.equal(dict(deployed.named_parameters())[name], dict(ema.named_parameters())[name])
    assert torch.equal(dict(ckpt.policy.named_parameters())[name], dict(policy.named_parameters())[name])
    assert torch.equal(dict(ckpt.ema.named_parameters())[name], dict(ema.named_parameters())[name])
    assert ckpt.counters.ema_steps == 1 and not any(p.requires_grad for p in ckpt.ema.parameters())
    # without an EMA the layout is as before: one policy/, no ema on load
    plain = save_checkpoint(tmp_path / "plain", policy, optimizer, LearnerCounters(updates=6))
    assert not (plain / "trained_policy").exists() and load_latest_checkpoint(tmp_path / "plain").ema is None


def test_keeps_last_k_and_ignores_partial_writes(tmp_path, policy_cfg):
    policy, optimizer = trained_policy_and_optimizer(policy_cfg, steps=1)
    assert load_latest_checkpoint(tmp_path) is None
    for updates in (10, 20, 30, 40):
        save_checkpoint(tmp_path, policy, optimizer, LearnerCounters(policy_version=updates, updates=updates), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000030", "ckpt-0000000040"]
    # a crash mid-save leaves a temp dir (and maybe a ckpt dir without meta.json): neither is loaded
    (tmp_path / ".tmp-ckpt-0000000050-123").mkdir()
    (tmp_path / "ckpt-0000000060").mkdir()
    assert load_latest_checkpoint(tmp_path).counters.updates == 40
    # saving twice at the same update replaces the checkpoint and cleans the temp dir up
    save_checkpoint(tmp_path, policy, optimizer, LearnerCounters(policy_version=41, updates=40), keep=5)
    assert load_latest_checkpoint(tmp_path).counters.policy_version == 41
    assert not list(tmp_path.glob(".tmp-*"))
