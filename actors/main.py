"""The simulation actor process (`tandem-actor`).

Runs twin envs with an inference copy of the policy, cuts rollouts into segments of T
chunk-steps carrying behaviour log-probabilities and values, and hands them to the learner:
through a shared-memory ring plus a small notice on the learner's host, else as ZeroMQ frames.
New weights are applied only between action chunks. ``actor.mode=eval`` runs deterministic
episodes instead and reports their success rate.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections import deque

import numpy as np
import torch
from omegaconf import DictConfig

from actors.env_pool import EnvPool
from actors.rollout import SegmentBuilder
from common.device import resolve_device
from common.channels import ControlClient, DataSender, WeightSubscriber
from common.config import run_with_config
from common.evaluation import run_episode
from common.policy import load_policy, make_policy
from common.protocol import Message
from common.segment import SegmentSpec, expected_segment_spec, policy_segment_spec
from common.shm_ring import ShmRingWriter

WAIT_NOTE_INTERVAL_S = 15.0  # how often a waiting actor says what it waits for
log = logging.getLogger("tandem.actor")


class Actor:
    def __init__(self, cfg: DictConfig):
        self.cfg, acfg = cfg, cfg.actor
        self.id = acfg.id or f"actor-{os.getpid()}"
        self.mode = acfg.mode
        self.device = resolve_device(acfg.device)
        torch.set_num_threads(acfg.torch_threads)
        torch.manual_seed(cfg.seed + acfg.seed_offset)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + acfg.seed_offset)
        # the architecture of the learner's starting checkpoint when there is one (its weights arrive
        # by broadcast), else the configured policy
        model_path = cfg.learner.get("model_path")
        self.policy = (load_policy(model_path, overrides={"noise": cfg.learner.policy_noise}) if model_path
                       else make_policy(cfg.policy)).to(self.device).eval()
        self.version = -1
        self.gamma = float(cfg.learner.gamma)
        self.reward_scale = float(cfg.learner.reward_scale)
        self.real_proxy = bool(acfg.real_proxy)
        env_seed = cfg.seed * 1_000_003 + acfg.seed_offset * 10_007
        # actor.inference=server (train mode): env worker processes + one batching inference server
        # thread on self.device, fed through shared memory (actors/inference_server.py)
        self.server = None
        self.pool = None
        if acfg.inference == "server" and self.mode == "train":
            from actors.inference_server import InferenceServer, server_options

            self.server = InferenceServer(
                self.policy, cfg.env, acfg.num_envs, rollout_steps=acfg.rollout_steps, gamma=self.gamma,
                reward_scale=self.reward_scale,
                real_proxy=self.real_proxy, seed=env_seed, generator_seed=cfg.seed + acfg.seed_offset,
                **server_options(acfg.server))
        else:
            self.pool = EnvPool(cfg.env, acfg.num_envs, real_proxy=self.real_proxy, seed=env_seed)
        self.steps = int(acfg.rollout_steps)
        self._token_cache: dict[str, torch.Tensor] = {}
        tcfg = cfg.transport
        self.sender = DataSender.from_config(tcfg)
        self.weights = WeightSubscriber.from_config(tcfg)
        self.control = ControlClient.from_config(tcfg, identity=self.id)
        self.ring: ShmRingWriter | None = None
        # dry run: the train loop without a learner (no weights awaited, segments discarded), the
        # actor-only baseline of benchmarks/bench_system.py
        self.dry_run = bool(acfg.dry_run)
        self.use_shm = bool(tcfg.use_shm) and self.mode == "train" and not self.dry_run
        self.stop = False
        self.stats = dict(env_steps=0, segments=0, episodes=0, send_failures=0)
        self.recent_success: deque = deque(maxlen=acfg.success_window)
        self.learner_session = None
        self._t0 = time.time()
        self._last_hb = 0.0

    # -- observation helpers ------------------------------------------------------------
    def tokens_for(self, instruction: str) -> torch.Tensor:
        if instruction not in self._token_cache:
            self._token_cache[instruction] = self.policy.tokenize([instruction])[0]
        return self._token_cache[instruction]

    def batch_obs(self, obs_list: list[dict], instructions: list[str]) -> dict:
        return {
            "image": torch.from_numpy(np.stack([o["image"] for o in obs_list])).to(self.device),
            "state": torch.from_numpy(np.stack([o["state"] for o in obs_list])).float().to(self.device),
            "tokens": torch.stack([self.tokens_for(s) for s in instructions]).to(self.device),
        }

    # -- weights and control ------------------------------------------------------------
    def maybe_update_weights(self, timeout_ms: int = 0) -> bool:
        msg = self.weights.poll_latest(timeout_ms=timeout_ms)
        if msg is None:
            return False
        self.policy.set_weights(msg.arrays)
        self.version = msg.policy_version
        log.info("%s: applied weights version %d", self.id, self.version)
        return True

    def heartbeat(self, force: bool = False, extra: dict | None = None):
        now = time.time()
        if not force and now - self._last_hb < self.cfg.transport.heartbeat_interval_s:
            return
        self._last_hb = now
        elapsed = max(now - self._t0, 1e-6)
        meta = dict(self.stats, mode=self.mode, real_proxy=self.real_proxy, policy_version=self.version,
                    env_steps_per_s=self.stats["env_steps"] / elapsed, pid=os.getpid(),
                    success_rate=float(np.mean(self.recent_success)) if self.recent_success else -1.0,
                    ring_drops=self.ring.drops if self.ring else 0)
        meta.update(extra or {})
        reply = self.control.request(Message(kind="heartbeat", sender=self.id, policy_version=self.version,
                                             meta=meta))
        if reply is not None:
            session = reply.meta.get("session")
            if self.learner_session is not None and session != self.learner_session:
                log.warning("%s: learner restarted (session %s -> %s)", self.id, self.learner_session, session)
                if self.ring is not None:
                    self.ring.reclaim_unread()  # notices of the old session are gone with it
            self.learner_session = session

    def wait_for_weights(self):
        t = self.cfg.transport
        log.info("%s: waiting for the learner's weights on %s (control %s)", self.id, t.weights_endpoint,
                 t.control_endpoint)
        t0 = last_note = time.time()
        while not self.stop and self.version < 0:
            self.heartbeat(force=True, extra={"want_weights": True})
            self.maybe_update_weights(timeout_ms=int(t.heartbeat_interval_s * 1000))
            if self.version < 0 and time.time() - last_note >= WAIT_NOTE_INTERVAL_S:
                last_note = time.time()
                log.warning("%s: no weights from a learner at %s after %.0f s; is tandem-learner running with "
                            "the same transport.* endpoints (and CURVE keys)? Still retrying.", self.id,
                            t.weights_endpoint, last_note - t0)

    # -- rollouts -------------------------------------------------------------------------
    def ensure_ring(self, spec: SegmentSpec):
        if self.use_shm and self.ring is None:
            self.ring = ShmRingWriter.from_config(self.cfg.transport, spec.arrays())
            # the learner attaches to the ring from what the notice says about it
            self._ring_meta = {"spec": dataclasses.asdict(spec), "num_slots": self.ring.num_slots}

    def ship(self, spec: SegmentSpec, fill, meta: dict):
        """Write one segment into the ring (or a fresh buffer) via ``fill`` and notify the learner;
        ``meta``: the segment's ``SegmentStats.meta`` (its env index and sequence number travel)."""
        version = int(meta["version"])
        stream = {"env_index": int(meta["env_index"]), "env_seq": int(meta["env_seq"])}  # "seq" is the ring's
        if self.ring is not None:
            slot = self.ring.acquire()
            if slot is None:  # every slot stayed busy (drop, or wait past its timeout): counted in ring.drops
                return
            fill(slot)
            notice = self.ring.commit(slot, version)
            msg = Message(kind="segment_notice", sender=self.id, policy_version=version,
                          meta=dict(notice, **stream, **self._ring_meta))
        else:
            arrays = spec.empty()
            fill(arrays)
            msg = Message(kind="segment", sender=self.id, policy_version=version,
                          meta=stream, arrays=arrays)
        if self.sender.send(msg, timeout_ms=self.cfg.actor.send_timeout_ms):
            self.stats["segments"] += 1
        else:
            self.stats["send_failures"] += 1

    def run_train_server(self):
        """actor.inference=server: env workers step freely; the server batches their requests; this
        thread routes weights to the server and ships the segments the workers finish."""
        srv = self.server
        if not self.dry_run:
            self.wait_for_weights()  # applied to the policy before the server thread starts
        srv.set_version(self.version)
        spec = srv.spec
        self.ensure_ring(spec)
        srv.start()
        while not self.stop:
            msg = self.weights.poll_latest(timeout_ms=0)
            if msg is not None:
                srv.submit_weights(msg.arrays, msg.policy_version)  # applied between batches
                self.version = msg.policy_version
            item = srv.get_segment(timeout=0.05)
            if item is not None:
                arrays, meta = item
                self.stats["env_steps"] += int(meta["env_steps"])
                self.stats["episodes"] += int(meta["episodes"])
                self.recent_success.extend([1.0] * meta["successes"] + [0.0] * (meta["episodes"] - meta["successes"]))

                if self.dry_run:
                    self.stats["segments"] += 1
                else:
                    self.ship(spec, copy_into(arrays), meta)
                if self.cfg.actor.max_segments and self.stats["segments"] >= self.cfg.actor.max_segments:
                    return
            elif srv.alive == 0:
                raise RuntimeError("every env worker of the inference server died: " + "; ".join(srv.errors[:1]))
            self.heartbeat(extra={f"inference_{k}": v for k, v in srv.stats.summary().items()})

    def run_train(self):
        if self.server is not None:
            return self.run_train_server()
        B, T = self.pool.num_envs, self.steps
        first = self.pool.reset()
        obs = [o for o, _ in first]
        instr = [s for _, s in first]
        if not self.dry_run:
            self.wait_for_weights()
        k = self.policy.exec_horizon
        spec = None
        while not self.stop:
            if spec is None:
                spec = policy_segment_spec(self.policy, T, obs[0]["image"].shape[:2], obs[0]["state"].shape[0])
                expected = expected_segment_spec(self.cfg, self.policy)
                if spec != expected:  # the learner would drop every segment: say why, once, here
                    raise ValueError(f"this actor's segments {spec} differ from the layout the learner expects "
                                     f"{expected}: check env.image_size / env.camera and the policy")
                self.ensure_ring(spec)
                builders = [SegmentBuilder(spec, self.gamma, i, self.reward_scale) for i in range(B)]
            for _ in range(T):
                self.maybe_update_weights()  # only between chunks
                o = self.batch_obs(obs, instr)
                with torch.no_grad():
                    out = self.policy.sample(o, generator=self.generator)
                actions = out.actions[:, :k].cpu().numpy().astype(np.float32)
                results = self.pool.run_chunks(actions)
                for i, r in enumerate(results):
                    builders[i].record_sample(obs[i], o["tokens"][i].cpu().numpy(), out.chain[i].cpu().numpy(),
                                              out.log_prob[i].item(), out.value[i].item(), self.version)
                    final_value = None
                    if r.truncated:  # V(final obs) from the behaviour policy, for the bootstrap
                        with torch.no_grad():
                            final_value = float(self.policy.value(self.batch_obs([r.final_obs], [instr[i]]))[0])
                    builders[i].record_result(r, final_value)
                    self.stats["env_steps"] += r.env_steps
                    if r.done:
                        self.stats["episodes"] += 1
                        self.recent_success.append(float(r.success))
                    obs[i], instr[i] = r.obs, r.instruction
                self.heartbeat()
                if self.stop:
                    return
            last = self.batch_obs(obs, instr)
            for i in range(B):
                segment, meta = builders[i].finish(obs[i], last["tokens"][i].cpu().numpy())
                if self.dry_run:
                    self.stats["segments"] += 1
                else:
                    self.ship(spec, copy_into(segment), meta)
            if self.cfg.actor.max_segments and self.stats["segments"] >= self.cfg.actor.max_segments:
                return

    def run_eval(self):
        """Deterministic episodes (common.evaluation, as tandem-sft evaluates), in rounds of
        ``actor.eval_episodes``; each round's success rate goes to the learner as an eval result."""
        self.wait_for_weights()
        env = self.pool.local_env
        env_name = "real_proxy" if self.real_proxy else "sim"
        while not self.stop:
            version, successes = self.version, []
            for i in range(self.cfg.actor.eval_episodes):  # the same episodes every round: comparable
                with torch.no_grad():
                    success, steps, *_ = run_episode(self.policy, env, int(self.cfg.actor.eval_seed) + i, self.device,
                                                     on_chunk=self.heartbeat)
                successes.append(float(success))
                self.stats["env_steps"] += steps
                self.stats["episodes"] += 1
                self.heartbeat()
                if self.stop:
                    return
            self.heartbeat(force=True, extra={"eval_env": env_name, "eval_version": version,
                                              "eval_success": float(np.mean(successes)),
                                              "eval_episodes": len(successes)})
            self.maybe_update_weights(timeout_ms=0)
            if self.cfg.actor.max_eval_rounds and self.stats["episodes"] >= (
                    self.cfg.actor.max_eval_rounds * self.cfg.actor.eval_episodes):
                return

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(self, "stop", True))
        try:
            (self.run_eval if self.mode == "eval" else self.run_train)()
        finally:
            self.heartbeat(force=True, extra={"bye": True})
            self.close()
        return 0

    def close(self):
        if self.pool is not None:
            self.pool.close()
        if self.server is not None:
            self.server.close()
        if self.ring is not None:
            self.ring.close()
        for ch in (self.sender, self.weights, self.control):
            ch.close()


def copy_into(segment: dict):
    """A ``ship`` filler that copies ``segment``'s arrays into the ring slot or message buffer."""
    def fill(dst):
        for name, arr in segment.items():
            np.copyto(dst[name], arr)
    return fill


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_with_config(lambda cfg: Actor(cfg).run(), argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
