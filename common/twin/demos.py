"""Demonstrations from the twin as a LeRobot v3.0 dataset (the same schema as real episodes).

Runs the scripted expert (or any policy) in the twin or the real proxy and saves each episode as
it ends, so an interrupted run keeps every episode saved so far (Ctrl-C and SIGTERM finalise the
dataset before exiting). By default only successful episodes are kept.

CLI (Hydra overrides of configs/config.yaml go alongside):
  python -m common.twin.demos out=/data/twin_demos episodes=50 env=real_proxy image_size=128x128 \
      [repo_id=tandem/twin_demos] [video=false] [keep_failed=false] [seed=0] [workers=1] [seed_stride=1000] \
      [policy=DIR [sampling=sde|ode|none]] [attempts_per_episode=4]

``policy=DIR`` records a saved policy instead of the scripted expert (``common.evaluation.PolicyAgent``,
noise seeded by ``seed``; ``sampling=sde``: ``policy.sample`` with the RL-time noise of
``learner.policy_noise``, ``ode``: the noise-free ODE from a random x_0, ``none``: deterministic), so
that its kept episodes are its own successes (offline filtered BC, ``docs/stage2.md``). At most
``attempts_per_episode * episodes`` episodes are run: ``episodes=N attempts_per_episode=1`` runs N rollouts
and keeps the successful ones.

With ``workers=N`` (N > 1) N processes each write one dataset ``out/part_XX`` (worker i: env seeds
from ``seed + i * seed_stride``, its share of the episodes); ``learner.real_replay`` reads such a
folder of parts as one dataset. Sim demos are cheap: one process per core is the fast way to
thousands of episodes.
"""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from tqdm import tqdm

from common.twin.expert import ScriptedExpert
from common.dataset_schema import ACTION_KEY, IMAGE_KEY, PRIVILEGED_KEY, ROBOT_TYPE, STATE_KEY, dataset_features
from common.twin.task import to_dict
from common.twin.wrappers import make_env

Policy = Union[Callable[[dict], np.ndarray], Any]  # a callable, or an object with act(obs) (and optional reset())


def _act_fn(policy: Policy) -> Callable[[dict], np.ndarray]:
    return policy.act if hasattr(policy, "act") else policy


def write_demos(env_cfg: Any, root: Union[str, Path], repo_id: str, num_episodes: int, *,
                real_proxy: bool = False, seed: int = 0, policy: Optional[Policy] = None,
                use_videos: bool = False, keep_failed: bool = False, max_attempts: Optional[int] = None,
                image_writer_threads: int = 2, progress: bool = True, privileged: Optional[bool] = None,
                env=None) -> Path:
    """Write ``num_episodes`` episodes to a new LeRobot dataset at ``root``; returns ``root``.

    ``policy``: ``None`` runs :class:`ScriptedExpert`; otherwise a callable ``obs -> action[7]`` or an
    object with ``act(obs)`` (its ``reset()`` is called at each episode start if present).
    Episode ``k`` of the run uses env seed ``seed + k`` (attempts, counting discarded ones).
    ``max_attempts`` bounds the episodes run (default ``4 * num_episodes``).
    ``privileged``: store the simulator's object and bowl positions per frame (``PRIVILEGED_KEY``);
    default on in the twin, off on the real proxy (which stands in for real episodes, that have none).
    ``env``: an open env (``make_env``) to use instead of building one (an agent that reads it, such as
    ``common.evaluation.PolicyAgent``, is built on it); it is left open.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    own_env = env is None
    if own_env:
        env = make_env(to_dict(env_cfg), real_proxy=real_proxy, obs_mode="rgb")
    expert = ScriptedExpert(env) if policy is None else None
    agent = expert if policy is None else policy
    act = _act_fn(agent)
    privileged = (not real_proxy) if privileged is None else privileged
    dataset = LeRobotDataset.create(
        repo_id, fps=env.control_freq, features=dataset_features(env.image_size, use_videos, privileged), root=root,
        robot_type=ROBOT_TYPE, use_videos=use_videos, image_writer_threads=image_writer_threads,
        metadata_buffer_size=1)  # episode metadata on disk as each episode is saved

    def _terminate(signum, frame):  # SIGTERM -> KeyboardInterrupt so `finally` finalises the dataset
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate) if _in_main_thread() else None
    saved = attempts = 0
    max_attempts = max_attempts or 4 * num_episodes
    bar = tqdm(total=num_episodes, desc=f"demos -> {root.name}", unit="ep", disable=not progress)
    try:
        while saved < num_episodes and attempts < max_attempts:
            obs, info = env.reset(seed=seed + attempts)
            attempts += 1
            if hasattr(agent, "reset"):
                agent.reset()
            done = False
            while not done:
                action = np.asarray(act(obs), dtype=np.float32).reshape(7)
                frame = {IMAGE_KEY: obs["image"], STATE_KEY: obs["state"], ACTION_KEY: action, "task": env.instruction}
                if privileged:
                    frame[PRIVILEGED_KEY] = info["privileged"]
                dataset.add_frame(frame)
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            if info["success"] or keep_failed:
                dataset.save_episode()
                saved += 1
                bar.update(1)
            else:
                dataset.clear_episode_buffer()
            bar.set_postfix(attempts=attempts)
    except KeyboardInterrupt:
        if dataset.episode_buffer is not None and dataset.episode_buffer["size"] > 0:
            dataset.clear_episode_buffer()
        print(f"\ninterrupted: {saved} episodes saved in {root}", file=sys.stderr)
    finally:
        bar.close()
        dataset.finalize()
        if own_env:
            env.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if saved < num_episodes and attempts >= max_attempts:
        print(f"warning: {saved}/{num_episodes} episodes kept after {attempts} attempts", file=sys.stderr)
    return root


def write_demos_parallel(args: list[str], out: Path, episodes: int, workers: int, seed: int, seed_stride: int,
                         attempts_per_episode: float = 4.0) -> int:
    """Run ``workers`` demo processes (this module, ``out=out/part_XX``) with one progress bar."""
    import json
    import subprocess
    import time

    if episodes * attempts_per_episode > workers * seed_stride:
        raise ValueError(f"{episodes} episodes over {workers} workers may use more than seed_stride={seed_stride} "
                         "seeds per worker (the blocks would overlap): raise seed_stride")
    passed = [a for a in args if a.partition("=")[0] not in ("out", "episodes", "workers", "seed", "seed_stride")]
    shares = [episodes // workers + (i < episodes % workers) for i in range(workers)]
    parts = [out / f"part_{i:02d}" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "common.twin.demos", f"out={part}", f"episodes={n}",
                               f"seed={seed + i * seed_stride}", "progress=false", *passed])
             for i, (part, n) in enumerate(zip(parts, shares)) if n > 0]

    def saved() -> int:
        total = 0
        for part in parts:
            try:
                total += json.loads((part / "meta" / "info.json").read_text())["total_episodes"]
            except (OSError, ValueError, KeyError):
                pass
        return total

    with tqdm(total=episodes, desc=f"demos -> {out.name} ({len(procs)} workers)", unit="ep") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(2.0)
            bar.update(saved() - bar.n)
        bar.update(saved() - bar.n)
    failed = [p.args[3] for p in procs if p.returncode != 0]
    if failed:
        print(f"demo workers failed: {failed}", file=sys.stderr)
        return 1
    print(f"wrote {saved()} episodes in {len(procs)} parts under {out}")
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def _parse_image_size(text: str) -> list[int]:
    """'128' -> [128, 128]; '480x640' or '[480,640]' -> [H, W]."""
    parts = [int(p) for p in text.strip("[]()").replace("x", ",").split(",") if p.strip()]
    return parts * 2 if len(parts) == 1 else parts


def main(argv=None) -> int:
    from common.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    opts = dict(out=None, episodes="10", repo_id=None, video="false", keep_failed="false", image_size=None,
                workers="1", seed_stride="1000", progress="true", policy=None, sampling="sde",
                attempts_per_episode="4")
    overrides = []
    for a in args:
        key, _, value = a.partition("=")
        if key in opts:
            opts[key] = value
        else:
            overrides.append(a)
    if opts["out"] is None:
        print("out=/path is required", file=sys.stderr)
        return 2
    if opts["image_size"]:
        h, w = _parse_image_size(opts["image_size"])
        overrides += [f"env.camera.height={h}", f"env.camera.width={w}"]
    cfg = load_config("config", overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(opts["out"])
    per_episode = float(opts["attempts_per_episode"])
    if int(opts["workers"]) > 1:
        return write_demos_parallel(args, out, int(opts["episodes"]), int(opts["workers"]), int(cfg.seed),
                                    int(opts["seed_stride"]), per_episode)
    env = agent = None
    if opts["policy"]:
        import torch

        from common.evaluation import PolicyAgent
        from common.policy import load_policy

        env = make_env(to_dict(cfg.env), real_proxy=bool(cfg.env.real_proxy), obs_mode="rgb")
        policy = load_policy(opts["policy"], overrides={"noise": cfg.learner.policy_noise})
        stochastic = opts["sampling"] != "none"
        generator = torch.Generator().manual_seed(int(cfg.seed)) if stochastic else None
        agent = PolicyAgent(policy, env, generator, opts["sampling"] if stochastic else "sde")
    try:
        root = write_demos(cfg.env, out, opts["repo_id"] or f"tandem/{out.name}", int(opts["episodes"]),
                           real_proxy=bool(cfg.env.real_proxy), seed=int(cfg.seed), policy=agent, env=env,
                           max_attempts=max(1, math.ceil(per_episode * int(opts["episodes"]))),
                           use_videos=_flag(opts["video"]), keep_failed=_flag(opts["keep_failed"]),
                           progress=_flag(opts["progress"]))
    finally:
        if env is not None:
            env.close()
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
