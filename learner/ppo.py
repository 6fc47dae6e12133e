"""The RL loss: PPO clipped surrogate on V-trace advantages, clipped value loss, entropy bonus.

Input is a time-major sim batch from ``learner.batcher`` (observations hold T+1 steps, the last
one only for the bootstrap value). Hyper-parameters come from the ``learner`` config:
gamma, gae_lambda (V-trace's lambda), rho_bar, c_bar, clip_ratio_low/high, value_clip,
vf_coef, entropy_bonus, normalize_advantages, advantage_eps, max_log_ratio.

Why ``max_log_ratio``: a flow-matching chain's log-probability sums Gaussian log-densities over
K * H * 7 dimensions, so new - old log-probabilities of a few hundred nats happen and exp()
overflows to inf (inf * 0 = nan in the surrogate). The log-ratio is clamped to
[-max_log_ratio, max_log_ratio] before exp(); beyond that bound the sample gives no gradient,
which only matters where PPO's clipping would already have stopped it (or, for a negative
advantage, where the ratio is astronomically large and the step is unsafe anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.vtrace import vtrace

OBS_KEYS = ("image", "tokens", "state")


def observations(batch: dict, steps: slice | int) -> dict:
    """Policy ``Obs`` for the given time steps of a [T(+1), B, ...] batch, time and batch flattened."""
    obs = {}
    for key in OBS_KEYS:
        x = batch[key][steps]
        obs[key] = x.flatten(0, 1) if isinstance(steps, slice) else x
    if obs["state"].shape[-1] == 0:
        obs["state"] = None
    return obs


def explained_variance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var[target - prediction] / Var[target]; nan when the target is constant (as CleanRL)."""
    var_target = target.var(correction=0)
    return 1.0 - (target - prediction).var(correction=0) / var_target  # x/0 -> inf/nan: not logged


@dataclass
class RLLoss:
    loss: torch.Tensor  # policy_loss + vf_coef * value_loss - entropy_bonus * entropy
    policy_loss: torch.Tensor  # PPO clipped surrogate ("ppo_loss")
    value_loss: torch.Tensor
    entropy: torch.Tensor
    stats: dict[str, torch.Tensor]  # detached scalars


def ppo_loss(policy, batch: dict, cfg) -> RLLoss:
    T, B = batch["reward"].shape
    new = policy.evaluate(observations(batch, slice(0, T)), batch["chain"].flatten(0, 1))
    new_logp, new_value, entropy = (x.view(T, B) for x in (new.log_prob, new.value, new.entropy))
    with torch.no_grad():
        bootstrap_value = policy.value(observations(batch, T))

    # V-trace targets and advantages under the current weights (no gradient).
    behaviour_logp = batch["behaviour_logp"]
    discounts = cfg.gamma * (1.0 - batch["done"])
    vs, advantages = vtrace(behaviour_logp, new_logp.detach(), batch["reward"], new_value.detach(),
                            bootstrap_value, discounts, rho_bar=cfg.rho_bar, c_bar=cfg.c_bar, lam=cfg.gae_lambda)
    if cfg.normalize_advantages:  # over this (micro-)batch
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + cfg.advantage_eps)

    # Policy loss: PPO clipped surrogate against the behaviour policy.
    log_ratio = torch.clamp(new_logp - behaviour_logp, -cfg.max_log_ratio, cfg.max_log_ratio)
    ratio = log_ratio.exp()
    surrogate = advantages * ratio
    clipped_surrogate = advantages * torch.clamp(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    policy_loss = -torch.min(surrogate, clipped_surrogate).mean()

    # Value loss: clipped around the behaviour policy's value estimate.
    behaviour_value = batch["behaviour_value"]
    value_clipped = behaviour_value + torch.clamp(new_value - behaviour_value, -cfg.value_clip, cfg.value_clip)
    value_loss = 0.5 * torch.max((new_value - vs) ** 2, (value_clipped - vs) ** 2).mean()

    entropy = entropy.mean()
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.entropy_bonus * entropy

    with torch.no_grad():
        stats = {
            "ppo_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),  # Schulman's k3 estimator, as CleanRL
            "clip_fraction": ((ratio < 1.0 - cfg.clip_ratio_low) | (ratio > 1.0 + cfg.clip_ratio_high)).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
            "ratio_min": ratio.min(),
            "explained_variance": explained_variance(new_value.detach(), vs),
            "value_mean": new_value.mean(),
            "vtrace_target_mean": vs.mean(),
        }
    return RLLoss(loss, policy_loss, value_loss, entropy, {k: v.detach() for k, v in stats.items()})
