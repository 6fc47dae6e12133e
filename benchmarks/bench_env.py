"""Twin env throughput on this machine: single env, physx_cpu, control steps per second.

  python -m benchmarks.bench_env [--env twin|real_proxy] [--steps 300 100 20] [--policy random|expert]

Rows: obs_mode "state" (no rendering), RGB 128x128, RGB 640x480 (the RealSense-like default).
Make+reset includes SAPIEN/renderer start-up (the first RGB env also compiles shaders).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common.config import load_config
from common.twin import ScriptedExpert, make_env

CASES = [("state", None), ("rgb", (128, 128)), ("rgb", (480, 640))]


def bench(env_name: str, obs_mode: str, hw, steps: int, policy: str) -> dict:
    overrides = [f"env={env_name}"]
    if hw is not None:
        overrides += [f"env.camera.height={hw[0]}", f"env.camera.width={hw[1]}"]
    cfg = load_config("config", overrides)
    t0 = time.perf_counter()
    env = make_env(cfg.env, obs_mode=obs_mode)
    obs, _ = env.reset(seed=0)
    make_s = time.perf_counter() - t0
    expert = ScriptedExpert(env) if policy == "expert" else None
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    t0 = time.perf_counter()
    resets = 0
    for _ in range(steps):
        action = expert.act(obs) if expert else rng.uniform(low, high).astype(np.float32)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
            resets += 1
            if expert:
                expert.reset()
    dt = time.perf_counter() - t0
    env.close()
    size = "-" if hw is None else f"{hw[1]}x{hw[0]}"
    return dict(obs=obs_mode, size=size, make=make_s, sps=steps / dt, steps=steps, resets=resets)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="twin", choices=["twin", "real_proxy"])
    p.add_argument("--steps", type=int, nargs=3, default=[300, 100, 20], help="steps for state, rgb 128, rgb 640x480")
    p.add_argument("--policy", default="random", choices=["random", "expert"])
    args = p.parse_args()
    rows = [bench(args.env, mode, hw, n, args.policy) for (mode, hw), n in zip(CASES, args.steps)]
    cfg = load_config("config", [f"env={args.env}"]).env
    print(f"\nenv={args.env} policy={args.policy} control_freq={cfg.control_freq} Hz sim_freq={cfg.sim_freq} Hz "
          f"backend={cfg.sim_backend} cpus={os.cpu_count()}")
    print("| obs | image (WxH) | make+reset s | steps/s | steps timed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['obs']} | {r['size']} | {r['make']:.2f} | {r['sps']:.1f} | {r['steps']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
