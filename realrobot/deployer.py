"""`tandem-deploy`: run the policy on the robot (or its sim twin) through the safety layer.

The policy comes from a saved directory (``deploy.policy_path``) or is built from the policy
config and takes its weights from the learner's broadcast. With ``deploy.follow_weights`` the
deployer subscribes to that broadcast (the subscriber verifies each version's digest) and
applies a new version only at a boundary: between episodes (``apply_weights_at: episode``) or
between action chunks (``chunk``); ``pinned_version`` applies that version only. Every episode
is labelled (operator or the sim's success flag) and recorded, with the policy version that
produced it, into a LeRobot evaluation dataset; ``deploy.push`` also sends it to the learner.

    tandem-deploy deploy.prompt.type=auto robot.pace=false         # sim rig, follow the learner
    tandem-deploy robot=franky deploy.policy_path=runs/x/checkpoints/latest deploy.follow_weights=false \
        deploy.task="put the red cube into the bowl"
"""
from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from common.config import run_with_config
from common.device import resolve_device
from common.weights import PendingWeights
from realrobot.collector import episode_task, require_task_source, session_identity, sigterm_as_interrupt
from realrobot.dataset_writer import DatasetWriter, EpisodeBuffer
from realrobot.operator_prompt import EpisodeLabel, make_prompt
from realrobot.outbox import Outbox, OutboxConfig, PusherThread
from realrobot.rig import DEVICE_ERRORS, DEVICE_MISSING, Rig, make_rig
from realrobot.safety import SafetyLayer
from realrobot.timing import RateKeeper

log = logging.getLogger("tandem.deploy")

APPLY_AT = ("episode", "chunk")


class WeightFollower:
    """Receives the learner's weight broadcast in a background thread and applies the newest
    verified version to the policy only when the control loop asks (at a boundary).

    Receiving continuously matters: a subscriber that is read only between episodes fills its
    queue with old versions and ZeroMQ then drops the newer ones. Digest checks of large weights
    also stay out of the control loop.
    """

    def __init__(self, policy, make_subscriber: Callable[[], Any], pinned_version: Optional[int] = None,
                 poll_ms: int = 100):
        self.make_subscriber = make_subscriber
        self.pinned, self.poll_ms = pinned_version, poll_ms
        self.weights = PendingWeights(policy)
        self.skipped_unpinned = 0
        self.endpoint = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-follower", daemon=True)

    def start(self) -> "WeightFollower":
        self._thread.start()
        return self

    def _run(self) -> None:
        sub = self.make_subscriber()
        self.endpoint = sub.endpoint
        try:
            while not self._stop.is_set():
                msg = sub.poll_latest(timeout_ms=self.poll_ms)  # verified and newer, or None
                if msg is not None:
                    self.offer(msg)
        finally:
            sub.close()

    def offer(self, msg) -> None:
        """Keep ``msg`` as the version to apply at the next boundary (unless pinned elsewhere)."""
        if self.pinned is not None and msg.policy_version != self.pinned:
            self.skipped_unpinned += 1
            log.info("weights version %d ignored (pinned to %d)", msg.policy_version, self.pinned)
            return
        self.weights.offer(msg.arrays, msg.policy_version)

    @property
    def version(self) -> int:
        return self.weights.version

    @property
    def applied(self) -> int:
        return self.weights.applied

    def apply(self) -> bool:
        """At a boundary: apply the newest received version, if any arrived since the last one."""
        if not self.weights.apply():
            return False
        log.info("applied weights version %d", self.version)
        return True

    def wait(self, timeout_s: float) -> bool:
        """Block until a version is waiting (``timeout_s`` <= 0: forever); True when one is."""
        return self.weights.wait(timeout_s if timeout_s > 0 else None)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Deployer:
    """``rig``: an already built rig to use (and leave open) instead of building one from cfg."""

    def __init__(self, cfg: DictConfig, rig: Optional[Rig] = None):
        from common.policy import load_policy, make_policy
        self.cfg, d = cfg, cfg.deploy
        if d.apply_weights_at not in APPLY_AT:
            raise ValueError(f"deploy.apply_weights_at must be one of {APPLY_AT}, not {d.apply_weights_at!r}")
        self.identity = session_identity("deployer", d.get("identity"))
        self.device = resolve_device(d.device)
        torch.manual_seed(cfg.seed)
        self.policy = (load_policy(d.policy_path, map_location=str(self.device)) if d.policy_path
                       else make_policy(cfg.policy)).to(self.device).eval()
        self.owns_rig = rig is None
        self.rig = make_rig(cfg.robot, cfg.env, seed=cfg.seed) if rig is None else rig
        require_task_source(d.task, self.rig, "deploy.task")
        self.prompt = make_prompt(d.prompt, self.rig.cell)
        self.safety = SafetyLayer(self.rig.arm, cfg.robot.safety)
        self.rate = RateKeeper(float(cfg.robot.control_hz), enabled=bool(cfg.robot.pace))
        self.follower: Optional[WeightFollower] = None
        self.writer: Optional[DatasetWriter] = None
        self.pusher: Optional[PusherThread] = None
        self.outbox: Optional[Outbox] = None
        self.results: list[dict] = []
        self._tokens: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ policy
    def _obs(self, image: np.ndarray, state: np.ndarray, task: str) -> dict:
        if task not in self._tokens:
            self._tokens[task] = self.policy.tokenize([task]).to(self.device)
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device),
                "state": torch.from_numpy(np.asarray(state, dtype=np.float32))[None].to(self.device),
                "tokens": self._tokens[task]}

    @torch.no_grad()
    def _chunk(self, image, state, task) -> np.ndarray:
        actions = self.policy.act(self._obs(image, state, task))[0]
        return actions[: self.policy.exec_horizon].float().cpu().numpy()

    # ------------------------------------------------------------------ lifecycle
    def _open(self) -> None:
        d = self.cfg.deploy
        if d.follow_weights:
            from common.channels import WeightSubscriber
            self.follower = WeightFollower(
                self.policy, lambda: WeightSubscriber.from_config(self.cfg.transport, name=f"{self.identity}-weights"),
                d.pinned_version).start()
            if not d.policy_path:
                self._wait_for_first_weights(float(d.wait_for_weights_s))
        if self.owns_rig:
            self.rig.connect()
        self.safety.start()
        self.writer = DatasetWriter(d.repo_id, d.root, fps=int(self.cfg.robot.control_hz),
                                    image_hw=self.rig.camera.image_size)
        if d.push:
            config = OutboxConfig.from_mapping(d.outbox)
            self.outbox = Outbox(config.dir)
            self.pusher = PusherThread(self.outbox, self.cfg.transport, config, self.identity).start()

    def _wait_for_first_weights(self, timeout_s: float) -> None:
        """A freshly initialised policy never drives the arm: wait for the learner's weights."""
        log.info("waiting for the learner's weights on %s", self.cfg.transport.weights_endpoint)
        if not self.follower.wait(timeout_s):
            raise TimeoutError(f"no weights from the learner within {timeout_s} s "
                               "(set deploy.policy_path to run a saved policy)")
        self.follower.apply()

    def _close(self) -> None:
        for what, fn in (("safety", self.safety.close), ("rig", self.rig.disconnect if self.owns_rig else None),
                         ("dataset", self.writer.close if self.writer else None),
                         ("outbox", self.pusher.close if self.pusher else None),
                         ("weights", self.follower.close if self.follower else None)):
            if fn is not None:
                try:
                    fn()
                except Exception:
                    log.exception("closing the %s failed", what)

    # ------------------------------------------------------------------ episodes
    def run_episode(self, task: str) -> tuple[EpisodeBuffer, list[int]]:
        """One policy episode; returns its frames and the policy version of each frame."""
        d, arm, camera = self.cfg.deploy, self.rig.arm, self.rig.camera
        buffer, versions, chunk = EpisodeBuffer(), [], []
        self.rate.reset()
        for _ in range(int(d.max_episode_steps)):
            state = arm.get_observation()["state"]
            image = camera.read()
            if not chunk:
                if self.follower is not None and d.apply_weights_at == "chunk":
                    self.follower.apply()
                chunk = list(self._chunk(image, state, task))
            applied = self.safety.send(chunk.pop(0), state)
            buffer.append(image, state, applied)
            versions.append(self.version)
            if arm.episode_over:
                break
            self.rate.sleep()
        return buffer, versions

    @property
    def version(self) -> int:
        return self.follower.version if self.follower is not None else -1

    def run(self) -> int:
        d = self.cfg.deploy
        try:
            self._open()
            episode = 0
            while not d.num_episodes or episode < d.num_episodes:
                if self.follower is not None:
                    self.follower.apply()  # between episodes: always a safe boundary
                self.rig.arm.home()
                self.safety.new_episode()
                task = episode_task(d.task, self.rig)
                buffer, versions = self.run_episode(task)
                self.safety.idle()
                label = self.prompt.label(episode, len(buffer), task)
                if label is EpisodeLabel.RERECORD:
                    continue
                if label.keep and len(buffer):
                    self._record(buffer, versions, task, label is EpisodeLabel.SUCCESS)
                    episode += 1
                if label is EpisodeLabel.STOP:
                    break
        except KeyboardInterrupt:
            log.info("interrupted")
        finally:
            self._close()
        rate = np.mean([r["success"] for r in self.results]) if self.results else float("nan")
        log.info("deployed %d episodes, success rate %.2f; safety %s", len(self.results), rate,
                 self.safety.summary())
        return 0

    def _record(self, buffer: EpisodeBuffer, versions: list[int], task: str, success: bool) -> None:
        ep = buffer.to_episode(episode_id=uuid.uuid4().hex, task=task, success=success,
                               fps=int(self.cfg.robot.control_hz), source="deploy",
                               policy_version=versions[-1],
                               extra={"first_policy_version": versions[0],
                                      "policy_path": str(self.cfg.deploy.policy_path or "")})
        index = self.writer.write(ep)
        if self.outbox is not None:
            self.outbox.put(ep)
            self.pusher.wake()
        self.results.append({"episode_index": index, "success": success, "policy_version": versions[-1],
                             "versions": sorted(set(versions))})
        log.info("eval episode %d: %s, %d steps, policy version %s", index, "success" if success else "failure",
                 ep.num_frames, sorted(set(versions)))


def deploy(cfg: DictConfig) -> int:
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_as_interrupt():
            return Deployer(cfg).run()
    except DEVICE_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        return DEVICE_MISSING


def main(argv=None) -> int:
    return run_with_config(deploy, config_name="deploy", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
