"""Filtered BC: segments joined into the successful episodes, the replay's chunk targets, and the update."""
import numpy as np
import pytest
import torch

from common.config import load_config
from common.policy import make_policy
from common.protocol import Message
from common.segment import SegmentSpec
from learner.checkpoint import LearnerCounters
from learner.cotrain import filtered_bc_update, make_optimizer, sft_inputs
from learner.ingest import segment_stream
from learner.success_replay import EpisodeAssembler, SuccessReplay
from learner.trainer import Trainer

T, K, H, EXEC, HW = 4, 2, 4, 2, (8, 8)
torch.set_num_threads(1)


def spec(steps=T):
    return SegmentSpec(steps=steps, image_hw=HW, token_len=6, state_dim=3, num_denoise_steps=K, chunk_size=H)


def segment(first_step: int, done=(), success=(), steps=T):
    """A segment whose chunk-step t is tagged with the global step number first_step + t: in its image,
    its state and every executed action (the chain's last element), so a test can read back where each
    stored row came from."""
    seg = spec(steps).empty()
    for t in range(steps):
        g = first_step + t
        seg["image"][t] = g % 256
        seg["state"][t] = g
        seg["chain"][t, -1] = g + np.arange(H)[:, None] / 10.0  # position i of chunk g: g + i/10
        seg["chain"][t, :-1] = -1.0  # earlier denoising steps: never a target
    for t in done:
        seg["done"][t] = 1
    for t in success:
        seg["success"][t] = 1
    return seg


def collect(max_chunks=100):
    out = []
    return out, EpisodeAssembler(EXEC, out.append, max_episode_chunks=max_chunks)


def test_a_success_spanning_segments_is_joined_with_the_executed_actions_in_order():
    out, asm = collect()
    asm.add("a", 0, segment(0, done=[1]))  # steps 0-1 end an episode the stream joined mid-way: not whole
    asm.add("a", 1, segment(4, done=[2], success=[2]))  # episode = steps 2..3 of seg 0, then 4, 5, 6
    assert len(out) == 1 and asm.episodes == 1 and asm.successes == 1
    ep = out[0]
    np.testing.assert_array_equal(ep.state[:, 0], [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(ep.image[:, 0, 0, 0], [2, 3, 4, 5, 6])
    # each chunk-step contributes its first EXEC positions, in execution order
    expected = [g + i / 10.0 for g in (2, 3, 4, 5, 6) for i in range(EXEC)]
    np.testing.assert_allclose(ep.actions[:, 0], expected, rtol=0, atol=1e-6)


def test_failures_are_not_kept_and_streams_do_not_mix():
    out, asm = collect()
    asm.add("a", 0, segment(0, done=[0]))
    asm.add("b", 0, segment(100, done=[0]))
    asm.add("a", 1, segment(4, done=[3]))  # a: steps 1..7 fail
    asm.add("b", 1, segment(104, done=[1], success=[1]))  # b: steps 101..105 succeed
    assert asm.episodes == 2 and asm.successes == 1
    np.testing.assert_array_equal(out[0].state[:, 0], [101, 102, 103, 104, 105])


def test_a_sequence_gap_discards_the_episode_it_cut():
    out, asm = collect()
    asm.add("a", 0, segment(0, done=[0]))
    asm.add("a", 2, segment(8, done=[1], success=[1]))  # seq 1 lost: 1..3 + 8..9 would be a splice
    assert out == [] and asm.discarded == 1
    asm.add("a", 3, segment(12, done=[1], success=[1]))  # the next whole episode (10..13) is kept
    assert len(out) == 1
    np.testing.assert_array_equal(out[0].state[:, 0], [10, 11, 12, 13])


def test_an_episode_longer_than_the_bound_is_dropped():
    out, asm = collect(max_chunks=5)
    asm.add("a", 0, segment(0, done=[0]))
    asm.add("a", 1, segment(4))
    asm.add("a", 2, segment(8, done=[0], success=[0]))  # 1..8 = 8 chunk-steps > 5
    assert out == [] and asm.discarded == 1


def test_replay_targets_continue_into_the_next_chunks_and_pad_past_the_end():
    out, asm = collect()
    asm.add("a", 0, segment(0, done=[0]))
    asm.add("a", 1, segment(4, done=[0], success=[0]))  # episode: steps 1, 2, 3, 4
    replay = SuccessReplay(capacity_chunks=100, exec_horizon=EXEC)
    replay.add(out[0])
    batch = replay.sample(64, H, np.random.default_rng(0))
    executed = [g + i / 10.0 for g in (1, 2, 3, 4) for i in range(EXEC)]  # 8 actions
    assert set(batch["state"][:, 0].tolist()) == {1.0, 2.0, 3.0, 4.0}  # every stored step gets drawn
    for row in range(64):
        t = int(batch["state"][row, 0]) - 1
        idx = t * EXEC + np.arange(H)
        np.testing.assert_allclose(batch["actions"][row, :, 0], [executed[min(i, 7)] for i in idx], atol=1e-6)
        np.testing.assert_array_equal(batch["action_pad"][row], idx >= 8)
        assert batch["image"][row, 0, 0, 0] == t + 1


def test_replay_keeps_the_newest_episodes_within_its_capacity():
    out, asm = collect()
    asm.add("a", 0, segment(0, done=[0]))
    for seq in range(1, 6):  # five successful episodes: steps 1..7, then 8..11, ..., 20..23
        asm.add("a", seq, segment(4 * seq, done=[3], success=[3]))
    replay = SuccessReplay(capacity_chunks=9, exec_horizon=EXEC)
    for ep in out:
        replay.add(ep)
    size = replay.size()
    assert size == {"episodes": 2, "chunks": 8, "added": 5}
    drawn = set(replay.sample(200, H, np.random.default_rng(1))["state"][:, 0].astype(int).tolist())
    assert drawn == set(range(16, 24))  # the last two episodes: steps 16..19 and 20..23


@pytest.mark.parametrize("meta, expected", [
    ({"env_index": 3, "env_seq": 7}, ("actor-1", 3, 7)),
    ({"env_index": "3", "env_seq": 7}, None), ({"env_index": 3, "env_seq": -1}, None), ({"env_index": True, "env_seq": 1}, None),
    ({"env_index": 3, "env_seq": 1.5}, None), ({"env_index": 3}, None), ({}, None),
])
def test_a_segment_stream_needs_both_numbers_as_non_negative_integers(meta, expected):
    assert segment_stream(Message(kind="segment", sender="actor-1", meta=meta)) == expected


# ---- the update ------------------------------------------------------------------------------------------

def tiny_cfg(*overrides):
    return load_config("config", ["policy=tiny", "device=cpu", "learner.rl_objective=filtered_bc",
                                  "learner.filtered_bc.batch_size=16", "learner.filtered_bc.min_episodes=1",
                                  "learner.real_batch_size=8", "learner.filtered_bc.lr_warmup_steps=0",
                                  "learner.filtered_bc.lr=1e-3", "learner.global_batch_size=2",
                                  "learner.micro_batch_size=2", *overrides])


def policy_segment(policy, first_step, done=(), success=(), seed=0):
    """A tiny-policy segment whose chains all end at one fixed normalised chunk (the 'successful' behaviour)."""
    p_spec = SegmentSpec(steps=T, image_hw=(16, 16), token_len=policy.token_len, state_dim=8,
                         num_denoise_steps=policy.num_denoise_steps, chunk_size=policy.chunk_size)
    rng = np.random.default_rng(seed + first_step)
    seg = p_spec.empty()
    seg["image"][:] = rng.integers(0, 256, seg["image"].shape, dtype=np.uint8)
    seg["tokens"][:] = policy.tokenize(["put the cube in the bowl"]).numpy()
    seg["state"][:] = rng.normal(size=seg["state"].shape)
    seg["chain"][:, -1] = 0.8
    for t in done:
        seg["done"][t] = 1
    for t in success:
        seg["success"][t] = 1
    return seg


def test_filtered_bc_fits_the_successful_actions_and_adds_the_real_term():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    policy = make_policy(cfg.policy)
    replay = SuccessReplay(1000, policy.exec_horizon)
    asm = EpisodeAssembler(policy.exec_horizon, replay.add, 100)
    for seq in range(4):
        asm.add("a", seq, policy_segment(policy, 4 * seq, done=[3], success=[3] if seq else []))
    assert replay.size()["episodes"] == 3
    optimizer = make_optimizer(policy, cfg.learner)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # filtered_bc.lr, not learner.lr
    rng = np.random.default_rng(0)
    probe = replay.sample(32, policy.chunk_size, np.random.default_rng(5))
    probe["actions"] = policy.to_env_actions(torch.as_tensor(probe["actions"]))
    policy.eval()
    with torch.no_grad():
        before = policy.sft_loss(*sft_inputs(policy, probe, "cpu"), generator=torch.Generator().manual_seed(0))
    drawn = []

    def real(n):
        drawn.append(n)
        from test_cotrain import make_real_batch
        return make_real_batch(policy, n)

    cfg.learner.filtered_bc.steps_per_update = 30
    stats = filtered_bc_update(policy, optimizer, cfg.learner, replay, real, rng)
    policy.eval()
    with torch.no_grad():
        after = policy.sft_loss(*sft_inputs(policy, probe, "cpu"), generator=torch.Generator().manual_seed(0))
    assert stats["train/optimizer_steps"] == 30 and drawn == [8] * 30 and stats["train/real_samples"] == 240
    assert "train/sft_loss" in stats and stats["train/loss_ratio"] > 0
    assert float(after) < 0.5 * float(before)


def test_trainer_joins_streamed_segments_and_trains_once_the_replay_is_ready():
    cfg = tiny_cfg("learner.use_real_data_co_training=false", "learner.filtered_bc.min_episodes=3",
                   "learner.filtered_bc.steps_per_update=3", "learner.filtered_bc.ema_decay=0")
    torch.manual_seed(0)
    policy = make_policy(cfg.policy)
    trainer = Trainer(cfg.learner, policy, LearnerCounters(), None, seed=0, device=torch.device("cpu"))
    before = [p.detach().clone() for p in policy.parameters()]
    for seq in range(2):  # a stream's first segment is joined mid-episode: one whole success per env, 2 < 3
        for env in range(2):
            trainer.add_segment(policy_segment(policy, 4 * seq, done=[3], success=[3]), 0, ("actor", env, seq))
    update = trainer.train_once()
    assert update.stats["train/optimizer_steps"] == 0.0 and update.stats["replay/success_episodes"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    trainer.add_segment(policy_segment(policy, 8, done=[3], success=[3]), 0, ("actor", 0, 2))
    trainer.add_segment(policy_segment(policy, 8, done=[3]), 0, ("actor", 1, 2))  # a failure: not kept
    update = trainer.train_once()
    assert update.stats["train/optimizer_steps"] == 3.0 and update.stats["replay/success_episodes"] == 3
    assert update.stats["replay/assembled_episodes"] == 4
    # filtered BC learns from every joined chunk-step, not only the batches it paces its updates by
    assert trainer.counters.sim_samples == 6 * T
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("decay", [0.999, 0.0])
def test_the_deployed_policy_is_an_ema_of_the_trained_weights_when_filtered_bc_keeps_one(decay):
    cfg = tiny_cfg("learner.use_real_data_co_training=false", "learner.filtered_bc.steps_per_update=4",
                   f"learner.filtered_bc.ema_decay={decay}")
    torch.manual_seed(0)
    policy = make_policy(cfg.policy)
    start = [p.detach().clone() for p in policy.parameters()]
    trainer = Trainer(cfg.learner, policy, LearnerCounters(), None, seed=0, device=torch.device("cpu"))
    for seq in range(2):
        trainer.add_segment(policy_segment(policy, 4 * seq, done=[3], success=[3]), 0, ("actor", 0, seq))
    assert trainer.train_once().stats["train/optimizer_steps"] == 4.0
    deployed = list(trainer.deployed_policy.parameters())
    if decay == 0:
        assert trainer.ema is None and trainer.deployed_policy is policy and trainer.counters.ema_steps == 0
        return
    assert trainer.deployed_policy is trainer.ema and trainer.counters.ema_steps == 4
    moved = [i for i, (a, b) in enumerate(zip(start, policy.parameters())) if not torch.equal(a, b)]
    assert moved
    # the EMA lags the trained weights: off both ends, nearer the start than the raw weights are (Adam's first
    # steps all move ~lr in one direction, so the averaged iterates trail the last one)
    raw = torch.cat([list(policy.parameters())[i].detach().flatten() for i in moved])
    s0, e = torch.cat([start[i].flatten() for i in moved]), torch.cat([deployed[i].flatten() for i in moved])
    assert not torch.equal(e, raw) and not torch.equal(e, s0)
    assert float((e - s0).norm()) < float((raw - s0).norm())


def test_ppo_refuses_a_policy_with_no_stochastic_step():
    cfg = tiny_cfg("learner.rl_objective=ppo", "policy.noise.stochastic_steps=none")
    with pytest.raises(ValueError, match="stochastic_steps=none"):
        Trainer(cfg.learner, make_policy(cfg.policy), LearnerCounters(), None, seed=0, device=torch.device("cpu"))
    cfg = tiny_cfg("policy.noise.stochastic_steps=none")  # filtered BC samples the ODE: fine
    assert Trainer(cfg.learner, make_policy(cfg.policy), LearnerCounters(), None, seed=0,
                   device=torch.device("cpu")).objective == "filtered_bc"
