"""How far Stage II's optimiser steps move a Stage I flow policy, without a simulator (issue #17).

    python -m benchmarks.stage2_step_size --policy checkpoints/stage1_low_data --real DATASET \
        [--lrs 3e-6 1e-5 3e-5] [--steps 74] [--out docs/stage2/step_size.json]

From the Stage I policy, with the learner's optimiser (``learner.cotrain.make_optimizer``: encoder
frozen, a fresh AdamW, the actor learning rate under test), take ``--steps`` steps of the
co-training SFT term alone (``real_batch_size`` real frames per step, augmentation on, as in
Stage II) and report, after each of a few step counts:

- the approximate KL (k3) and the PPO clip fraction (|ratio - 1| > 0.2) of the denoising-chain
  log-probability between the Stage I policy and the moved one, on chains the Stage I policy
  sampled for fixed real frames: how much of PPO's trust region one step of this size uses;
- the flow-matching loss on held-out real episodes (``--holdout`` of the dataset's episodes),
  for the raw weights and for an EMA of them (Stage I ships EMA weights).

The default step count is what the GPU experiment's Stage II took (37 updates x 2 epochs).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from common.config import load_config
from common.policy import load_policy
from learner.cotrain import make_optimizer, sft_inputs
from learner.real_replay import RealReplay

PPO_CLIP = 0.2


@torch.no_grad()
def chain_divergence(policy, ref_obs: dict, chains: torch.Tensor, old_logp: torch.Tensor) -> dict:
    policy.eval()
    new_logp = policy.evaluate(ref_obs, chains).log_prob
    log_ratio = (new_logp - old_logp).clamp(-20, 20)
    ratio = log_ratio.exp()
    return {"approx_kl": float(((ratio - 1) - log_ratio).mean()),
            "clip_fraction": float(((ratio - 1).abs() > PPO_CLIP).float().mean()),
            "mean_abs_log_ratio": float(log_ratio.abs().mean())}


@torch.no_grad()
def heldout_loss(policy, replay: RealReplay, batches: int, batch_size: int) -> float:
    policy.eval()
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    return float(np.mean([float(policy.sft_loss(*sft_inputs(policy, replay.sample(batch_size, policy.chunk_size, rng),
                                                            policy.device), generator=gen))
                          for _ in range(batches)]))


def run_lr(args, lr: float, train: RealReplay, heldout: RealReplay, ref) -> list[dict]:
    torch.manual_seed(0)
    policy = load_policy(args.policy, map_location="cpu")
    cfg = load_config("config", [f"learner.lr={lr}"]).learner
    optimizer = make_optimizer(policy, cfg)
    ema = copy.deepcopy(policy)
    rng = np.random.default_rng(1)
    rows, checkpoints = [], set(args.report_at) | {args.steps}
    for step in range(1, args.steps + 1):
        policy.train()
        obs, actions, pad = sft_inputs(policy, train.sample(int(cfg.real_batch_size), policy.chunk_size, rng), "cpu")
        loss = cfg.sft_loss_weight * policy.sft_loss(obs, actions, pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), policy.parameters()):
                e.lerp_(p, 1 - args.ema)
        if step in checkpoints:
            row = {"lr": lr, "step": step, **chain_divergence(policy, *ref),
                   "heldout_sft_loss": heldout_loss(policy, heldout, args.heldout_batches, args.batch_size),
                   "heldout_sft_loss_ema": heldout_loss(ema, heldout, args.heldout_batches, args.batch_size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--real", required=True, help="the real(-proxy) LeRobot dataset Stage I was trained on")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-6, 1e-5, 3e-5])
    ap.add_argument("--steps", type=int, default=74)
    ap.add_argument("--report-at", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--probe-frames", type=int, default=128)
    ap.add_argument("--heldout-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    replay = RealReplay([{"repo_id": "local/real", "root": a.real}])
    heldout = replay.hold_out(a.holdout)
    stage1 = load_policy(a.policy, map_location="cpu").eval()
    with torch.no_grad():
        probe = replay.sample(a.probe_frames, stage1.chunk_size, np.random.default_rng(2))
        obs, _, _ = sft_inputs(stage1, probe, "cpu")
        out = stage1.sample(obs, generator=torch.Generator().manual_seed(3))
    ref = (obs, out.chain, out.log_prob)
    base = {"lr": 0.0, "step": 0, "heldout_sft_loss": heldout_loss(stage1, heldout, a.heldout_batches, a.batch_size)}
    print(json.dumps(base), flush=True)
    rows = [base] + [r for lr in a.lrs for r in run_lr(a, lr, replay, heldout, ref)]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
