"""Scripted expert for TandemPickPlace: privileged state in, the same 7-D action as any policy out.

A small state machine over end-effector targets: hover above the object (yaw aligned with a cube
face), descend, close, lift, carry above the bowl, lower, open, retreat. Each step commands a
proportional move toward the phase's target, clipped to the env's action bounds. A grasp that is
lost while lifting or carrying sends it back to the hover phase (up to ``max_retries``).
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, Optional

import numpy as np

from common.pose_math import quat_wxyz_to_matrix
from common.twin.task import TandemPickPlaceEnv


class Phase(IntEnum):
    HOVER = 0
    DESCEND = 1
    CLOSE = 2
    LIFT = 3
    CARRY = 4
    LOWER = 5
    OPEN = 6
    RETREAT = 7


def _wrap(angle: float, period: float) -> float:
    """Angle into [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


class ScriptedExpert:
    """``ScriptedExpert(env)`` for a ``TwinEnv`` (uses ``env.task``) or the ManiSkill task itself
    (``env.unwrapped``, env 0). Call ``reset()`` after each env reset, then ``act(obs)``."""

    def __init__(self, env: Any, cfg: Optional[dict] = None):
        task = getattr(env, "task", None) or env.unwrapped
        if not isinstance(task, TandemPickPlaceEnv):
            raise TypeError(f"ScriptedExpert needs the TandemPickPlace task, got {type(task).__name__}")
        self.task = task
        self.p = dict(task.cfg["expert"], **(cfg or {}))
        a = task.cfg["action"]
        self.max_pos, self.max_rot = float(a["max_delta_pos"]), float(a["max_delta_rot"])
        self.reset()

    def reset(self) -> None:
        self.phase = Phase.HOVER
        self.counter = 0
        self.retries = 0
        self.grasp_yaw: Optional[float] = None

    # privileged state of env 0, numpy; the grasp flag is the one evaluated at the last reset/step
    def _state(self) -> dict:
        t = self.task
        tcp = t.agent.tcp_pose
        obj = t.obj_pose
        return dict(tcp_p=tcp.p[0].cpu().numpy(), tcp_q=tcp.q[0].cpu().numpy(), obj_p=obj.p[0].cpu().numpy(),
                    obj_q=obj.q[0].cpu().numpy(), bowl_p=t.bowl.pose.p[0].cpu().numpy(),
                    grasped=bool(t.last_is_grasped[0]), shape=t.active_shape[0])

    def _target_yaw(self, s: dict, tcp_yaw: float) -> float:
        """Gripper yaw for the grasp: square to a cube face; keep the current yaw otherwise."""
        if s["shape"] != "cube":
            return tcp_yaw
        obj_x = quat_wxyz_to_matrix(s["obj_q"])[:, 0]
        cube_yaw = np.arctan2(obj_x[1], obj_x[0])
        return tcp_yaw + _wrap(cube_yaw - tcp_yaw, np.pi / 2)

    def _move(self, s: dict, target: np.ndarray, yaw: Optional[float], gripper: float) -> np.ndarray:
        R = quat_wxyz_to_matrix(s["tcp_q"])
        # keep the approach axis (tcp z) pointing down: rotation vector taking it to -z
        tilt = np.cross(R[:, 2], np.array([0.0, 0.0, -1.0]))
        rot = self.p["rot_gain"] * tilt
        if yaw is not None:
            rot[2] = self.p["rot_gain"] * _wrap(yaw - np.arctan2(R[1, 0], R[0, 0]), 2 * np.pi)
        dpos = np.clip(self.p["gain"] * (target - s["tcp_p"]), -self.max_pos, self.max_pos)
        rot = np.clip(rot, -self.max_rot, self.max_rot)
        return np.concatenate([dpos, rot, [gripper]]).astype(np.float32)

    def act(self, obs: Any = None) -> np.ndarray:
        s = self._state()
        t = self.task
        p = self.p
        half = t.obj_half
        rim_z = s["bowl_p"][2] + t.bowl_base + t.bowl_height
        tcp_yaw = float(np.arctan2(*quat_wxyz_to_matrix(s["tcp_q"])[[1, 0], 0]))
        err = lambda target: np.abs(target - s["tcp_p"])  # noqa: E731
        tol = p["pos_tolerance"]

        if self.phase in (Phase.LIFT, Phase.CARRY, Phase.LOWER) and not s["grasped"]:
            if self.retries < p["max_retries"]:
                self.retries += 1
                self.phase = Phase.HOVER
        if self.phase == Phase.HOVER:
            self.grasp_yaw = self._target_yaw(s, tcp_yaw)
            target = s["obj_p"] + np.array([0.0, 0.0, p["hover_height"]])
            if err(target).max() < 2 * tol and abs(_wrap(self.grasp_yaw - tcp_yaw, 2 * np.pi)) < p["yaw_tolerance"]:
                self.phase = Phase.DESCEND
            return self._move(s, target, self.grasp_yaw, 1.0)
        if self.phase == Phase.DESCEND:
            target = s["obj_p"] - np.array([0.0, 0.0, p["grasp_depth"]])
            target[2] = max(target[2], 0.5 * half)  # never drive the fingers into the table
            if err(target).max() < tol:
                self.phase, self.counter = Phase.CLOSE, 0
            return self._move(s, target, self.grasp_yaw, 1.0)
        if self.phase == Phase.CLOSE:
            self.counter += 1
            if self.counter >= p["close_steps"]:
                self.phase = Phase.LIFT
            return self._move(s, s["tcp_p"], self.grasp_yaw, -1.0)
        carry_z = rim_z + p["carry_clearance"] + 2 * half + (s["tcp_p"][2] - s["obj_p"][2]) + half
        if self.phase == Phase.LIFT:
            target = np.array([s["tcp_p"][0], s["tcp_p"][1], carry_z])
            if s["tcp_p"][2] > carry_z - 2 * tol:
                self.phase = Phase.CARRY
            return self._move(s, target, None, -1.0)
        if self.phase == Phase.CARRY:
            # put the object (not the tcp) over the bowl centre
            offset = s["obj_p"][:2] - s["tcp_p"][:2]
            target = np.array([*(s["bowl_p"][:2] - offset), carry_z])
            if err(target)[:2].max() < tol:
                self.phase = Phase.LOWER
            return self._move(s, target, None, -1.0)
        if self.phase == Phase.LOWER:
            obj_bottom = s["obj_p"][2] - half
            drop = rim_z + p["release_height"] - obj_bottom
            offset = s["obj_p"][:2] - s["tcp_p"][:2]
            target = np.array([*(s["bowl_p"][:2] - offset), s["tcp_p"][2] + drop])
            if abs(drop) < tol:
                self.phase, self.counter = Phase.OPEN, 0
            return self._move(s, target, None, -1.0)
        if self.phase == Phase.OPEN:
            self.counter += 1
            if self.counter >= p["open_steps"]:
                self.phase = Phase.RETREAT
            return self._move(s, s["tcp_p"], None, 1.0)
        target = np.array([s["tcp_p"][0], s["tcp_p"][1], carry_z])
        return self._move(s, target, None, 1.0)


def evaluate_expert(env_cfg: Any, episodes: int, *, real_proxy: Optional[bool] = None, seed: int = 0,
                    obs_mode: str = "state") -> dict:
    """Success rate of the expert over seeds ``seed .. seed + episodes - 1``."""
    from common.twin.wrappers import make_env

    env = make_env(env_cfg, real_proxy=real_proxy, obs_mode=obs_mode)
    expert = ScriptedExpert(env)
    successes, lengths, failed = 0, [], []
    try:
        for ep_seed in range(seed, seed + episodes):
            obs, info = env.reset(seed=ep_seed)
            expert.reset()
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                done = terminated or truncated
            successes += info["success"]
            lengths.append(info["elapsed_steps"])
            if not info["success"]:
                failed.append(ep_seed)
    finally:
        env.close()
    return dict(success_rate=successes / episodes, episodes=episodes, mean_length=float(np.mean(lengths)),
                failed_seeds=failed)


def main(argv=None) -> int:
    """``python -m common.twin.expert [env=real_proxy] [episodes=50] [seed=0] [obs_mode=state]``"""
    import sys
    import time

    from common.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(episodes="50", obs_mode="state")
    overrides = []
    for a in args:
        key = a.split("=", 1)[0]
        if key in opts:
            opts[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    cfg = load_config("config", overrides)
    start = time.time()
    result = evaluate_expert(cfg.env, int(opts["episodes"]), seed=int(cfg.seed), obs_mode=opts["obs_mode"])
    print(f"env={cfg.env.name} real_proxy={cfg.env.real_proxy} episodes={result['episodes']} "
          f"success_rate={result['success_rate']:.3f} mean_length={result['mean_length']:.1f} "
          f"failed_seeds={result['failed_seeds']} time={time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
