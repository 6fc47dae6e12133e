"""How far a reduced-precision sampler's chain log-probs are from the learner's (issue #20).

    python -m benchmarks.autocast_gap [--policy checkpoints/stage1] [--device cpu|cuda] [--frames 32]

Renders ``--frames`` twin observations (random actions, 128x128 by the checkpoint's env overrides),
samples chains under bf16 autocast and prints |log pi_learner(chain) - log mu_behaviour(chain)| at
equal weights for a float32 learner and for one under the same autocast, with the whole sample, the
observation encoder alone or the action expert alone in bf16. PPO clips the ratio at 1 +- 0.2
(|log-ratio| 0.18), so a gap of that size makes fresh segments look off-policy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from common.config import load_config
from common.device import autocast
from common.policy import load_policy


def twin_frames(policy_dir: Path, n: int, device) -> tuple[dict, list]:
    from common.twin import make_env

    path = policy_dir / "env_overrides.json"
    overrides = json.loads(path.read_text()) if path.exists() else []
    env = make_env(load_config("config", overrides).env, seed=3)
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=0)
    images, states, instructions = [], [], []
    for i in range(n):
        images.append(obs["image"])
        states.append(obs["state"])
        instructions.append(info["instruction"])
        if i % 4 == 3:  # 4 frames an episode
            obs, info = env.reset(seed=i)
        else:
            obs, *_, info = env.step(rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32))
    env.close()
    return {"image": torch.from_numpy(np.stack(images)).to(device),
            "state": torch.from_numpy(np.stack(states)).to(device)}, instructions


def in_bf16(module: torch.nn.Module, device):
    """Run ``module.forward`` under bf16 autocast (an instance attribute shadowing the method), a
    tensor result back in float32 for the float32 modules after it."""
    forward = module.forward

    def wrapped(*a, **k):
        with autocast(device, torch.bfloat16):
            out = forward(*a, **k)
        return out.float() if torch.is_tensor(out) else out
    module.forward = wrapped
    return lambda: delattr(module, "forward")


@torch.no_grad()
def gaps(policy, obs, scope: str) -> dict:
    dev = policy.device
    undo = None
    if scope == "encoder":
        undo = in_bf16(policy.encoder, dev)
    elif scope == "expert":
        undo = in_bf16(policy.expert, dev)
    with autocast(dev, torch.bfloat16 if scope == "all" else None):
        out = policy.sample(obs, generator=torch.Generator(device=dev).manual_seed(1))
        same = policy.evaluate(obs, out.chain).log_prob
    if undo:
        undo()
    fp32 = policy.evaluate(obs, out.chain).log_prob
    d32, dsame = (fp32 - out.log_prob).abs().cpu().numpy(), (same - out.log_prob).abs().cpu().numpy()
    return {"scope": scope, "logp_dtype": str(out.log_prob.dtype), "logp_mean": float(out.log_prob.mean()),
            "fp32_learner": {"mean": float(d32.mean()), "p95": float(np.percentile(d32, 95)), "max": float(d32.max())},
            "same_autocast_learner_max": float(dsame.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", type=Path, default=ROOT / "checkpoints" / "stage1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=32)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    policy = load_policy(str(args.policy)).to(dev).eval()
    obs, instructions = twin_frames(args.policy, args.frames, dev)
    obs["tokens"] = policy.tokenize(instructions).to(dev)
    for scope in ("all", "encoder", "expert"):
        print(json.dumps(gaps(policy, obs, scope)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
