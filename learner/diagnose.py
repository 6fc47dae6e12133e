"""Open-loop diagnostics of a policy against demonstrations (``tandem-diagnose``; also logged by SFT).

  * validation loss: the SFT loss on held-out episodes, in eval mode (no augmentation), with a
    fixed sampling seed so that two checkpoints are scored on the same frames and noise;
  * action error: ``policy.act`` (the deterministic chunk used in closed loop) against the
    demonstrated chunk on the executed steps (the first ``exec_horizon``), per action dimension as
    a fraction of that dimension's standard deviation in the data, and the gripper's sign
    disagreement separately (the gripper is a +-1 command: its error is a wrong open/close).

  tandem-diagnose --policy runs/sft/policy --dataset data/twin_demos [--dataset ...] [--frames 512]
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import numpy as np
import torch

from common.dataset_schema import ACTION_NAMES
from learner.cotrain import sft_inputs

GRIPPER = ACTION_NAMES.index("gripper")


@torch.no_grad()
def validation_loss(policy, replay, batches: int, batch_size: int, seed: int = 0) -> float:
    """Mean SFT loss over ``batches`` fixed batches of ``replay``, eval mode."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    try:
        losses = [float(policy.sft_loss(*sft_inputs(policy, replay.sample(batch_size, policy.chunk_size, rng),
                                                     policy.device), generator=generator))
                  for _ in range(batches)]
    finally:
        policy.train(was_training)
    return float(np.mean(losses))


@torch.no_grad()
def action_errors(policy, replay, frames: int, seed: int = 0, batch_size: int = 256) -> dict:
    """{"mae_over_std": {dim: float}, "gripper_sign_error": float, "frames": int} on the executed steps."""
    rng = np.random.default_rng(seed)
    std = policy.normalizer.action_std.detach().cpu().numpy()
    was_training = policy.training
    policy.eval()
    abs_err, gripper_wrong, weight = np.zeros(len(std)), 0.0, 0.0
    try:
        done = 0
        while done < frames:
            n = min(batch_size, frames - done)
            obs, demo, pad = sft_inputs(policy, replay.sample(n, policy.chunk_size, rng), policy.device)
            k = policy.exec_horizon
            pred = policy.act(obs)[:, :k].float().cpu().numpy()
            want = demo[:, :k].cpu().numpy()
            keep = (~pad[:, :k]).cpu().numpy().astype(np.float64)
            abs_err += (np.abs(pred - want) * keep[..., None]).sum((0, 1))
            wrong = np.sign(pred[..., GRIPPER]) != np.sign(want[..., GRIPPER])
            gripper_wrong += (wrong * keep).sum()
            weight += keep.sum()
            done += n
    finally:
        policy.train(was_training)
    mae = abs_err / max(weight, 1.0) / (std + 1e-8)
    return {"mae_over_std": {name: float(m) for name, m in zip(ACTION_NAMES, mae)},
            "gripper_sign_error": float(gripper_wrong / max(weight, 1.0)), "frames": int(frames)}


def diagnose(policy, train_replay, val_replay: Optional[object], frames: int, batch_size: int, seed: int = 0) -> dict:
    """Action errors on training and held-out frames and the validation loss (when there is a split)."""
    out = {"train": action_errors(policy, train_replay, frames, seed, batch_size)}
    if val_replay is not None and val_replay.sources:
        out["val"] = action_errors(policy, val_replay, frames, seed, batch_size)
        out["val_loss"] = validation_loss(policy, val_replay, max(1, frames // batch_size), batch_size, seed)
    out["train_loss_eval_mode"] = validation_loss(policy, train_replay, max(1, frames // batch_size), batch_size, seed)
    return out


def flat_metrics(report: dict) -> dict[str, float]:
    """TensorBoard scalars of a ``diagnose`` report."""
    out = {}
    for split in ("train", "val"):
        if split in report:
            for dim, v in report[split]["mae_over_std"].items():
                out[f"diag/{split}_mae_{dim}"] = v
            out[f"diag/{split}_gripper_sign_error"] = report[split]["gripper_sign_error"]
    if "val_loss" in report:
        out["sft/val_loss"] = report["val_loss"]
    out["diag/train_loss_eval_mode"] = report["train_loss_eval_mode"]
    return out


def main(argv=None) -> int:
    import os

    from common.policy import load_policy
    from learner.real_replay import RealReplay

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="a policy.save directory")
    ap.add_argument("--dataset", action="append", required=True, help="LeRobot dataset root (repeatable)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="score the last fraction of each dataset's episodes as 'val' (the split tandem-sft holds out)")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policy = load_policy(args.policy, map_location=args.device)
    replay = RealReplay([{"repo_id": f"local/{os.path.basename(r.rstrip('/'))}", "root": r} for r in args.dataset])
    val = replay.hold_out(args.val_fraction, args.seed)
    print(json.dumps(diagnose(policy, replay, val, args.frames, args.batch_size, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
