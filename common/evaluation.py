"""Deterministic evaluation of a policy on the twin or its real proxy.

Shared by ``tandem-sft`` (periodic evaluation) and the actors' eval mode. Each episode runs
``policy.act`` (the deterministic ODE) on the current observation and executes the first
``policy.exec_horizon`` actions of the chunk open-loop, then re-plans, until the episode
terminates (success) or is truncated (time limit). Episode ``i`` resets with ``seed + i``, so
two evaluations with the same seed see the same layouts, objects and instructions.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm


def policy_obs(obs: dict, tokens: torch.Tensor, device) -> dict:
    """One env observation (numpy, env units) -> a batch-of-one policy ``Obs`` on ``device``."""
    return {"image": torch.as_tensor(obs["image"], device=device)[None],
            "tokens": tokens,
            "state": torch.as_tensor(obs["state"], dtype=torch.float32, device=device)[None]}


class EpisodeResult(NamedTuple):
    success: bool
    length: int            # env steps taken
    episode_return: float
    held_at_end: bool      # the object still in the gripper when the episode ended (a failure that never let go);
                           # False for an env that does not report ``info["is_grasped"]``


SAMPLING = ("sde", "ode")  # the stochastic modes of executed_chunk


def executed_chunk(policy, obs: dict, generator: Optional[torch.Generator] = None, sampling: str = "sde") -> np.ndarray:
    """The ``exec_horizon`` actions [k, 7] an actor executes of one chunk for the batch-of-one ``obs``:
    deterministic (``policy.act`` from x_0 = 0), or with ``generator`` stochastic: ``"sde"`` is an actor's
    ``policy.sample`` (the RL-time noise on the denoising steps), ``"ode"`` the deterministic ODE from a
    random x_0 ~ N(0, I), a sample of the flow's own action distribution with no noise added to the actions."""
    if generator is None:
        chunk = policy.act(obs)
    elif sampling == "ode":
        chunk = policy.act(obs, generator=generator)
    else:
        chunk = policy.sample(obs, generator=generator).actions
    return chunk[0, :policy.exec_horizon].float().cpu().numpy()


def run_episode(policy, env, seed: int, device, on_chunk: Optional[Callable[[], None]] = None,
                sample_generator: Optional[torch.Generator] = None) -> EpisodeResult:
    """One deterministic episode, or with ``sample_generator`` one stochastic episode as an actor rolls
    it out (``policy.sample``, the RL-time denoising noise). ``on_chunk`` is called after each executed
    chunk (an eval actor's heartbeat: an episode can outlast the learner's peer timeout on a busy CPU)."""
    obs, info = env.reset(seed=seed)
    tokens = policy.tokenize([info["instruction"]]).to(device)
    steps, episode_return, done = 0, 0.0, False
    while not done:
        for action in executed_chunk(policy, policy_obs(obs, tokens, device), sample_generator):
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            episode_return += float(reward)
            done = terminated or truncated
            if done:
                break
        if on_chunk is not None:
            on_chunk()
    return EpisodeResult(bool(info["success"]), steps, episode_return, bool(info.get("is_grasped", False)))


class PolicyAgent:
    """A saved policy as a step-by-step agent (``reset()``, ``act(obs) -> action[7]``) of ``env``, e.g. for
    ``common.twin.demos``: a chunk per ``exec_horizon`` steps (``executed_chunk``: deterministic, or with
    ``generator`` stochastic by ``sampling``). Its recorded successes are the policy's own successful
    episodes: offline filtered BC's data."""

    def __init__(self, policy, env, generator: Optional[torch.Generator] = None, sampling: str = "sde"):
        if sampling not in SAMPLING:
            raise ValueError(f"sampling={sampling!r}: expected one of {SAMPLING}")
        self.policy, self.env, self.generator, self.sampling = policy.eval(), env, generator, sampling
        self.queue: list[np.ndarray] = []
        self.tokens = None

    def reset(self) -> None:
        self.queue = []
        self.tokens = self.policy.tokenize([self.env.instruction]).to(self.policy.device)

    @torch.no_grad()
    def act(self, obs: dict) -> np.ndarray:
        if not self.queue:
            o = policy_obs(obs, self.tokens, self.policy.device)
            self.queue = list(executed_chunk(self.policy, o, self.generator, self.sampling))
        return self.queue.pop(0)


@torch.no_grad()
def evaluate_policy(policy, env_cfg: Any, *, real_proxy: bool, episodes: int, seed: int,
                    device=None, progress: bool = False, env=None) -> dict:
    """Success rate of ``policy`` over ``episodes`` deterministic episodes.

    ``env_cfg``: the composed ``cfg.env``; ``real_proxy`` picks the twin or the real proxy.
    ``device``: where observations go (default: the policy's device).
    ``env``: an open env (``common.twin.make_env``) to reuse across calls instead of building
    one; it is left open. Returns {success_rate, episodes, mean_length, mean_return, successes, lengths}.
    """
    from common.twin import make_env  # ManiSkill/SAPIEN: imported only when evaluating

    device = policy.device if device is None else torch.device(device)
    own_env = env is None
    if own_env:
        env = make_env(env_cfg, real_proxy=real_proxy, obs_mode="rgb")
    was_training = policy.training
    policy.eval()
    successes, lengths, returns = [], [], []
    name = "real_proxy" if real_proxy else "twin"
    try:
        for i in tqdm(range(episodes), desc=f"eval {name}", unit="ep", disable=not progress, leave=False):
            success, length, episode_return, _ = run_episode(policy, env, seed + i, device)
            successes.append(success)
            lengths.append(length)
            returns.append(episode_return)
    finally:
        policy.train(was_training)
        if own_env:
            env.close()
    return {"success_rate": float(np.mean(successes)) if successes else 0.0,
            "episodes": len(successes),
            "mean_length": float(np.mean(lengths)) if lengths else 0.0,
            "mean_return": float(np.mean(returns)) if returns else 0.0,
            "successes": successes,
            "lengths": lengths}


# ----- parallel evaluation (tandem-eval) --------------------------------------------------------
ENV_NAMES = {"twin": False, "real_proxy": True}  # env name -> real_proxy flag
ENV_OVERRIDES_FILE = "env_overrides.json"  # next to a shipped policy: the env overrides it must be evaluated with


def policy_env_overrides(policy_dir: str) -> list[str]:
    """The Hydra overrides stored beside a policy (``env_overrides.json``), [] when there are none."""
    import json
    import os

    path = os.path.join(policy_dir, ENV_OVERRIDES_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        overrides = json.load(f)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"{path} must hold a JSON list of Hydra override strings, got {overrides!r}")
    return overrides


def shape_of(instruction: str, shape_nouns: dict) -> str:
    """The object shape an instruction names ("put the red ball into the bowl" -> "sphere")."""
    words = instruction.lower().split()
    return next((shape for shape, noun in shape_nouns.items() if noun in words), "unknown")


_WORKER: dict = {}


def _worker_init(extra_overrides: list[str], device: str, threads: int, policy_overrides: Optional[dict] = None) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    _WORKER.update(extra=list(extra_overrides), device=device, policies={}, envs={}, policy_overrides=policy_overrides)


def _worker_episode(task: tuple) -> dict:
    """One episode of (policy directory, env name, seed[, sample seed]): deterministic, or stochastic
    (``policy.sample``'s noise drawn from the sample seed); policies and envs are built once per worker
    and reused."""
    from common.config import load_config
    from common.policy import load_policy
    from common.twin import make_env

    policy_dir, env_name, seed, *sample_seed = task
    if policy_dir not in _WORKER["policies"]:
        _WORKER["policies"][policy_dir] = load_policy(policy_dir, map_location=_WORKER["device"],
                                                      overrides=_WORKER["policy_overrides"]).eval()
    overrides = (*policy_env_overrides(policy_dir), *_WORKER["extra"])
    key = (overrides, env_name)
    if key not in _WORKER["envs"]:
        _WORKER["envs"][key] = make_env(load_config("config", list(overrides)).env, real_proxy=ENV_NAMES[env_name],
                                        obs_mode="rgb")
    env = _WORKER["envs"][key]
    generator = (torch.Generator(device=_WORKER["device"]).manual_seed(int(sample_seed[0])) if sample_seed else None)
    with torch.no_grad():
        result = run_episode(_WORKER["policies"][policy_dir], env, seed, _WORKER["device"], sample_generator=generator)
    return {"policy": policy_dir, "env": env_name, "seed": seed, "sample_seed": sample_seed[0] if sample_seed else None,
            "success": result.success, "length": result.length,
            "return": result.episode_return, "held_at_end": result.held_at_end,
            "shape": shape_of(env.instruction, env.cfg["object"]["shapes"])}


def run_episodes(tasks: list[tuple], workers: int, device: str = "cpu", overrides: list[str] = (), threads: int = 1,
                 progress: bool = True, policy_overrides: Optional[dict] = None) -> list[dict]:
    """``_worker_episode`` over ``tasks`` in ``workers`` spawned processes (unordered results);
    ``policy_overrides`` as ``load_policy``'s (e.g. the RL-time ``noise`` settings)."""
    import multiprocessing as mp

    results: list[dict] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(tasks))), _worker_init,
                  (list(overrides), device, threads, policy_overrides)) as pool:
        bar = tqdm(total=len(tasks), desc="tandem-eval", unit="ep", disable=not progress)
        for r in pool.imap_unordered(_worker_episode, tasks, chunksize=1):
            results.append(r)
            bar.update(1)
            bar.set_postfix(success=f"{np.mean([x['success'] for x in results]):.2f}")
        bar.close()
    return results


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def summarize(episodes: list[dict]) -> dict:
    """Per env: success rate, its 95 % interval, mean length and return, the share of episodes that ended
    with the object still held, success per object shape."""
    out = {}
    for env_name in sorted({e["env"] for e in episodes}):
        eps = [e for e in episodes if e["env"] == env_name]
        wins = sum(e["success"] for e in eps)
        shapes = {}
        for shape in sorted({e["shape"] for e in eps}):
            s = [e["success"] for e in eps if e["shape"] == shape]
            shapes[shape] = {"success": float(np.mean(s)), "episodes": len(s)}
        out[env_name] = {"success": wins / len(eps), "ci95": wilson_interval(wins, len(eps)), "episodes": len(eps),
                         "mean_length": float(np.mean([e["length"] for e in eps])),
                         "mean_return": float(np.mean([e["return"] for e in eps])),
                         "held_at_end": float(np.mean([e.get("held_at_end", False) for e in eps])), "per_shape": shapes}
    return out


def evaluate_parallel(jobs: list[tuple[str, list[str], list[int]]], workers: int, device: str = "cpu",
                      overrides: list[str] = (), threads: int = 1, progress: bool = True) -> dict:
    """Deterministic episodes for every (policy directory, envs, seeds) job, spread over ``workers``
    processes that build each policy and env once. Each policy is evaluated with its
    ``env_overrides.json`` plus ``overrides``. Returns {policy_dir: {"summary", "episodes"}}."""
    for _, envs, _ in jobs:
        unknown = [e for e in envs if e not in ENV_NAMES]
        if unknown:
            raise ValueError(f"unknown envs {unknown}: choose from {sorted(ENV_NAMES)}")
    tasks = [(d, env, seed) for d, envs, seeds in jobs for env in envs for seed in seeds]
    results = run_episodes(tasks, workers, device, overrides, threads, progress)
    out = {}
    for d, _, _ in jobs:
        eps = sorted((r for r in results if r["policy"] == d), key=lambda r: (r["env"], r["seed"]))
        out[d] = {"summary": summarize(eps), "episodes": eps, "overrides": [*policy_env_overrides(d), *overrides]}
    return out


def format_table(summary: dict) -> str:
    lines = ["| env | success | 95% CI | episodes | mean length | per shape |", "|---|---|---|---|---|---|"]
    for env_name, s in summary.items():
        shapes = ", ".join(f"{k} {v['success']:.2f} ({v['episodes']})" for k, v in s["per_shape"].items())
        lines.append(f"| {env_name} | {s['success']:.3f} | {s['ci95'][0]:.2f}-{s['ci95'][1]:.2f} | {s['episodes']} | "
                     f"{s['mean_length']:.1f} | {shapes} |")
    return "\n".join(lines)


def parse_seeds(specs: list[str]) -> list[int]:
    """["100000:100100", "5"] -> [100000, ..., 100099, 5] (half-open ranges or single seeds)."""
    seeds = []
    for spec in specs:
        lo, sep, hi = spec.partition(":")
        seeds += list(range(int(lo), int(hi))) if sep else [int(lo)]
    return seeds


def main(argv=None) -> int:
    """tandem-eval --policy DIR [--envs twin real_proxy] [--seeds 100000:100100] [--workers N] [--out FILE]"""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(description="Parallel deterministic evaluation of a saved policy on the twin "
                                             "and the real proxy (held-out seeds by default).")
    ap.add_argument("--policy", required=True, help="a policy.save directory (its env_overrides.json is applied)")
    ap.add_argument("--envs", nargs="+", default=list(ENV_NAMES))
    ap.add_argument("--seeds", nargs="+", default=["100000:100100"],
                    help="half-open ranges a:b or single seeds; demos use seeds from 0 (workers: blocks of 1000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra env overrides, e.g. env.max_episode_steps=100")
    args = ap.parse_args(argv)
    result = evaluate_parallel([(args.policy, args.envs, parse_seeds(args.seeds))], args.workers, args.device,
                               args.overrides, args.threads)[args.policy]
    print(format_table(result["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
