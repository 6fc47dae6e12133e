"""Micro-benchmark of the policy: samples/s of sample, evaluate, act and the SFT loss.

    python -m benchmarks.bench_policy --preset tiny --device cpu
    python -m benchmarks.bench_policy --preset base --device cuda --batch-sizes 1 16 64 256

"evaluate+bwd" and "sft+bwd" include the backward pass (what a learner step costs, minus the
optimiser). Random weights and inputs; the numbers measure compute, not quality.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.config import load_policy_preset
from common.policy import make_policy


def random_obs(policy, batch: int, device, hw) -> dict:
    return {
        "image": torch.randint(0, 256, (batch, *hw, 3), dtype=torch.uint8, device=device),
        "tokens": policy.tokenize(["put the red cube in the bowl"] * batch).to(device),
        "state": torch.randn(batch, policy.state_dim, device=device),
    }


def timed(fn, device, min_time: float, max_iters: int) -> float:
    """Seconds per call, after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or iters >= max_iters:
            return elapsed / iters


def consistency(policy, device, hw, batch: int) -> None:
    obs = random_obs(policy, batch, device, hw)
    with torch.no_grad():
        out = policy.sample(obs)
        full = policy.evaluate(obs, out.chain).log_prob
        alone = policy.evaluate({k: v[:1] for k, v in obs.items()}, out.chain[:1]).log_prob
        gaps = {"sample vs evaluate": (out.log_prob - full).abs().max().item(),
                "row alone vs in batch": (alone - full[:1]).abs().max().item()}
        if device.type != "cpu":
            cpu_policy = policy.to("cpu")
            cpu_obs = {k: v.cpu() for k, v in obs.items()}
            gaps["cpu vs " + device.type] = (cpu_policy.evaluate(cpu_obs, out.chain.cpu()).log_prob
                                             - full.cpu()).abs().max().item()
            policy.to(device)
    print(f"log-prob gaps (batch {batch}, |log_prob| ~ {full.abs().mean().item():.0f}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="configs/policy/<preset>.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--image-hw", type=int, nargs=2, default=None,
                    help="size of the images fed in (default: the preset's image_size, so no resize; "
                         "480 640 adds the camera-size resize)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16 autocast around every call (the Gaussian log-prob math stays float32)")
    ap.add_argument("--check", action="store_true",
                    help="also print |sample - evaluate| log-prob gaps: same batch, one row alone, and "
                         "(device != cpu) the same weights evaluated on the CPU")
    ap.add_argument("--json", type=str, default="", help="also write the results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = load_policy_preset(args.preset)
    policy = make_policy(cfg).to(device).eval()
    hw = tuple(args.image_hw) if args.image_hw else (policy.image_size, policy.image_size)
    counts = {name: sum(p.numel() for p in getattr(policy, name).parameters())
              for name in ("encoder", "expert", "value_head")}
    counts["total"] = policy.num_parameters()
    print(f"preset={args.preset} device={device} threads={torch.get_num_threads()} "
          f"autocast={args.autocast} K={policy.num_denoise_steps} H={policy.chunk_size} image={hw[0]}x{hw[1]}->{policy.image_size}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    results = []
    print(f"{'batch':>6} {'sample':>10} {'evaluate':>10} {'eval+bwd':>10} {'act':>10} {'sft+bwd':>10}   (samples/s)")
    for B in args.batch_sizes:
        obs = random_obs(policy, B, device, hw)
        with torch.no_grad():
            chain = policy.sample(obs).chain
        demo = torch.randn(B, policy.chunk_size, policy.action_dim, device=device)

        def sample():
            with torch.no_grad():
                policy.sample(obs)

        def evaluate():
            with torch.no_grad():
                policy.evaluate(obs, chain)

        def evaluate_bwd():
            out = policy.evaluate(obs, chain)
            (out.log_prob.sum() + out.value.sum() + out.entropy.sum()).backward()

        def act():
            policy.act(obs)

        def sft_bwd():
            policy.sft_loss(obs, demo).backward()

        row = {"batch": B}
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
        for name, fn in [("sample", sample), ("evaluate", evaluate), ("evaluate_bwd", evaluate_bwd),
                         ("act", act), ("sft_bwd", sft_bwd)]:
            with amp:
                row[name] = B / timed(fn, device, args.min_time, args.max_iters)
        policy.zero_grad(set_to_none=True)
        results.append(row)
        print(f"{B:>6} " + " ".join(f"{row[k]:>10.1f}" for k in ("sample", "evaluate", "evaluate_bwd", "act", "sft_bwd")))

    if args.check:
        consistency(policy, device, hw, min(max(args.batch_sizes), 16))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "device": str(device),
                                                "threads": torch.get_num_threads(), "autocast": args.autocast, "parameters": counts,
                                                "samples_per_s": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
