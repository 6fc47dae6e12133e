"""Co-training loss, optimisation step, batcher (policy lag) and metrics."""
import logging
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.config import load_config
from common.device import autocast
from common.policy import make_policy
from common.segment import SegmentSpec
from learner.batcher import Batcher
from learner.cotrain import cotrain_loss, loss_ratio, make_optimizer, reduce_stats, sft_inputs, split_segments, \
    train_step, with_loss_ratio
from learner.metrics import LossRatioMonitor, MetricsWriter
from learner.ppo import ppo_loss
from numeric import assert_close_to_norm, relative_error

T, IMAGE_HW = 3, (16, 16)
torch.set_num_threads(1)


def make_cfg(*overrides):
    cfg = load_config("config", ["policy=tiny", "device=cpu", "learner.global_batch_size=4",
                                 "learner.micro_batch_size=4", "learner.real_batch_size=4", *overrides])
    return cfg


@pytest.fixture(scope="module")
def cfg():
    return make_cfg()


def new_policy(cfg, seed=0):
    torch.manual_seed(seed)
    return make_policy(cfg.policy)


def spec_for(policy):
    return SegmentSpec(steps=T, image_hw=IMAGE_HW, token_len=policy.token_len, state_dim=8,
                       num_denoise_steps=policy.num_denoise_steps, chunk_size=policy.chunk_size)


@torch.no_grad()
def make_segment(policy, seed):
    """A segment as an actor would send it: chains, log-probs and values from ``policy.sample``."""
    rng = np.random.default_rng(seed)
    seg = spec_for(policy).empty()
    seg["image"][:] = rng.integers(0, 256, seg["image"].shape, dtype=np.uint8)
    seg["tokens"][:] = policy.tokenize(["put the cube in the bowl"]).numpy()
    seg["state"][:] = rng.normal(size=seg["state"].shape)
    obs = {"image": torch.from_numpy(seg["image"][:T]), "tokens": torch.from_numpy(seg["tokens"][:T]).long(),
           "state": torch.from_numpy(seg["state"][:T])}
    out = policy.sample(obs, generator=torch.Generator().manual_seed(seed))
    seg["chain"][:] = out.chain.numpy()
    seg["behaviour_logp"][:] = out.log_prob.numpy()
    seg["behaviour_value"][:] = out.value.float().numpy()  # bf16 under autocast, as the server writes it
    seg["reward"][:] = rng.normal(size=T)
    seg["done"][:] = rng.random(T) < 0.3
    return seg


def make_sim_batch(policy, num_segments, seed=0):
    batcher = Batcher(num_segments, max_policy_lag=4, max_queued_segments=num_segments)
    for i in range(num_segments):
        batcher.add(make_segment(policy, seed + i), policy_version=0, current_version=0)
    return batcher.next_batch(current_version=0)


def make_real_batch(policy, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    H = policy.chunk_size
    pad = np.zeros((batch_size, H), bool)
    pad[0, H // 2:] = True
    return {"image": rng.integers(0, 256, (batch_size, *IMAGE_HW, 3), dtype=np.uint8),
            "state": rng.normal(size=(batch_size, 8)).astype(np.float32),
            "actions": rng.normal(size=(batch_size, H, 7)).astype(np.float32),
            "action_pad": pad, "task": ["put the cube in the bowl"] * batch_size}


class FixedReplay:
    def __init__(self, batch):
        self.batch, self.calls = batch, 0

    def sample(self, batch_size, chunk_size, generator=None):
        self.calls += 1
        return {k: v[:batch_size] for k, v in self.batch.items()}


class ExplodingReplay:
    def sample(self, *args, **kwargs):
        raise AssertionError("co-training is off: no real batch may be drawn")


# ---- the loss combination ---------------------------------------------------------------------
def test_total_is_rl_plus_weighted_sft_exactly(cfg):
    policy = new_policy(cfg)
    sim, real = make_sim_batch(policy, 2), make_real_batch(policy, 4)
    torch.manual_seed(123)
    out = cotrain_loss(policy, sim, real, cfg.learner)
    rl = ppo_loss(policy, sim, cfg.learner)  # deterministic: no noise in evaluate/value
    torch.manual_seed(123)  # the same flow-matching noise and times as inside cotrain_loss
    sft = policy.sft_loss(*sft_inputs(policy, real, "cpu"))
    assert cfg.learner.sft_loss_weight == 0.2
    assert torch.equal(out.rl, rl.loss)
    assert torch.equal(out.sft, sft)
    assert torch.equal(out.total, rl.loss + 0.2 * sft)
    assert out.stats["actor/total_loss"].item() == out.total.item()
    assert out.stats["train/sft_loss"].item() == sft.item() > 0
    assert out.stats["train/ppo_loss"].item() == rl.policy_loss.item()
    # rl_loss itself is the PPO surrogate + vf_coef * value loss - entropy_bonus * entropy
    c = cfg.learner
    expected_rl = rl.policy_loss + c.vf_coef * rl.value_loss - c.entropy_bonus * rl.entropy
    torch.testing.assert_close(rl.loss, expected_rl)


def test_plain_ppo_without_co_training():
    cfg = make_cfg("learner.use_real_data_co_training=false")
    policy = new_policy(cfg)
    sim = make_sim_batch(policy, 2)
    out = cotrain_loss(policy, sim, None, cfg.learner)
    assert out.sft is None and torch.equal(out.total, out.rl)
    assert "train/sft_loss" not in out.stats
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4)
    stats = train_step(policy, optimizer, sim, cfg.learner, real_replay=ExplodingReplay())
    assert stats["train/loss_ratio"] == 0.0
    assert stats["actor/total_loss"] == pytest.approx(stats["train/rl_loss"])


def test_loss_ratio_definition(cfg):
    assert loss_ratio(0.2, -3.0, 0.5, 1e-8) == pytest.approx(0.2 * 3.0 / 0.5)
    # L_RL == 0: |L_RL| is clamped below by eps, so the ratio is finite and large (an alarm, not a nan)
    r = loss_ratio(0.2, 1.0, 0.0, 1e-8)
    assert math.isfinite(r) and r == pytest.approx(0.2 / 1e-8)
    assert loss_ratio(0.2, 0.0, 0.0, 1e-8) == 0.0
    stats = [{"train/rl_loss": torch.tensor(0.0), "train/sft_loss": torch.tensor(2.0),
              "train/ratio_max": torch.tensor(1.5), "train/ratio_min": torch.tensor(0.5)},
             {"train/rl_loss": torch.tensor(0.0), "train/sft_loss": torch.tensor(4.0),
              "train/ratio_max": torch.tensor(3.0), "train/ratio_min": torch.tensor(0.9)}]
    reduced = with_loss_ratio(reduce_stats(stats, [0.5, 0.5]), cfg.learner)
    assert reduced["train/sft_loss"] == pytest.approx(3.0)
    assert reduced["train/ratio_max"] == 3.0 and reduced["train/ratio_min"] == 0.5
    assert reduced["train/loss_ratio"] == pytest.approx(0.2 * 3.0 / cfg.learner.loss_ratio_eps)


def test_first_update_is_on_policy(cfg):
    """Segments sampled by the same weights: importance ratios are 1, nothing is clipped."""
    policy = new_policy(cfg)
    out = ppo_loss(policy, make_sim_batch(policy, 2), cfg.learner)
    assert out.stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert out.stats["clip_fraction"].item() == 0.0
    assert abs(out.stats["approx_kl"].item()) < 1e-6


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    cfg = make_cfg("learner.use_real_data_co_training=false", "learner.normalize_advantages=false")
    grads = []
    for micro in (4, 1):
        policy = new_policy(cfg)
        sim = make_sim_batch(policy, 4)
        c = OmegaConf.merge(cfg.learner, {"micro_batch_size": micro, "clip_grad": 1e9})
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        train_step(policy, optimizer, sim, c)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert_close_to_norm(grads[1], grads[0], rel=1e-4)
    # a missing share factor (4 micro-batches summed, not averaged) would be a 300% error
    assert relative_error(4 * grads[1], grads[0]) > 1.0


def test_optimisation_steps_reduce_the_co_training_loss(cfg):
    policy = new_policy(cfg)
    sim, real = make_sim_batch(policy, 4, seed=10), make_real_batch(policy, 4, seed=10)
    # small lr: a chain's log-prob sums K*H*7 Gaussian dims, so larger steps push every ratio out of the clip range
    c = OmegaConf.merge(cfg.learner, {"lr": 3e-5})
    optimizer = make_optimizer(policy, c)

    def fixed_noise_total():
        torch.manual_seed(7)
        with torch.no_grad():
            return cotrain_loss(policy, sim, real, c)

    before = fixed_noise_total()
    replay = FixedReplay(real)
    for _ in range(15):
        stats = train_step(policy, optimizer, sim, c, real_replay=replay, rng=np.random.default_rng(0))
    after = fixed_noise_total()
    assert replay.calls == 15
    assert after.total.item() < before.total.item()
    assert after.sft.item() < before.sft.item()
    assert after.stats["train/ppo_loss"].item() < before.stats["train/ppo_loss"].item() - 0.05
    assert after.stats["train/value_loss"].item() < before.stats["train/value_loss"].item()
    for name in ("train/ppo_loss", "train/sft_loss", "actor/total_loss", "train/loss_ratio", "train/value_loss",
                 "train/entropy", "train/approx_kl", "train/clip_fraction", "train/ratio_mean", "train/ratio_max"):
        assert math.isfinite(stats[name]), name


# ---- batcher -----------------------------------------------------------------------------------
def small_segment(value=0.0):
    seg = SegmentSpec(steps=2, image_hw=(4, 4), token_len=3, state_dim=8, num_denoise_steps=1, chunk_size=2).empty()
    seg["reward"][:] = value
    return seg


def test_batcher_drops_stale_segments_and_reports_lag():
    b = Batcher(num_segments_per_batch=2, max_policy_lag=2, max_queued_segments=8)
    assert b.add(small_segment(1), policy_version=10, current_version=10)
    assert b.add(small_segment(2), policy_version=8, current_version=10)  # lag 2: kept
    assert not b.add(small_segment(3), policy_version=7, current_version=10)  # lag 3: dropped
    assert b.dropped_stale == 1 and b.queue_depth == 2
    batch = b.next_batch(current_version=10)
    assert batch["reward"].shape == (2, 2) and batch["image"].shape == (3, 2, 4, 4, 3)
    assert batch["done"].dtype == torch.float32 and batch["tokens"].dtype == torch.int64
    assert batch["reward"][0].tolist() == [1.0, 2.0]  # FIFO, stacked along dim 1
    assert batch["policy_lag"].tolist() == [0, 2]
    stats = b.stats()
    assert stats["policy_lag/mean"] == 1.0 and stats["policy_lag/max"] == 2.0
    assert stats["batcher/dropped_stale_segments"] == 1.0 and stats["batcher/queue_depth"] == 0.0
    assert b.lag_histogram().tolist() == [1, 0, 1]


def test_batcher_drops_segments_that_aged_in_the_queue():
    b = Batcher(num_segments_per_batch=2, max_policy_lag=1, max_queued_segments=8)
    b.add(small_segment(), policy_version=5, current_version=5)
    b.add(small_segment(), policy_version=6, current_version=6)
    assert b.next_batch(current_version=7) is None  # version 5 is now lag 2: dropped, one left
    assert b.dropped_stale == 1 and b.queue_depth == 1
    b.add(small_segment(), policy_version=7, current_version=7)
    assert b.next_batch(current_version=7)["policy_lag"].tolist() == [1, 0]


def test_batcher_bounds_its_queue():
    b = Batcher(num_segments_per_batch=1, max_policy_lag=1, max_queued_segments=2)
    for i in range(3):
        b.add(small_segment(i), policy_version=0, current_version=0)
    assert b.dropped_overflow == 1 and b.queue_depth == 2
    assert b.next_batch(0)["reward"][0, 0].item() == 1.0  # the oldest (0) was dropped


# ---- metrics -----------------------------------------------------------------------------------
def test_tensorboard_event_file_has_the_co_training_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path)
    for step in range(3):
        writer.log({"train/ppo_loss": 0.1 * step, "train/sft_loss": 1.0, "actor/total_loss": 1.2,
                    "train/loss_ratio": 2.0, "train/skipped": float("nan")}, step)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ppo_loss", "train/sft_loss", "actor/total_loss", "train/loss_ratio"} <= tags
    assert "train/skipped" not in tags and writer.skipped_non_finite == 3
    assert [e.value for e in acc.Scalars("train/ppo_loss")] == pytest.approx([0.0, 0.1, 0.2])


def test_loss_ratio_monitor_warns_after_patience(caplog):
    monitor = LossRatioMonitor(threshold=1e5, patience=3)
    with caplog.at_level(logging.WARNING):
        assert [monitor.update(r) for r in (2e5, 2e5, 1.0, 2e5, 2e5)] == [False] * 5  # streak broken
        assert monitor.update(2e5)  # third consecutive
        assert not monitor.update(2e5)
    assert sum("loss_ratio" in r.message for r in caplog.records) == 1


def test_actor_and_critic_learning_rates_and_a_frozen_encoder():
    cfg = make_cfg("learner.value_lr=2e-3", "learner.freeze_encoder=true")
    policy = new_policy(cfg)
    optimizer = make_optimizer(policy, cfg.learner)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["actor"]["lr"] == cfg.learner.lr and groups["critic"]["lr"] == 2e-3
    critic = {id(p) for p in policy.value_head.parameters()}
    assert {id(p) for p in groups["critic"]["params"]} == critic
    assert not any(p.requires_grad for p in policy.encoder.parameters())
    assert not {id(p) for p in policy.encoder.parameters()} & {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_actor_lr_warms_up_over_its_first_optimiser_steps():
    """Adam's first step moves each weight by exactly lr (m/sqrt(v) = sign(g)); the warm-up scales it."""
    cfg = make_cfg("learner.use_real_data_co_training=false", "learner.lr=1e-3", "learner.value_lr=2e-3")
    first_move = {}
    for warmup in (0, 4):
        lcfg = OmegaConf.merge(cfg.learner, {"actor_lr_warmup_steps": warmup, "update_epoch": 1})
        policy = new_policy(cfg)
        optimizer = make_optimizer(policy, lcfg)
        sim = make_sim_batch(policy, 2)
        train_step(policy, optimizer, sim, lcfg, critic_only=True)  # critic steps do not count for the actor
        before = {n: p.detach().clone() for n, p in policy.expert.named_parameters()}
        stats = train_step(policy, optimizer, sim, lcfg)
        first_move[warmup] = max(float((p.detach() - before[n]).abs().max()) for n, p in policy.expert.named_parameters())
        groups = {g["name"]: g for g in optimizer.param_groups}
        assert groups["critic"]["lr"] == 2e-3
        assert stats["train/lr"] == pytest.approx(1e-3 if warmup == 0 else 1e-3 / 4)
        lrs = [train_step(policy, optimizer, sim, lcfg)["train/lr"] for _ in range(4)]
        assert lrs == pytest.approx([1e-3] * 4 if warmup == 0 else [2e-3 / 4, 3e-3 / 4, 1e-3, 1e-3])
    assert first_move[0] == pytest.approx(1e-3, rel=1e-3)
    assert first_move[4] == pytest.approx(1e-3 / 4, rel=1e-3)


def test_critic_only_updates_move_the_value_head_alone():
    cfg = make_cfg("learner.use_real_data_co_training=false")
    policy = new_policy(cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = make_optimizer(policy, cfg.learner)
    train_step(policy, optimizer, make_sim_batch(policy, 2), cfg.learner, critic_only=True)
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("value_head.", "encoder.")) for n in moved), moved
    assert any(n.startswith("value_head.") for n in moved)
    assert not any(n.startswith("expert.") for n in moved)  # the actor's head did not move


def test_target_kl_stops_the_epochs_of_an_update():
    cfg = make_cfg("learner.use_real_data_co_training=false", "learner.update_epoch=4")
    sim = None
    done, stats = {}, {}
    for target in (None, 1e-12):
        policy = new_policy(cfg)
        sim = make_sim_batch(policy, 2)
        c = OmegaConf.merge(cfg.learner, {"target_kl": target, "lr": 1e-3})
        stats[target] = train_step(policy, make_optimizer(policy, c), sim, c)
        done[target] = stats[target]["train/epochs_done"]
    assert done[None] == 4.0
    assert done[1e-12] == 1.0  # the first epoch always steps; the second is already past a tiny KL
    # the applied step's forward pass was on-policy; the stopping pass's KL is reported on its own
    assert abs(stats[1e-12]["train/approx_kl"]) < 1e-6
    assert stats[1e-12]["train/approx_kl_last"] > 1e-12
    assert stats[None]["train/approx_kl_last"] > abs(stats[None]["train/approx_kl"]) / 4  # the last of 4 passes


def test_minibatches_are_sequential_steps_on_parts_of_the_batch():
    """num_minibatches=2 over 4 segments: two optimiser steps, the same as two updates on the halves."""
    cfg = make_cfg("learner.use_real_data_co_training=false", "learner.micro_batch_size=1")
    lcfg = OmegaConf.merge(cfg.learner, {"lr": 1e-3})
    policy, reference = new_policy(cfg), new_policy(cfg)
    sim = make_sim_batch(policy, 4)
    stats = train_step(policy, make_optimizer(policy, OmegaConf.merge(lcfg, {"num_minibatches": 2})), sim,
                       OmegaConf.merge(lcfg, {"num_minibatches": 2}))
    assert (stats["train/optimizer_steps"], stats["train/epochs_done"]) == (2.0, 1.0)
    optimizer = make_optimizer(reference, lcfg)
    halves = split_segments(sim, 2)
    for half in halves:
        train_step(reference, optimizer, half, lcfg)
    initial = new_policy(cfg).state_dict()
    moved = 0
    for name, want in reference.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], want, atol=1e-6, rtol=0, msg=name)
        moved += int(not torch.equal(want, initial[name]))
    assert moved > 10
    with pytest.raises(ValueError, match="num_minibatches=5"):
        train_step(policy, optimizer, sim, OmegaConf.merge(lcfg, {"num_minibatches": 5}))


def test_target_kl_stops_at_a_minibatch_step():
    cfg = make_cfg("learner.use_real_data_co_training=false", "learner.micro_batch_size=1", "learner.update_epoch=2",
                   "learner.num_minibatches=2")
    policy = new_policy(cfg)
    c = OmegaConf.merge(cfg.learner, {"target_kl": 1e-12, "lr": 1e-3})
    stats = train_step(policy, make_optimizer(policy, c), make_sim_batch(policy, 4), c)
    assert stats["train/optimizer_steps"] == 1.0  # the first step always steps; the second is past a tiny KL


def test_segment_value_checks_name_each_fault():
    from common.segment import check_segment_values

    policy = new_policy(make_cfg())
    vocab = policy.tokenizer.vocab_size
    good = make_segment(policy, 0)
    assert check_segment_values(good, vocab) is None
    faults = {
        "token_out_of_vocab": ("tokens", lambda a: a.__setitem__((0, 0), vocab)),
        "non_finite_reward": ("reward", lambda a: a.__setitem__(0, np.nan)),
        "non_finite_chain": ("chain", lambda a: a.__setitem__((0, 0, 0, 0), np.inf)),
        "non_finite_state": ("state", lambda a: a.__setitem__((1, 2), np.nan)),
        "bad_flag_done": ("done", lambda a: a.__setitem__(0, 2)),
    }
    for reason, (name, corrupt) in faults.items():
        seg = {k: v.copy() for k, v in good.items()}
        corrupt(seg[name])
        assert check_segment_values(seg, vocab) == reason
    seg = {k: v.copy() for k, v in good.items()}
    seg["done"][:] = 0
    seg["success"][0] = 1
    assert check_segment_values(seg, vocab) == "success_without_done"


def test_a_non_finite_update_is_skipped_and_leaves_the_weights_finite():
    cfg = make_cfg("learner.use_real_data_co_training=false")
    policy = new_policy(cfg)
    sim = make_sim_batch(policy, 2)
    sim["reward"][0, 0] = float("nan")  # what value validation keeps out; the train step must survive it anyway
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats = train_step(policy, make_optimizer(policy, cfg.learner), sim, cfg.learner)
    assert stats["train/skipped_nonfinite_steps"] == cfg.learner.update_epoch
    assert stats["train/epochs_done"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_bf16_rollouts_are_on_policy_for_a_bf16_learner():
    """learner.autocast_dtype=bfloat16 (and the actors' server with it, by interpolation): segments
    sampled under bf16 autocast are on-policy for the learner's first epoch, ratios within 5 % (a
    quarter of PPO's 0.2 clip). The same segments against a float32 learner are not."""
    cfg = make_cfg("learner.autocast_dtype=bfloat16", "learner.use_real_data_co_training=false")
    assert cfg.actor.server.autocast_dtype == "bfloat16"
    policy = new_policy(cfg)
    with autocast(torch.device("cpu"), torch.bfloat16):
        batch = make_sim_batch(policy, 2)
    ratios = {}
    for dtype in ("bfloat16", None):
        lcfg = OmegaConf.merge(cfg.learner, {"autocast_dtype": dtype, "lr": 0.0, "value_lr": 0.0})
        learner = new_policy(cfg)
        stats = train_step(learner, make_optimizer(learner, lcfg), batch, lcfg)
        ratios[dtype] = (stats["train/ratio_min"], stats["train/ratio_max"])
    assert 0.95 <= ratios["bfloat16"][0] <= ratios["bfloat16"][1] <= 1.05, ratios
    assert not 0.95 <= ratios[None][0] <= ratios[None][1] <= 1.05, ratios
