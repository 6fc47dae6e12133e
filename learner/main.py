"""The learner process (`tandem-learner`).

Two threads, as Sample Factory separates batcher and learner; data flows one way:
- ingest (``learner/ingest.py``): sockets and rings in, every message validated once, segments
  into the batcher, real episodes into the ``EpisodeStore`` (``learner/episode_store.py``);
- train (main thread): the ``Trainer`` (``learner/trainer.py``) takes batches out of the batcher
  and runs the V-trace PPO (+ SFT co-training) updates; ``Learner`` here broadcasts each new
  weight version (PUB), writes checkpoints, TensorBoard logs and summary.json.
Under torchrun, ``learner.distributed`` gives rank 0's ``Trainer`` its data-parallel update step.
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
from learner.checkpoint import LearnerCounters, load_latest_checkpoint, save_checkpoint
from learner.episode_store import EpisodeStore
from learner.ingest import NO_VOCAB_LIMIT, Ingest
from learner.metrics import MetricsWriter
from learner.real_replay import RealReplay
from learner.trainer import Trainer

log = logging.getLogger("tandem.learner")


class Learner:
    def __init__(self, cfg: DictConfig):
        self.cfg, lcfg = cfg, cfg.learner
        # refuse a public bind without CURVE keys before loading anything (transport.security)
        log.info("transport CURVE per endpoint: %s", check_server_security(cfg.transport))
        self.device = resolve_device(lcfg.device)
        torch.manual_seed(cfg.seed)
        self.session = uuid.uuid4().hex[:8]
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        use_replay = lcfg.use_real_data_co_training or lcfg.live_dataset.root
        self.replay = RealReplay.from_config(lcfg, seed=cfg.seed) if use_replay else None
        self.episodes = EpisodeStore(self.run_dir, self.replay)

        ckpt = load_latest_checkpoint(lcfg.checkpoint_dir, map_location=str(self.device))
        if ckpt is not None:
            policy, counters = ckpt.policy.to(self.device), ckpt.counters
            log.info("resumed from %s (version %d, %d updates)", ckpt.path, counters.policy_version, counters.updates)
        else:
            if lcfg.model_path:
                policy = load_policy(lcfg.model_path, map_location=str(self.device),
                                     overrides={"noise": lcfg.policy_noise})
                log.info("initial weights from %s", lcfg.model_path)
            else:
                stats = self.replay.dataset_stats() if self.replay is not None else None
                policy = make_policy(cfg.policy, stats=stats or None)
            policy, counters = policy.to(self.device), LearnerCounters()
        self.train_errors = 0  # updates that raised (contained; the batch is skipped)
        self.exit_code = 0
        self.consecutive_train_errors = 0
        self.unpublished_nonfinite = 0  # weight versions withheld because a tensor was not finite
        self.drop_log = RateLimitedLog(log)
        self.trainer = Trainer(lcfg, policy, counters, self.replay, cfg.seed, self.device,
                               ckpt.optimizer_state if ckpt is not None else None,
                               ckpt.ema if ckpt is not None else None)
        self.metrics = MetricsWriter(lcfg.log_dir)
        self.publisher = WeightPublisher.from_config(cfg.transport)
        self.republish = threading.Event()
        self.stop = threading.Event()
        self.eval_history: list[dict] = []
        self.last_stats: dict = {}
        vocab_size = int(getattr(getattr(policy, "tokenizer", None), "vocab_size", NO_VOCAB_LIMIT))
        self.ingest = Ingest(cfg.transport, self, expected_segment_spec(cfg, policy), expected_episode_spec(cfg),
                             vocab_size)

    @property
    def version(self) -> int:
        return self.trainer.version

    @property
    def counters(self) -> LearnerCounters:
        return self.trainer.counters

    # -- IngestSink: called from the ingest thread ---------------------------------------------
    def add_segment(self, segment: dict, policy_version: int, stream=None):
        self.trainer.add_segment(segment, policy_version, stream)

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
        batcher = self.trainer.batcher
        b = batcher.stats()
        return {"session": self.session, "updates": self.counters.updates, "samples_per_s": self.trainer.samples_per_s,
                "queue_depth": batcher.queue_depth, "real_episodes": size["episodes"], "real_frames": size["frames"],
                "lag_mean": b["policy_lag/mean"], "lag_max": b["policy_lag/max"],
                "lag_histogram": self.trainer.lag_histogram.tolist(),
                "dropped": {**self.ingest.dropped_total(), "stale": batcher.dropped_stale,
                            "overflow": batcher.dropped_overflow},
                "actors": actors}

    # -- train thread -------------------------------------------------------------------------
    def publish(self):
        # parameters only: some buffers are infinite by design (normaliser bounds without stats)
        policy = self.trainer.deployed_policy
        bad = [n for n, p in policy.named_parameters() if not bool(torch.isfinite(p).all())]
        self._last_publish = time.time()
        if bad:  # never send poisoned weights to actors and the robot
            self.unpublished_nonfinite += 1
            self.drop_log.warn(f"not publishing version {self.version}: non-finite tensors {bad[:5]}",
                               key="unpublished_nonfinite")
            return
        self.publisher.publish(self.version, policy.get_weights(), meta={"session": self.session})

    def checkpoint(self):
        trainer = self.trainer
        self.counters.dropped_segments = trainer.batcher.dropped_stale + trainer.batcher.dropped_overflow
        path = save_checkpoint(self.cfg.learner.checkpoint_dir, trainer.policy, trainer.optimizer, self.counters,
                               keep=self.cfg.learner.keep_checkpoints, ema=trainer.ema)
        log.info("checkpoint %s", path)

    def update_once(self) -> bool:
        """One update, then the weights, logs and checkpoint it makes due; False when no batch was ready."""
        update = self.trainer.train_once()
        if update is None:
            return False
        lcfg = self.cfg.learner
        if update.new_version:
            self.publish()
        stats = update.stats
        stats.update({f"dropped/{k}": v for k, v in self.ingest.dropped_total().items()})
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
                    trained = self.update_once()
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
                                     rl=f"{self.last_stats.get('train/rl_loss', 0):.3f}")
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
                   "duration_s": round(duration_s, 1), "co_training": self.trainer.co_train,
                   "eval_sim": last("sim"), "eval_real_proxy": last("real_proxy"),
                   "eval_history": self.eval_history, "dropped": self.ingest.dropped_total(),
                   "train_errors": self.train_errors, "skipped_nonfinite_updates": self.trainer.skipped_nonfinite,
                   "unpublished_nonfinite_versions": self.unpublished_nonfinite, "exit_code": self.exit_code,
                   "policy_lag_histogram": self.trainer.lag_histogram.tolist(),
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
