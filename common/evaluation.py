"""Deterministic evaluation of a policy on the twin or its real proxy.

Shared by ``tandem-sft`` (periodic evaluation) and the actors' eval mode. Each episode runs
``policy.act`` (the deterministic ODE) on the current observation and executes the first
``policy.exec_horizon`` actions of the chunk open-loop, then re-plans, until the episode
terminates (success) or is truncated (time limit). Episode ``i`` resets with ``seed + i``, so
two evaluations with the same seed see the same layouts, objects and instructions.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def policy_obs(obs: dict, tokens: torch.Tensor, device) -> dict:
    """One env observation (numpy, env units) -> a batch-of-one policy ``Obs`` on ``device``."""
    return {"image": torch.as_tensor(obs["image"], device=device)[None],
            "tokens": tokens,
            "state": torch.as_tensor(obs["state"], dtype=torch.float32, device=device)[None]}


def run_episode(policy, env, seed: int, device) -> tuple[bool, int, float]:
    """One deterministic episode; returns (success, env steps taken, return)."""
    obs, info = env.reset(seed=seed)
    tokens = policy.tokenize([info["instruction"]]).to(device)
    steps, episode_return, done = 0, 0.0, False
    while not done:
        chunk = policy.act(policy_obs(obs, tokens, device))[0, :policy.exec_horizon]
        for action in chunk.float().cpu().numpy():
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            episode_return += float(reward)
            done = terminated or truncated
            if done:
                break
    return bool(info["success"]), steps, episode_return


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
            success, length, episode_return = run_episode(policy, env, seed + i, device)
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
