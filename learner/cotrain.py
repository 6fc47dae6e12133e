"""Sim-real co-training: ``total = L_RL + sft_loss_weight * L_SFT`` and one optimiser update.

``L_RL`` is ``learner.ppo.ppo_loss`` on a sim batch; ``L_SFT`` is ``policy.sft_loss`` (the
flow-matching loss) on a real batch from ``learner.real_replay``. With
``use_real_data_co_training: false`` it is plain PPO: no SFT term and no real batch is drawn.

Logged names (the contract with dashboards): ``train/ppo_loss`` (PPO surrogate),
``train/sft_loss``, ``actor/total_loss``, ``train/loss_ratio`` = beta * |L_SFT| / |L_RL|, plus
value loss, entropy, approx KL, clip fraction and importance-ratio statistics.
``train/loss_ratio`` divides by ``max(|L_RL|, loss_ratio_eps)`` so that it stays finite (and
large, which is the right alarm) when L_RL is exactly 0; it is 0 when co-training is off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from common.device import autocast, autocast_dtype
from learner.ppo import ppo_loss

MAX_REDUCED = ("train/ratio_max",)
MIN_REDUCED = ("train/ratio_min",)


def loss_ratio(sft_loss_weight: float, sft_loss: float, rl_loss: float, eps: float) -> float:
    return sft_loss_weight * abs(sft_loss) / max(abs(rl_loss), eps)


def sft_inputs(policy, real_batch: dict, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A ``RealReplay.sample`` batch (numpy) -> (policy Obs, actions [B,H,7], action_pad [B,H]) on ``device``."""
    state = torch.as_tensor(real_batch["state"], device=device)
    obs = {
        "image": torch.as_tensor(real_batch["image"], device=device),
        "tokens": policy.tokenize(list(real_batch["task"])).to(device),
        "state": state if state.shape[-1] > 0 else None,
    }
    if "privileged" in real_batch:
        obs["privileged"] = torch.as_tensor(real_batch["privileged"], device=device)
    return (obs, torch.as_tensor(real_batch["actions"], device=device),
            torch.as_tensor(real_batch["action_pad"], device=device))


@dataclass
class CoTrainLoss:
    total: torch.Tensor  # actor/total_loss, with gradient
    rl: torch.Tensor  # L_RL = policy + vf_coef * value - entropy_bonus * entropy
    sft: Optional[torch.Tensor]  # L_SFT, None when co-training is off
    stats: dict[str, torch.Tensor]  # detached scalars under their logged names


def cotrain_loss(policy, sim_batch: dict, real_batch: Optional[dict], cfg, critic_only: bool = False) -> CoTrainLoss:
    """total = L_RL + beta * L_SFT; with ``critic_only`` (critic warm-up) just vf_coef * value loss."""
    rl = ppo_loss(policy, sim_batch, cfg)
    stats = {f"train/{k}": v for k, v in rl.stats.items()}
    stats["train/rl_loss"] = rl.loss.detach()
    if critic_only:
        total = cfg.vf_coef * rl.value_loss
        stats["actor/total_loss"] = total.detach()
        return CoTrainLoss(total, rl.loss, None, stats)
    if cfg.use_real_data_co_training:
        if real_batch is None:
            raise ValueError("use_real_data_co_training is on but no real batch was given")
        sft = policy.sft_loss(*sft_inputs(policy, real_batch, rl.loss.device))
        total = rl.loss + cfg.sft_loss_weight * sft
        stats["train/sft_loss"] = sft.detach()
    else:
        sft, total = None, rl.loss
    stats["actor/total_loss"] = total.detach()
    return CoTrainLoss(total, rl.loss, sft, stats)


def reduce_stats(per_micro_batch: list[dict[str, torch.Tensor]], weights: list[float], cfg) -> dict[str, float]:
    """Weighted mean over micro-batches (max/min for the ratio extremes), one device sync, then
    ``train/loss_ratio`` from the mean losses."""
    keys = list(per_micro_batch[0])
    values = torch.stack([torch.stack([s[k].float() for k in keys]) for s in per_micro_batch]).cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)[:, None] / sum(weights)
    out = dict(zip(keys, (w * values).sum(0).tolist()))
    for i, k in enumerate(keys):
        if k in MAX_REDUCED:
            out[k] = float(values[:, i].max())
        elif k in MIN_REDUCED:
            out[k] = float(values[:, i].min())
    out["train/loss_ratio"] = (loss_ratio(cfg.sft_loss_weight, out["train/sft_loss"], out["train/rl_loss"],
                                          cfg.loss_ratio_eps) if "train/sft_loss" in out else 0.0)
    return out


def make_optimizer(policy, cfg) -> torch.optim.Optimizer:
    """AdamW from the ``learner`` (or ``sft``) config: the value head at ``value_lr`` (null: ``lr``),
    every other trainable parameter at ``lr``. ``freeze_encoder`` first freezes the observation
    encoder (RL then trains the action expert, noise and value heads: RLinf's train_expert_only)."""
    if cfg.get("freeze_encoder", False):
        encoder = getattr(policy, "encoder", None)
        if encoder is None:
            raise ValueError(f"freeze_encoder: {type(policy).__name__} has no `encoder` module")
        encoder.requires_grad_(False)
    value_head = getattr(policy, "value_head", None)
    critic_ids = {id(p) for p in value_head.parameters()} if value_head is not None else set()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    value_lr = cfg.get("value_lr") or cfg.lr
    groups = [{"params": [p for p in trainable if id(p) not in critic_ids], "lr": cfg.lr, "name": "actor",
               "base_lr": cfg.lr},
              {"params": [p for p in trainable if id(p) in critic_ids], "lr": value_lr, "name": "critic",
               "base_lr": value_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def split_segments(batch: dict, micro_batch_size: int) -> list[dict]:
    """Split a [T(+1), B, ...] batch along B (segments are independent, so V-trace is exact per part).
    One-dimensional entries (per-segment, e.g. ``policy_lag`` [B]) are split along dim 0."""
    num_segments = batch["reward"].shape[1]
    parts = []
    for start in range(0, num_segments, micro_batch_size):
        end = min(start + micro_batch_size, num_segments)
        parts.append({k: v[:, start:end] if v.dim() >= 2 else v[start:end] for k, v in batch.items()})
    return parts


def step_is_finite(grad_norm: torch.Tensor, epoch_stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Whether an optimiser step's gradient norm and every micro-batch's total loss are finite
    (a boolean tensor on their device: one sync when read)."""
    values = [grad_norm.float().reshape(1), *(s["actor/total_loss"].float().reshape(1) for s in epoch_stats)]
    return torch.isfinite(torch.cat(values)).all()


def train_step(policy, optimizer: torch.optim.Optimizer, sim_batch: dict, cfg,
               real_replay=None, rng: Optional[np.random.Generator] = None, critic_only: bool = False) -> dict[str, float]:
    """``cfg.update_epoch`` optimiser steps on one sim batch. Each step accumulates gradients over
    micro-batches of ``cfg.micro_batch_size`` segments (each with its share of
    ``cfg.real_batch_size`` real samples), clips the global grad norm to ``cfg.clip_grad`` and
    steps. Returns the logged stats averaged over all micro-batches (``train/real_samples``: real
    samples drawn, summed)."""
    micro_batches = split_segments(sim_batch, cfg.micro_batch_size)
    num_segments = sim_batch["reward"].shape[1]
    co_train = bool(cfg.use_real_data_co_training) and not critic_only
    if co_train and real_replay is None:
        raise ValueError("use_real_data_co_training is on but no real replay was given")
    policy.train()
    amp = autocast_dtype(cfg.get("autocast_dtype"))
    per_micro, weights, grad_norms, real_samples = [], [], [], 0
    target_kl, epochs_done, skipped = cfg.get("target_kl"), 0, 0
    for epoch in range(cfg.update_epoch):
        optimizer.zero_grad(set_to_none=True)
        first_micro = len(per_micro)
        for micro in micro_batches:
            share = micro["reward"].shape[1] / num_segments
            real_batch = None
            if co_train:
                real_batch = real_replay.sample(max(1, math.ceil(cfg.real_batch_size * share)),
                                                policy.chunk_size, rng)
                real_samples += len(real_batch["task"])
            with autocast(policy.device, amp):
                out = cotrain_loss(policy, micro, real_batch, cfg, critic_only)
            (out.total * share).backward()
            per_micro.append(out.stats)
            weights.append(share)
        if target_kl and epoch > 0:
            # early stop (PPO's target KL): this epoch's forward pass already moved too far from the
            # behaviour policy, so its step is skipped and the update ends
            kl = sum(w * float(s["train/approx_kl"]) for s, w in zip(per_micro[first_micro:], weights[first_micro:]))
            if kl > target_kl:
                del per_micro[first_micro:], weights[first_micro:]
                optimizer.zero_grad(set_to_none=True)
                break
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad).detach()
        if not bool(step_is_finite(grad_norm, per_micro[first_micro:])):  # no step: the weights stay finite
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        grad_norms.append(grad_norm)
        optimizer.step()
        epochs_done += 1
    stats = reduce_stats(per_micro, weights, cfg)
    stats["train/epochs_done"] = float(epochs_done)
    stats["train/skipped_nonfinite_steps"] = float(skipped)
    stats["train/grad_norm"] = float(torch.stack(grad_norms).float().mean()) if grad_norms else float("nan")
    stats["train/lr"] = float(optimizer.param_groups[0]["lr"])
    stats["train/real_samples"] = float(real_samples)  # drawn over all epochs, for the learner's counters
    return stats
