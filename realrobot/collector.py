"""`tandem-collect`: record teleoperated episodes on the robot (or its sim twin) for the learner.

Per control step: read the state and the camera, ask the teleop for an action, pass it through
the safety layer to the arm, and record (image, state, applied action). After each episode the
operator labels it (success / failure / discard / re-record); a kept episode goes to the LeRobot
dataset and the on-disk outbox, from which a background thread pushes it to the learner's real
replay and waits for the learner's acknowledgement (realrobot/outbox.py).

    tandem-collect                                  # sim rig, keyboard teleop, stdin prompt
    tandem-collect robot=franky robot.arm.ip=172.16.0.2 robot.camera.serial=123456 \
        robot.teleop.type=spacemouse collect.task="put the red cube into the bowl"
    tandem-collect robot.teleop.type=scripted collect.prompt.type=auto collect.num_episodes=20
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from common.config import run_with_config
from realrobot.dataset_writer import DatasetWriter, EpisodeBuffer
from realrobot.operator_prompt import EpisodeLabel, OperatorPrompt, make_prompt
from realrobot.outbox import Outbox, OutboxConfig, PusherThread
from realrobot.rig import DEVICE_ERRORS, DEVICE_MISSING, Rig, make_rig
from realrobot.safety import SafetyLayer
from realrobot.teleop import Teleop, TeleopEvents, make_teleop
from realrobot.timing import RateKeeper

log = logging.getLogger("tandem.collect")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM ends a session like Ctrl-C: the arm stops, the dataset is finalised, the outbox flushed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def session_identity(role: str, configured: Optional[str] = None) -> str:
    return configured or f"{role}-{socket.gethostname()}-{os.getpid()}"


def require_task_source(configured: Optional[str], rig: Rig, key: str) -> None:
    """Fail before any hardware moves when no instruction can be known for the episodes."""
    if not configured and rig.cell is None:
        raise ValueError(f"set {key}: the instruction being demonstrated or evaluated on the real cell")


def episode_task(configured: Optional[str], rig: Rig) -> str:
    task = configured or rig.arm.instruction
    if not task:
        raise ValueError("no task for this episode: set collect.task (the instruction the operator demonstrates)")
    return str(task)


@dataclass
class EpisodeOutcome:
    buffer: EpisodeBuffer
    events: TeleopEvents


def record_episode(rig: Rig, teleop: Teleop, safety: SafetyLayer, max_steps: int,
                   rate: RateKeeper) -> EpisodeOutcome:
    """Teleoperate one episode; ends on the operator's request, the sim's end, or ``max_steps``."""
    buffer, events = EpisodeBuffer(), TeleopEvents()
    rate.reset()
    for _ in range(max_steps):
        state = rig.arm.get_observation()["state"]
        image = rig.camera.read()
        action = teleop.get_action({"image": image, "state": state})
        applied = safety.send(action, state)
        buffer.append(image, state, applied)
        new = teleop.get_events()
        events = TeleopEvents(events.end_episode or new.end_episode, events.rerecord or new.rerecord,
                              events.stop or new.stop)
        if events.end_episode or events.rerecord or events.stop or rig.arm.episode_over:
            break
        rate.sleep()
    return EpisodeOutcome(buffer, events)


class Collector:
    """``rig``: an already built rig to use (and leave open) instead of building one from cfg."""

    def __init__(self, cfg: DictConfig, rig: Optional[Rig] = None):
        self.cfg, c = cfg, cfg.collect
        self.identity = session_identity("collector", c.get("identity"))
        self.owns_rig = rig is None
        self.rig = make_rig(cfg.robot, cfg.env, seed=cfg.seed) if rig is None else rig
        require_task_source(c.task, self.rig, "collect.task")
        self.teleop = make_teleop(cfg.teleop, self.rig.cell)
        self.prompt: OperatorPrompt = make_prompt(c.prompt, self.rig.cell)
        self.safety = SafetyLayer(self.rig.arm, cfg.robot.safety)
        self.rate = RateKeeper(float(cfg.robot.control_hz), enabled=bool(cfg.robot.pace))
        self.outbox_cfg = OutboxConfig.from_mapping(c.outbox)
        self.outbox = Outbox(self.outbox_cfg.dir)
        self.pusher: Optional[PusherThread] = None
        self.writer: Optional[DatasetWriter] = None
        self.kept = {"success": 0, "failure": 0}
        self.dropped = 0

    def _open(self) -> None:
        if self.owns_rig:
            self.rig.connect()
        self.teleop.connect()
        self.safety.start()
        self.writer = DatasetWriter(self.cfg.collect.repo_id, self.cfg.collect.root,
                                    fps=int(self.cfg.robot.control_hz), image_hw=self.rig.camera.image_size)
        if self.cfg.collect.push:
            self.pusher = PusherThread(self.outbox, self.cfg.transport, self.outbox_cfg, self.identity).start()

    def _close(self) -> None:
        for what, fn in (("safety", self.safety.close), ("teleop", self.teleop.disconnect),
                         ("rig", self.rig.disconnect if self.owns_rig else None),
                         ("dataset", self.writer.close if self.writer else None),
                         ("outbox", self.pusher.close if self.pusher else None)):
            if fn is None:
                continue
            try:
                fn()
            except Exception:
                log.exception("closing the %s failed", what)

    def _keep(self, outcome: EpisodeOutcome, task: str, success: bool) -> str:
        ep = outcome.buffer.to_episode(episode_id=uuid.uuid4().hex, task=task, success=success,
                                       fps=int(self.cfg.robot.control_hz), source="collect")
        index = self.writer.write(ep)
        if self.pusher is not None and (success or self.cfg.collect.push_failures):
            self.outbox.put(ep)  # on disk (dataset and outbox) before anything is sent
            self.pusher.wake()
        self.kept["success" if success else "failure"] += 1
        log.info("episode %d kept (%s, %d frames, id %s)", index, "success" if success else "failure",
                 ep.num_frames, ep.episode_id)
        return ep.episode_id

    def run(self) -> int:
        c = self.cfg.collect
        try:
            self._open()
            while not c.num_episodes or sum(self.kept.values()) < c.num_episodes:
                self.rig.arm.home()
                self.teleop.reset()
                self.safety.new_episode()
                task = episode_task(c.task, self.rig)
                outcome = record_episode(self.rig, self.teleop, self.safety, int(c.max_episode_steps), self.rate)
                self.safety.idle()
                self.teleop.pause()
                if outcome.events.rerecord:
                    log.info("re-recording (operator request)")
                    self.dropped += 1
                    continue
                label = self.prompt.label(sum(self.kept.values()) + self.dropped, len(outcome.buffer), task)
                if label.keep and len(outcome.buffer):
                    self._keep(outcome, task, label is EpisodeLabel.SUCCESS)
                else:
                    self.dropped += 1
                    log.info("episode dropped (%s)", label.value)
                if label is EpisodeLabel.STOP or outcome.events.stop:
                    break
        except KeyboardInterrupt:
            log.info("interrupted: finishing the dataset and the outbox")
        finally:
            self._close()
        log.info("collected %s, dropped %d; safety %s; outbox %s", self.kept, self.dropped,
                 self.safety.summary(), self.pusher.counts if self.pusher else "off")
        return 0


def collect(cfg: DictConfig) -> int:
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_as_interrupt():
            return Collector(cfg).run()
    except DEVICE_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        return DEVICE_MISSING


def main(argv=None) -> int:
    return run_with_config(collect, config_name="collect", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
