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

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import numpy as np
import torch

from common.device import autocast, autocast_dtype
from learner.ppo import ppo_loss

MAX_REDUCED = ("train/ratio_max",)
MIN_REDUCED = ("train/ratio_min",)


def loss_ratio(sft_loss_weight: float, sft_loss: float, rl_loss: float, eps: float) -> float:
    return sft_loss_weight * abs(sft_loss) / max(abs(rl_loss), eps)


def sft_inputs(policy, real_batch: dict, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A ``RealReplay.sample`` batch (numpy) -> (policy Obs, actions [B,H,7], action_pad [B,H]) on ``device``.
    Instructions come as ``task`` strings or, from the success replay, as ``tokens`` already."""
    state = torch.as_tensor(real_batch["state"], device=device)
    tokens = (torch.as_tensor(real_batch["tokens"], device=device).long() if "tokens" in real_batch
              else policy.tokenize(list(real_batch["task"])).to(device))
    obs = {
        "image": torch.as_tensor(real_batch["image"], device=device),
        "tokens": tokens,
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
    """total = L_RL + beta * L_SFT, the SFT term on ``real_batch`` (None: plain PPO); with
    ``critic_only`` (critic warm-up) just vf_coef * value loss."""
    rl = ppo_loss(policy, sim_batch, cfg)
    stats = {f"train/{k}": v for k, v in rl.stats.items()}
    stats["train/rl_loss"] = rl.loss.detach()
    if critic_only:
        total = cfg.vf_coef * rl.value_loss
        stats["actor/total_loss"] = total.detach()
        return CoTrainLoss(total, rl.loss, None, stats)
    if real_batch is not None:
        sft = policy.sft_loss(*sft_inputs(policy, real_batch, rl.loss.device))
        total = rl.loss + cfg.sft_loss_weight * sft
        stats["train/sft_loss"] = sft.detach()
    else:
        sft, total = None, rl.loss
    stats["actor/total_loss"] = total.detach()
    return CoTrainLoss(total, rl.loss, sft, stats)


class CoTrainLossModule(torch.nn.Module):
    """The co-training loss as one forward, so that DDP sees exactly one forward per backward
    (``ppo_loss`` calls several policy methods, not ``policy.forward``)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, sim_batch: dict, real_batch: Optional[dict], cfg, critic_only: bool = False):
        out = cotrain_loss(self.policy, sim_batch, real_batch, cfg, critic_only)
        return out.total, out.stats


def with_loss_ratio(stats: dict[str, float], cfg) -> dict[str, float]:
    """``train/loss_ratio`` from the (already reduced) mean losses; 0 without an SFT term."""
    stats["train/loss_ratio"] = (loss_ratio(cfg.sft_loss_weight, stats["train/sft_loss"], stats["train/rl_loss"],
                                            cfg.loss_ratio_eps) if "train/sft_loss" in stats else 0.0)
    return stats


def reduce_stats(per_micro_batch: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, float]:
    """Weighted mean over micro-batches (max/min for the ratio extremes), one device sync."""
    keys = list(per_micro_batch[0])
    values = torch.stack([torch.stack([s[k].float() for k in keys]) for s in per_micro_batch]).cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)[:, None] / sum(weights)
    out = dict(zip(keys, (w * values).sum(0).tolist()))
    for i, k in enumerate(keys):
        if k in MAX_REDUCED:
            out[k] = float(values[:, i].max())
        elif k in MIN_REDUCED:
            out[k] = float(values[:, i].min())
    return out


def actor_settings(cfg) -> tuple[float, bool]:
    """(actor lr, freeze_encoder) of a ``learner`` (or ``sft``) config: filtered BC's own under
    ``rl_objective: filtered_bc``, else the top-level ones."""
    src = cfg.filtered_bc if cfg.get("rl_objective", "ppo") == "filtered_bc" else cfg
    return float(src.lr), bool(src.get("freeze_encoder", False))


def make_optimizer(policy, cfg) -> torch.optim.Optimizer:
    """AdamW from the ``learner`` (or ``sft``) config: the value head at ``value_lr`` (null: the actor's
    rate), every other trainable parameter at the actor's rate (``actor_settings``). ``freeze_encoder``
    first freezes the observation encoder (RL then trains the action expert, noise and value heads:
    RLinf's train_expert_only)."""
    lr, freeze_encoder = actor_settings(cfg)
    if freeze_encoder:
        encoder = getattr(policy, "encoder", None)
        if encoder is None:
            raise ValueError(f"freeze_encoder: {type(policy).__name__} has no `encoder` module")
        encoder.requires_grad_(False)
    value_head = getattr(policy, "value_head", None)
    critic_ids = {id(p) for p in value_head.parameters()} if value_head is not None else set()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    value_lr = cfg.get("value_lr") or lr
    groups = [{"params": [p for p in trainable if id(p) not in critic_ids], "lr": lr, "name": "actor",
               "base_lr": lr},
              {"params": [p for p in trainable if id(p) in critic_ids], "lr": value_lr, "name": "critic",
               "base_lr": value_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def warm_up_actor_lr(optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
    """Linear warm-up of the actor group's rate over its first ``warmup_steps`` optimiser steps (counted
    by Adam's own step count, so it is the same on every rank and survives a resume).
    Why: a fresh Adam moves every parameter by ~lr in its first step whatever the gradient's size
    (bias-corrected m / sqrt(v) = sign(g)), and the target KL cannot stop an update's first step: every
    Stage II run on the H200 opened with approx. KL 0.12-0.3 and a clip fraction up to 0.55 at the first
    actor update, 10x the later ones (docs/stage2.md, experiment 4)."""
    for group in optimizer.param_groups:
        if group.get("name") != "actor" or warmup_steps <= 0:
            continue
        # max over the group: a parameter that got no gradient yet (e.g. an unused token) has no state
        done = max((int(optimizer.state[p]["step"]) for p in group["params"] if "step" in optimizer.state.get(p, {})),
                   default=0)
        group["lr"] = group["base_lr"] * min(1.0, (done + 1) / warmup_steps)


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


@dataclass(frozen=True)
class GradSync:
    """How one optimiser step is shared by data-parallel ranks (``learner.distributed``); the
    defaults are one rank, where every hook is the identity."""
    # around each micro-batch but an epoch's last: accumulate locally, all-reduce once per step
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext
    any_rank: Callable[[bool], bool] = bool  # a decision every rank must take alike
    reduce: Callable[[dict], dict] = dict  # this rank's stats -> the global batch's
    sum_over_ranks: Callable[[float], float] = float


ONE_RANK = GradSync()
RealBatches = Callable[[int, int, int], dict]  # (epoch, micro-batch, samples) -> a real batch


def train_step(policy, optimizer: torch.optim.Optimizer, sim_batch: dict, cfg,
               real_replay=None, rng: Optional[np.random.Generator] = None, critic_only: bool = False,
               co_train: Optional[bool] = None) -> dict[str, float]:
    """One update on one process: ``optimizer_update`` with real samples drawn from ``real_replay``.
    ``co_train`` (default ``cfg.use_real_data_co_training``) adds the SFT term."""
    co_train = bool(cfg.use_real_data_co_training) if co_train is None else co_train
    if co_train and not critic_only and real_replay is None:
        raise ValueError("use_real_data_co_training is on but no real replay was given")
    real = (lambda epoch, micro, n: real_replay.sample(n, policy.chunk_size, rng)) if co_train else None
    return optimizer_update(CoTrainLossModule(policy), policy, optimizer, sim_batch, cfg, real, critic_only)


def filtered_bc_update(policy, optimizer: torch.optim.Optimizer, cfg, success_replay,
                       real_batches: Optional[Callable[[int], dict]], rng: np.random.Generator,
                       after_step: Callable[[], None] = lambda: None) -> dict[str, float]:
    """``learner.rl_objective: filtered_bc``: ``cfg.filtered_bc.steps_per_update`` optimiser steps, each on
    ``total = L_RL + sft_loss_weight * L_SFT`` where L_RL is the flow-matching loss on
    ``filtered_bc.batch_size`` chunk-steps of the policy's own successful twin episodes
    (``learner.success_replay``) and L_SFT the same loss on ``real_batch_size`` real samples from
    ``real_batches(n)`` (None: no SFT term). Actions in the success replay are normalised, as the
    chains held them; ``to_env_actions`` hands ``sft_loss`` what the env received. ``after_step`` runs
    after each optimiser step (the learner's EMA of the weights)."""
    fbc = cfg.filtered_bc
    device = policy.device
    policy.train()
    amp = autocast_dtype(cfg.get("autocast_dtype"))
    per_step, grad_norms, real_samples, skipped = [], [], 0, 0
    for _ in range(int(fbc.steps_per_update)):
        optimizer.zero_grad(set_to_none=True)
        sim = success_replay.sample(int(fbc.batch_size), policy.chunk_size, rng)
        sim["actions"] = policy.to_env_actions(torch.as_tensor(sim["actions"], device=device))
        with autocast(policy.device, amp):
            rl = policy.sft_loss(*sft_inputs(policy, sim, device))
            stats = {"train/rl_loss": rl.detach()}
            total = rl
            if real_batches is not None:
                real = real_batches(int(cfg.real_batch_size))
                real_samples += len(real["task"])
                sft = policy.sft_loss(*sft_inputs(policy, real, device))
                total = rl + cfg.sft_loss_weight * sft
                stats["train/sft_loss"] = sft.detach()
        stats["actor/total_loss"] = total.detach()
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad).detach()
        if not bool(step_is_finite(grad_norm, [stats])):  # the weights stay finite
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        grad_norms.append(grad_norm)
        warm_up_actor_lr(optimizer, int(fbc.get("lr_warmup_steps") or 0))
        optimizer.step()
        after_step()
        per_step.append(stats)
    out = with_loss_ratio(reduce_stats(per_step, [1.0] * len(per_step)), cfg) if per_step else {}
    out.update({"train/optimizer_steps": float(len(per_step)), "train/skipped_nonfinite_steps": float(skipped),
                "train/grad_norm": float(torch.stack(grad_norms).float().mean()) if grad_norms else float("nan"),
                "train/lr": float(optimizer.param_groups[0]["lr"]), "train/real_samples": float(real_samples)})
    return out


def optimizer_update(model: torch.nn.Module, policy, optimizer: torch.optim.Optimizer, sim_batch: dict, cfg,
                     real_batches: Optional[RealBatches], critic_only: bool = False,
                     sync: GradSync = ONE_RANK) -> dict[str, float]:
    """``cfg.update_epoch`` passes over one (shard of a) sim batch, each split into
    ``cfg.num_minibatches`` minibatches of segments (ceil-sized, so for a batch that does not divide
    evenly possibly fewer) with one optimiser step each (PPO's minibatches).
    A step accumulates gradients over micro-batches of ``cfg.micro_batch_size`` segments (each with
    its share of ``cfg.real_batch_size`` real samples per minibatch from ``real_batches``; None: plain
    PPO), clips the global grad norm to ``cfg.clip_grad`` and steps; a step whose loss or gradient is
    not finite on any rank is skipped on all. ``model``: ``CoTrainLossModule`` (wrapped for data
    parallelism). Returns the logged stats of the global batch (``train/real_samples``: real
    samples drawn, summed)."""
    num_segments = sim_batch["reward"].shape[1]
    num_minibatches = int(cfg.get("num_minibatches") or 1)
    if not 1 <= num_minibatches <= num_segments:
        raise ValueError(f"learner.num_minibatches={num_minibatches}: expected 1..{num_segments} (segments per update)")
    # contiguous minibatches: a batch's segments already come from many envs in arrival order
    minibatches = [split_segments(mb, cfg.micro_batch_size)
                   for mb in split_segments(sim_batch, math.ceil(num_segments / num_minibatches))]
    co_train = real_batches is not None and not critic_only
    policy.train()
    amp = autocast_dtype(cfg.get("autocast_dtype"))
    per_micro, weights, grad_norms, real_samples = [], [], [], 0
    target_kl, steps_done, skipped, stopped = cfg.get("target_kl"), 0, 0, False
    last_kl = None  # the KL of the last forward pass, a stopping step's included (its stats are dropped)
    for epoch in range(cfg.update_epoch):
        micro_index = 0  # real_batches' micro-batch index within the epoch
        for step_in_epoch, micro_batches in enumerate(minibatches):
            optimizer.zero_grad(set_to_none=True)
            first_micro = len(per_micro)
            step_segments = sum(m["reward"].shape[1] for m in micro_batches)
            for i, micro in enumerate(micro_batches):
                share = micro["reward"].shape[1] / step_segments
                real_batch = None
                if co_train:
                    real_batch = real_batches(epoch, micro_index, max(1, math.ceil(cfg.real_batch_size * share)))
                    real_samples += len(real_batch["task"])
                micro_index += 1
                last = i == len(micro_batches) - 1
                with (contextlib.nullcontext() if last else sync.no_sync()):
                    with autocast(policy.device, amp):
                        total, stats = model(micro, real_batch, cfg, critic_only)
                    (total * share).backward()
                per_micro.append(stats)
                weights.append(micro["reward"].shape[1] / num_segments)
            last_kl = (sum(w * s["train/approx_kl"].float() for s, w in zip(per_micro[first_micro:], weights[first_micro:]))
                       / sum(weights[first_micro:]))
            if target_kl and (epoch > 0 or step_in_epoch > 0):
                # early stop (PPO's target KL): this step's forward pass already moved too far from the
                # behaviour policy, so its step is skipped and the update ends
                kl = float(last_kl)
                if sync.any_rank(kl > target_kl):
                    del per_micro[first_micro:], weights[first_micro:]
                    optimizer.zero_grad(set_to_none=True)
                    stopped = True
                    break
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad).detach()
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # fsdp: a DTensor
            if sync.any_rank(not bool(step_is_finite(grad_norm, per_micro[first_micro:]))):  # the weights stay finite
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norms.append(grad_norm)  # identical on every rank: the gradients are
            if not critic_only:
                warm_up_actor_lr(optimizer, int(cfg.get("actor_lr_warmup_steps") or 0))
            optimizer.step()
            steps_done += 1
        if stopped:
            break
    local = reduce_stats(per_micro, weights)
    # train/approx_kl averages the applied steps' forward passes (0 at the first); this is how far the
    # update had moved when it ended: with one step per pass, the KL after the first step
    local["train/approx_kl_last"] = float(last_kl) if last_kl is not None else 0.0
    stats = with_loss_ratio(sync.reduce(local), cfg)
    stats["train/optimizer_steps"] = float(steps_done)
    stats["train/epochs_done"] = steps_done / len(minibatches)  # ceil-sized parts: at most num_minibatches
    stats["train/skipped_nonfinite_steps"] = float(skipped)
    stats["train/grad_norm"] = float(torch.stack(grad_norms).float().mean()) if grad_norms else float("nan")
    stats["train/lr"] = float(optimizer.param_groups[0]["lr"])  # the actor's (group 0), warm-up included
    stats["train/real_samples"] = sync.sum_over_ranks(float(real_samples))  # for the learner's counters
    return stats
