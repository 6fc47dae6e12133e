"""Data-parallel learner (learner/distributed.py): two gloo ranks on the CPU update the weights
exactly as one process does on the same data, co-training SFT term included."""
import faulthandler
import math
import os
import socket
import types
import weakref

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from common.config import load_config
from common.policy import make_policy
from common.segment import SegmentSpec
from learner import distributed
from learner.batcher import Batcher
from learner.cotrain import train_step
from numeric import assert_close_to_norm

T, IMAGE_HW, SEGMENTS, REAL = 3, (16, 16), 4, 4
WEIGHT_ATOL = 1e-5
# a hang fails fast and says where instead of waiting for pytest's timeout: a rank stuck in a collective
# raises after IDLE_TIMEOUT_S (the default, a day, is for rank 0 waiting for actors); one stuck anywhere
# else (e.g. a teardown deadlock, GIL held) dumps every thread's Python stack and exits after RANK_DEADLINE_S
# (faulthandler's watchdog needs no GIL)
IDLE_TIMEOUT_S, RANK_DEADLINE_S = 120, 300  # both well below pytest's 600 s, above a loaded CI's worst
OVERRIDES = ["policy=tiny", "device=cpu", f"learner.global_batch_size={SEGMENTS}", f"learner.micro_batch_size={SEGMENTS}",
             f"learner.real_batch_size={REAL}", "learner.update_epoch=2"]


def new_policy(cfg):
    torch.manual_seed(0)
    policy = make_policy(cfg.policy)
    policy.sft_loss = types.MethodType(seeded_sft_loss, policy)  # a bound method: deepcopy rebinds it
    return policy


def seeded_sft_loss(self, obs, actions, action_pad=None):
    # flow-matching noise and times from a seed fixed by the data, so that the draws of one
    # process and of two ranks agree sample for sample
    torch.manual_seed(int(actions.abs().sum().item() * 1000) % 2**31)
    return type(self).sft_loss(self, obs, actions, action_pad)


@torch.no_grad()
def sim_batch(policy):
    spec = SegmentSpec(steps=T, image_hw=IMAGE_HW, token_len=policy.token_len, state_dim=8,
                       num_denoise_steps=policy.num_denoise_steps, chunk_size=policy.chunk_size)
    batcher = Batcher(SEGMENTS, max_policy_lag=4, max_queued_segments=SEGMENTS)
    for i in range(SEGMENTS):
        rng = np.random.default_rng(i)
        seg = spec.empty()
        seg["image"][:] = rng.integers(0, 256, seg["image"].shape, dtype=np.uint8)
        seg["tokens"][:] = policy.tokenize(["put the cube in the bowl"]).numpy()
        seg["state"][:] = rng.normal(size=seg["state"].shape)
        obs = {"image": torch.from_numpy(seg["image"][:T]), "tokens": torch.from_numpy(seg["tokens"][:T]).long(),
               "state": torch.from_numpy(seg["state"][:T])}
        out = policy.sample(obs, generator=torch.Generator().manual_seed(i))
        seg["chain"][:], seg["behaviour_logp"][:], seg["behaviour_value"][:] = (out.chain.numpy(), out.log_prob.numpy(),
                                                                           out.value.numpy())
        seg["reward"][:] = rng.normal(size=T)
        seg["done"][:] = rng.random(T) < 0.3
        batcher.add(seg, policy_version=0, current_version=0)
    return batcher.next_batch(current_version=0)


class SequentialReplay:
    """Hands out distinct real samples in order, as many as asked: whoever draws first gets the first."""

    def __init__(self, chunk_size, total=64):
        rng = np.random.default_rng(1)
        self.data = {"image": rng.integers(0, 256, (total, *IMAGE_HW, 3), dtype=np.uint8),
                     "state": rng.normal(size=(total, 8)).astype(np.float32),
                     "actions": rng.normal(size=(total, chunk_size, 7)).astype(np.float32),
                     "action_pad": np.zeros((total, chunk_size), bool), "task": ["put the cube in the bowl"] * total}
        self.next = 0

    def sample(self, batch_size, chunk_size, generator=None):
        rows = slice(self.next, self.next + batch_size)
        self.next += batch_size
        return {k: v[rows] for k, v in self.data.items()}


def optimizer_for(policy):
    return torch.optim.SGD(policy.parameters(), lr=0.1)  # SGD: weight differences are gradient differences


def reference(co_train: bool, micro_batch_size: int):
    """One process: ``cotrain.train_step`` on the whole batch in micro-batches of one rank's shard."""
    cfg = load_config("config", OVERRIDES)
    lcfg = OmegaConf.merge(cfg.learner, {"micro_batch_size": micro_batch_size, "use_real_data_co_training": co_train})
    policy = new_policy(cfg)
    optimizer = optimizer_for(policy)
    batch = sim_batch(policy)
    stats = train_step(policy, optimizer, batch, lcfg, SequentialReplay(policy.chunk_size))
    return policy, stats


def _rank(rank, world_size, port, co_train, strategy, out_dir):
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(RANK_DEADLINE_S, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config("config", OVERRIDES + [f"learner.distributed.strategy={strategy}",
                                             f"learner.distributed.idle_timeout_s={IDLE_TIMEOUT_S}"])
    ctx = distributed.init(cfg.learner.distributed, "cpu")
    trainer = None
    try:
        policy = new_policy(cfg)
        trainer = distributed.DataParallelTrainer(policy, optimizer_for, cfg.learner, ctx)
        if rank == 0:
            stats = trainer.lead(sim_batch(policy), co_train, SequentialReplay(policy.chunk_size))
            trainer.stop_followers()
        else:
            stats = {"updates": trainer.follow()}
        torch.save({"weights": policy.state_dict(), "stats": stats,
                    "grads": {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
                    if strategy == "ddp" else {}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown(ctx, trainer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy,co_train", [("ddp", True), ("ddp", False), ("fsdp", True)])
def test_two_ranks_update_like_one_process(tmp_path, strategy, co_train):
    mp.spawn(_rank, args=(2, free_port(), co_train, strategy, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1]["stats"] == {"updates": 1}
    policy, expected = reference(co_train, micro_batch_size=SEGMENTS // 2)
    initial = new_policy(load_config("config", OVERRIDES)).state_dict()
    # ddp: both replicas hold the weights; fsdp: rank 0's full copy was gathered from the shards
    replicas = [0, 1] if strategy == "ddp" else [0]
    moved = 0
    for name, want in policy.state_dict().items():
        for r in replicas:
            torch.testing.assert_close(ranks[r]["weights"][name], want, atol=WEIGHT_ATOL, rtol=0, msg=f"rank {r}: {name}")
        moved += int(not torch.equal(want, initial[name]))
    assert moved > 10  # the update did change the weights
    if strategy == "ddp":
        for name, p in policy.named_parameters():
            if p.grad is not None:
                assert_close_to_norm(ranks[0]["grads"][name], p.grad, rel=1e-4, msg=name)
    got = ranks[0]["stats"]
    for key in ("train/ppo_loss", "train/value_loss", "actor/total_loss", "train/loss_ratio", "train/ratio_max",
                "train/ratio_min", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    if co_train:
        assert got["train/sft_loss"] == pytest.approx(expected["train/sft_loss"], rel=1e-4)
        assert got["train/real_samples"] == expected["train/real_samples"] == 2 * REAL  # two epochs
    else:
        assert "train/sft_loss" not in got


def _rank_with_nan_on_rank1(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(RANK_DEADLINE_S, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config("config", OVERRIDES + [f"learner.distributed.idle_timeout_s={IDLE_TIMEOUT_S}"])
    ctx = distributed.init(cfg.learner.distributed, "cpu")
    trainer = None
    try:
        agree = [distributed.any_rank(rank == 1, ctx.data_group), distributed.any_rank(False, ctx.data_group)]
        policy = new_policy(cfg)
        trainer = distributed.DataParallelTrainer(policy, optimizer_for, cfg.learner, ctx)
        if rank == 0:
            poisoned = sim_batch(policy)
            poisoned["reward"][0, -1] = float("nan")  # the last segment: in rank 1's shard only
            stats = [trainer.lead(poisoned, False), trainer.lead(sim_batch(policy), False)]
            trainer.stop_followers()
        else:
            stats = trainer.follow()
        torch.save({"weights": policy.state_dict(), "stats": stats, "agree": agree}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown(ctx, trainer)


def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    mp.spawn(_rank_with_nan_on_rank1, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["agree"] for r in ranks] == [[True, False], [True, False]]
    poisoned, clean = ranks[0]["stats"]
    assert poisoned["train/skipped_nonfinite_steps"] == 2 and poisoned["train/epochs_done"] == 0  # both epochs
    assert clean["train/skipped_nonfinite_steps"] == 0 and clean["train/epochs_done"] == 2
    assert ranks[1]["stats"] == 2  # the follower took part in both updates
    # the skipped update left no trace: the weights are those of the clean update alone, on both ranks
    policy, _ = reference(co_train=False, micro_batch_size=SEGMENTS // 2)
    parameters = {n for n, _ in policy.named_parameters()}  # buffers: normaliser bounds may be inf by design
    for name, want in policy.state_dict().items():
        for r in (0, 1):
            got = ranks[r]["weights"][name]
            assert name not in parameters or torch.isfinite(got).all(), (r, name)
            torch.testing.assert_close(got, want, atol=WEIGHT_ATOL, rtol=0, msg=f"rank {r}: {name}")
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name


def test_shards_and_real_samples_per_rank():
    lcfg = load_config("config", OVERRIDES + ["learner.global_batch_size=8", "learner.micro_batch_size=3",
                                              "learner.real_batch_size=6"]).learner
    rank_cfg = distributed.per_rank_config(lcfg, 2)
    assert (rank_cfg.global_batch_size, rank_cfg.micro_batch_size, rank_cfg.real_batch_size) == (4, 3, 3)
    assert distributed.real_sample_plan(rank_cfg, 4) == [math.ceil(3 * 3 / 4), math.ceil(3 * 1 / 4)]
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        distributed.per_rank_config(lcfg, 3)


def test_shutdown_frees_the_ddp_wrapper_before_it_destroys_the_group(monkeypatch):
    """DDP's Reducer must not hold the last reference to the group: its destructor would then run
    ProcessGroupGloo's with the GIL held and can deadlock the rank (see ``distributed.shutdown``)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        cfg = load_config("config", OVERRIDES)
        ctx = distributed.Context(0, 1, torch.device("cpu"), torch.distributed.group.WORLD)
        trainer = distributed.DataParallelTrainer(new_policy(cfg), optimizer_for, cfg.learner, ctx)
        wrapper = weakref.ref(trainer.model)
        destroy, alive_at_destroy = torch.distributed.destroy_process_group, []
        monkeypatch.setattr(torch.distributed, "destroy_process_group",
                            lambda: (alive_at_destroy.append(wrapper() is not None), destroy()))
        distributed.shutdown(ctx, trainer)
        assert alive_at_destroy == [False] and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
