"""The learner's train side: batches out of the batcher, one V-trace PPO (+ SFT co-training) update each,
or with ``learner.rl_objective: filtered_bc`` one filtered-BC update (``learner/success_replay.py``) per batch.

``Trainer`` owns what an update needs (policy, optimiser, batcher and its lock, real replay, rng,
counters) and each update's bookkeeping (policy-lag histogram, samples/s, the loss-ratio alarm,
non-finite skips). Its ``step`` trains on one batch: ``cotrain.train_step`` on one process;
``learner.distributed.make_leader`` supplies rank 0's data-parallel step instead. ``train_once``
returns the update's statistics and whether it made a new weight version; publishing, logging and
checkpoints are the caller's (``learner.main.Learner``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from learner.batcher import Batcher
from learner.checkpoint import LearnerCounters
from learner.cotrain import filtered_bc_update, make_optimizer, train_step
from learner.ema import make_ema, update_ema
from learner.metrics import LossRatioMonitor
from learner.real_replay import RealReplay
from learner.success_replay import EpisodeAssembler, SuccessReplay

RL_OBJECTIVES = ("ppo", "filtered_bc")

log = logging.getLogger("tandem.learner")

# (batch, co_train, critic_only, new_version) -> the update's statistics; new_version: a weight
# version follows this update (the data-parallel step then gathers fsdp shards into the policy)
TrainStep = Callable[[dict, bool, bool, bool], dict]


@dataclass
class Update:
    stats: dict
    new_version: bool  # counters.policy_version went up: the weights are due to be published


class Trainer:
    def __init__(self, lcfg, policy: torch.nn.Module, counters: LearnerCounters, replay: Optional[RealReplay],
                 seed: int, device: torch.device, optimizer_state: Optional[dict] = None,
                 ema: Optional[torch.nn.Module] = None):
        self.cfg, self.policy, self.counters, self.replay = lcfg, policy, counters, replay
        self.co_train = bool(lcfg.use_real_data_co_training)
        self.rng = np.random.default_rng(seed)
        self.optimizer = make_optimizer(policy, lcfg)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.batcher = Batcher.from_config(lcfg, device)
        self.batch_lock = threading.Lock()
        self.step: TrainStep = self._one_process_step
        self.ratio_monitor = LossRatioMonitor.from_config(lcfg)
        self.skipped_nonfinite = 0  # updates whose loss or gradients were not finite (no optimiser step)
        self._samples_window = (time.time(), counters.sim_samples)
        self.samples_per_s = 0.0
        self.lag_histogram = np.zeros(lcfg.max_policy_lag + 1, dtype=np.int64)  # trained segments by policy lag
        self.objective = str(lcfg.get("rl_objective", "ppo"))
        if self.objective not in RL_OBJECTIVES:
            raise ValueError(f"learner.rl_objective={self.objective!r}: expected one of {RL_OBJECTIVES}")
        if self.objective == "ppo" and not any(getattr(policy, "stochastic_steps", (True,))):
            raise ValueError("learner.rl_objective=ppo needs a stochastic denoising step, but the policy samples "
                             "with noise.stochastic_steps=none (learner.policy_noise): no chain likelihood to train")
        self.success_replay, self.assembler, self.ema = None, None, None
        if self.objective == "filtered_bc":
            fbc = lcfg.filtered_bc
            self.success_replay = SuccessReplay(int(fbc.capacity_chunks), policy.exec_horizon, seed)
            self.assembler = EpisodeAssembler(policy.exec_horizon, self.success_replay.add, int(fbc.max_episode_chunks))
            self.step = self._filtered_bc_step
            self.ema_decay = float(fbc.get("ema_decay") or 0.0)
            self.ema = (ema.to(device) if ema is not None else make_ema(policy, self.ema_decay)) \
                if self.ema_decay > 0 else None

    @property
    def deployed_policy(self) -> torch.nn.Module:
        """What actors act with, evaluations score and checkpoints save as policy/: the EMA when there is one."""
        return self.ema if self.ema is not None else self.policy

    @property
    def version(self) -> int:
        return self.counters.policy_version

    def add_segment(self, segment: dict, policy_version: int, stream: Optional[tuple] = None):
        """From the ingest thread. ``stream``: (sender, env index, sequence number) when the sender said;
        filtered BC joins a stream's segments into episodes."""
        with self.batch_lock:
            self.batcher.add(segment, policy_version, self.version)
        if self.assembler is not None and stream is not None:
            sender, env_index, seq = stream
            self.assembler.add((sender, env_index), seq, segment)
            # what filtered BC learns from: every joined segment, also those the batcher later drops
            self.counters.sim_samples += len(segment["done"])

    def _one_process_step(self, batch: dict, co_train: bool, critic_only: bool, new_version: bool) -> dict:
        return train_step(self.policy, self.optimizer, batch, self.cfg, self.replay, self.rng, critic_only,
                          co_train=co_train)

    def _filtered_bc_step(self, batch: dict, co_train: bool, critic_only: bool, new_version: bool) -> dict:
        """One filtered-BC update once the success replay holds ``filtered_bc.min_episodes`` episodes (until
        then the batch only counts: no optimiser step). The batch itself is not trained on: its segments
        reached the success replay at ingest."""
        if self.success_replay.size()["episodes"] < int(self.cfg.filtered_bc.min_episodes):
            return {"train/optimizer_steps": 0.0}
        real = (lambda n: self.replay.sample(n, self.policy.chunk_size, self.rng)) if co_train else None
        return filtered_bc_update(self.policy, self.optimizer, self.cfg, self.success_replay, real, self.rng,
                                  self._update_ema)

    def _update_ema(self) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.policy, self.ema_decay, self.counters.ema_steps)
            self.counters.ema_steps += 1

    def train_once(self) -> Optional[Update]:
        """One update on the next batch; None when no batch is ready."""
        with self.batch_lock:
            batch = self.batcher.next_batch(self.version)
            bstats = self.batcher.stats()
        if batch is None:
            return None
        self.lag_histogram += self.batcher.lag_histogram()  # of this batch: only this thread takes batches
        lcfg = self.cfg
        co_train = self.co_train and self.replay is not None and self.replay.size()["frames"] > 0
        if self.co_train and not co_train and self.counters.updates == 0:
            log.warning("co-training is on but the real replay is empty: PPO only until real data arrives")
        critic_only = self.counters.updates < lcfg.critic_warmup_updates  # the value head learns first
        new_version = (self.counters.updates + 1) % lcfg.weight_sync_interval == 0
        t0 = time.time()
        stats = self.step(batch, co_train, critic_only, new_version)
        T, B = batch["reward"].shape
        self.counters.updates += 1
        if self.assembler is None:  # filtered BC counts its chunk-steps as they arrive (add_segment)
            self.counters.sim_samples += T * B
        self.counters.real_samples += int(stats.pop("train/real_samples", 0))
        self.skipped_nonfinite += int(stats.get("train/skipped_nonfinite_steps", 0) > 0)
        if new_version:
            self.counters.policy_version += 1
        now = time.time()
        t_prev, s_prev = self._samples_window
        if now - t_prev > 2.0:
            self.samples_per_s = (self.counters.sim_samples - s_prev) / (now - t_prev)
            self._samples_window = (now, self.counters.sim_samples)
        if "train/loss_ratio" in stats:
            self.ratio_monitor.update(stats["train/loss_ratio"])
        succ = batch["success"].sum().item()
        ends = batch["done"].sum().item()
        stats.update(bstats)
        stats.update({"train/update_time_s": now - t0, "throughput/sim_samples_per_s": self.samples_per_s,
                      "policy/version": self.version, "rollout/episodes_in_batch": ends,
                      "rollout/success_rate_in_batch": succ / ends if ends else float("nan"),
                      "rollout/mean_chunk_reward": batch["reward"].mean().item()})
        if self.replay is not None:
            stats["replay/real_frames"] = self.replay.size()["frames"]
        if self.success_replay is not None:
            size, a = self.success_replay.size(), self.assembler
            stats.update({"replay/success_episodes": size["episodes"], "replay/success_chunks": size["chunks"],
                          "replay/success_added": size["added"], "replay/assembled_episodes": a.episodes,
                          "replay/discarded_partial_episodes": a.discarded})
        return Update(stats, new_version)
