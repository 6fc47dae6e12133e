"""The learner process (`tandem-learner`).

Two threads, as Sample Factory separates batcher and learner; data flows one way:
- ingest (``learner/ingest.py``): sockets and rings in, every message validated once, segments
  into the batcher, real episodes into the ``EpisodeStore`` (``learner/episode_store.py``);
- train (main thread, here): batches out of the batcher, V-trace PPO (+ SFT co-training) updates,
  weight broadcast (PUB), checkpoints and TensorBoard logs.
Bad messages are dropped and counted; actors may come and go; SIGINT/SIGTERM checkpoint and exit.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.channels import WeightPublisher, check_server_security
from common.config import LEARNER_STOPPED_ON_TRAIN_ERRORS, run_with_config
from common.device import resolve_device
from common.episode_msg import expected_episode_spec
from common.policy import load_policy, make_policy
from common.ratelimited_log import RateLimitedLog
from common.segment import expected_segment_spec
from learner import distributed
from learner.batcher import Batcher
from learner.checkpoint import LearnerCounters, load_latest_checkpoint, save_checkpoint
from learner.cotrain import make_optimizer, train_step
from learner.episode_store import EpisodeStore
from learner.ingest import NO_VOCAB_LIMIT, Ingest
from learner.metrics import LossRatioMonitor, MetricsWriter
from learner.real_replay import RealReplay

log = logging.getLogger("tandem.learner")


class Learner:
    def __init__(self, cfg: DictConfig):
        self.cfg, lcfg = cfg, cfg.learner
        # refuse a public bind without CURVE keys before loading anything (transport.security)
        log.info("transport CURVE per endpoint: %s", check_server_security(cfg.transport))
        self.device = resolve_device(lcfg.device)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.session = uuid.uuid4().hex[:8]
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.co_train = bool(lcfg.use_real_data_co_training)
        self.replay = RealReplay.from_config(lcfg, seed=cfg.seed) if (self.co_train or lcfg.live_dataset.root) else None
        self.episodes = EpisodeStore(self.run_dir, self.replay)

        ckpt = load_latest_checkpoint(lcfg.checkpoint_dir, map_location=str(self.device))
        if ckpt is not None:
            self.policy = ckpt.policy.to(self.device)
            self.counters = ckpt.counters
            log.info("resumed from %s (version %d, %d updates)", ckpt.path, self.counters.policy_version, self.counters.updates)
        else:
            if lcfg.model_path:
                self.policy = load_policy(lcfg.model_path, map_location=str(self.device),
                                          overrides={"noise": lcfg.policy_noise})
                log.info("initial weights from %s", lcfg.model_path)
            else:
                stats = self.replay.dataset_stats() if self.replay is not None else None
                self.policy = make_policy(cfg.policy, stats=stats or None)
            self.policy = self.policy.to(self.device)
            self.counters = LearnerCounters()
        self.train_errors = 0  # updates that raised (contained; the batch is skipped)
        self.skipped_nonfinite = 0  # updates whose loss or gradients were not finite (no optimiser step)
        self.exit_code = 0
        self.consecutive_train_errors = 0
        self.unpublished_nonfinite = 0  # weight versions withheld because a tensor was not finite
        self.drop_log = RateLimitedLog(log)
        self.optimizer = make_optimizer(self.policy, lcfg)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.batcher = Batcher.from_config(lcfg, self.device)
        self.batch_lock = threading.Lock()
        self.metrics = MetricsWriter(lcfg.log_dir)
        self.ratio_monitor = LossRatioMonitor.from_config(lcfg)
        self.publisher = WeightPublisher.from_config(cfg.transport)
        self.republish = threading.Event()
        self.stop = threading.Event()
        self.eval_history: list[dict] = []
        self.last_stats: dict = {}
        self._samples_window = (time.time(), self.counters.sim_samples)
        self.samples_per_s = 0.0
        self.lag_histogram = np.zeros(lcfg.max_policy_lag + 1, dtype=np.int64)  # trained segments by policy lag
        vocab_size = int(getattr(getattr(self.policy, "tokenizer", None), "vocab_size", NO_VOCAB_LIMIT))
        self.ingest = Ingest(cfg.transport, self, expected_segment_spec(cfg, self.policy), expected_episode_spec(cfg),
                             vocab_size)

    @property
    def version(self) -> int:
        return self.counters.policy_version

    # -- IngestSink: called from the ingest thread ---------------------------------------------
    def add_segment(self, segment: dict, policy_version: int):
        with self.batch_lock:
            self.batcher.add(segment, policy_version, self.version)

    def store_episode(self, ep) -> str:
        return self.episodes.store(ep)

    def is_stored(self, episode_id: str) -> bool:
        return episode_id in self.episodes

    def record_eval(self, report: dict):
        """An eval actor's result (``common.peer_meta.eval_report``) into summary.json and TensorBoard."""
        entry = dict(report, update=self.counters.updates, time=time.time())
        self.eval_history.append(entry)
        self.metrics.log({f"eval/{entry['env']}_success": entry["success"]}, self.counters.updates)

    def status(self, peers: dict) -> dict:
        size = self.replay.size() if self.replay is not None else {"episodes": 0, "frames": 0}
        now = time.time()
        newest = sorted(peers.items(), key=lambda kv: -kv[1]["last_seen"])[:self.cfg.transport.status_max_peers]
        actors = {n[:64]: {k: v for k, v in p.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 128}
                  | {"age_s": now - p["last_seen"]} for n, p in newest}
        b = self.batcher.stats()
        return {"session": self.session, "updates": self.counters.updates, "samples_per_s": self.samples_per_s,
                "queue_depth": self.batcher.queue_depth, "real_episodes": size["episodes"], "real_frames": size["frames"],
                "lag_mean": b["policy_lag/mean"], "lag_max": b["policy_lag/max"],
                "lag_histogram": self.lag_histogram.tolist(),
                "dropped": {**self.ingest.dropped_total(), "stale": self.batcher.dropped_stale,
                            "overflow": self.batcher.dropped_overflow},
                "actors": actors}

    # -- train thread -------------------------------------------------------------------------
    def publish(self):
        # parameters only: some buffers are infinite by design (normaliser bounds without stats)
        bad = [n for n, p in self.policy.named_parameters() if not bool(torch.isfinite(p).all())]
        self._last_publish = time.time()
        if bad:  # never send poisoned weights to actors and the robot
            self.unpublished_nonfinite += 1
            self.drop_log.warn(f"not publishing version {self.version}: non-finite tensors {bad[:5]}",
                               key="unpublished_nonfinite")
            return
        self.publisher.publish(self.version, self.policy.get_weights(), meta={"session": self.session})

    def checkpoint(self):
        self.counters.dropped_segments = self.batcher.dropped_stale + self.batcher.dropped_overflow
        path = save_checkpoint(self.cfg.learner.checkpoint_dir, self.policy, self.optimizer, self.counters,
                               keep=self.cfg.learner.keep_checkpoints)
        log.info("checkpoint %s", path)

    def step(self, batch: dict, co_train: bool, critic_only: bool = False) -> dict:
        """One update on a sim batch (``learner.distributed`` shards it over ranks instead)."""
        return train_step(self.policy, self.optimizer, batch, self.cfg.learner, self.replay, self.rng, critic_only,
                          co_train=co_train)

    def train_once(self) -> bool:
        with self.batch_lock:
            batch = self.batcher.next_batch(self.version)
            bstats = self.batcher.stats()
        if batch is None:
            return False
        self.lag_histogram += self.batcher.lag_histogram()  # of this batch: only this thread takes batches
        lcfg = self.cfg.learner
        co_train = self.co_train and self.replay is not None and self.replay.size()["frames"] > 0
        if self.co_train and not co_train and self.counters.updates == 0:
            log.warning("co-training is on but the real replay is empty: PPO only until real data arrives")
        critic_only = self.counters.updates < lcfg.critic_warmup_updates  # the value head learns first
        t0 = time.time()
        stats = self.step(batch, co_train, critic_only)
        T, B = batch["reward"].shape
        self.counters.updates += 1
        self.counters.sim_samples += T * B
        self.counters.real_samples += int(stats.pop("train/real_samples", 0))
        self.skipped_nonfinite += int(stats.get("train/skipped_nonfinite_steps", 0) > 0)
        if self.counters.updates % lcfg.weight_sync_interval == 0:
            self.counters.policy_version += 1
            self.publish()
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
        stats.update({f"dropped/{k}": v for k, v in self.ingest.dropped_total().items()})
        if self.replay is not None:
            stats["replay/real_frames"] = self.replay.size()["frames"]
        self.last_stats = stats
        if self.counters.updates % lcfg.log_interval == 0:
            self.metrics.log(stats, self.counters.updates)
        if self.counters.updates % lcfg.checkpoint_interval == 0:
            self.checkpoint()
        return True

    def run(self) -> int:
        lcfg = self.cfg.learner
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        self.ingest.start()
        self.publish()
        t = self.cfg.transport
        log.info("learner up: session %s, version %d, device %s; data %s, weights %s, control %s", self.session,
                 self.version, self.device, t.data_endpoint, t.weights_endpoint, t.control_endpoint)
        t_start = time.time()
        progress = _progress(lcfg.total_updates, self.counters.updates)
        try:
            while not self.stop.is_set():
                if self.republish.is_set() or time.time() - self._last_publish > lcfg.weights_republish_s:
                    self.republish.clear()
                    self.publish()
                try:
                    trained = self.train_once()
                    self.consecutive_train_errors = 0
                except Exception:  # contained: the batch is dropped, the learner goes on
                    self.train_errors += 1
                    self.consecutive_train_errors += 1
                    log.exception("train step failed (%d in a row): batch skipped", self.consecutive_train_errors)
                    if self.consecutive_train_errors >= lcfg.max_consecutive_train_errors:
                        log.error("%d train steps in a row failed: stopping (checkpoint saved)",
                                  self.consecutive_train_errors)
                        self.exit_code = LEARNER_STOPPED_ON_TRAIN_ERRORS
                        break
                    continue
                if not trained:
                    time.sleep(0.005)
                    continue
                progress.update(1)
                progress.set_postfix(version=self.version, lag=f"{self.last_stats.get('policy_lag/mean', 0):.1f}",
                                     ppo=f"{self.last_stats.get('train/ppo_loss', 0):.3f}")
                if lcfg.total_updates and self.counters.updates >= lcfg.total_updates:
                    break
                if lcfg.max_duration_s and time.time() - t_start > lcfg.max_duration_s:
                    break
        finally:
            progress.close()
            self.ingest.stop.set()
            self.ingest.join(timeout=10)
            self.checkpoint()
            self.write_summary(time.time() - t_start)
            self.metrics.close()
            self.publisher.close()
        return self.exit_code

    def write_summary(self, duration_s: float):
        def last(env):
            runs = [e for e in self.eval_history if e["env"] == env]
            return runs[-1] if runs else None

        summary = {"updates": self.counters.updates, "policy_version": self.version,
                   "sim_samples": self.counters.sim_samples, "real_samples": self.counters.real_samples,
                   "duration_s": round(duration_s, 1), "co_training": self.co_train,
                   "eval_sim": last("sim"), "eval_real_proxy": last("real_proxy"),
                   "eval_history": self.eval_history, "dropped": self.ingest.dropped_total(),
                   "train_errors": self.train_errors, "skipped_nonfinite_updates": self.skipped_nonfinite,
                   "unpublished_nonfinite_versions": self.unpublished_nonfinite, "exit_code": self.exit_code,
                   "policy_lag_histogram": self.lag_histogram.tolist(),
                   "tensorboard": str(Path(self.cfg.learner.log_dir).resolve())}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("summary: %s", {k: v for k, v in summary.items() if k != "eval_history"})


def _progress(total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total or None, initial=initial, desc="learner updates", unit="upd", dynamic_ncols=True)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_with_config(run, argv=argv)


def run(cfg: DictConfig) -> int:
    """One learner, or under torchrun one rank of a data-parallel learner."""
    if distributed.launched():
        return distributed.run(cfg, Learner)
    return Learner(cfg).run()


if __name__ == "__main__":
    raise SystemExit(main())
