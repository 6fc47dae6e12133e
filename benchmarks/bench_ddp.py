"""Data-parallel learner throughput: training samples/s with 1, 2, 4, 8 ranks (issue #11).

    python -m benchmarks.bench_ddp --nproc 1 2 4 8 --preset base --device cuda     # a multi-GPU host
    python -m benchmarks.bench_ddp --nproc 1 2 --preset tiny --device cpu          # CPU, gloo
    python -m benchmarks.bench_ddp --nproc 1 2 4 8 --preset base --device cuda --strategy fsdp

Each row is one ``torchrun --standalone --nproc_per_node N`` run of the learner's own update path
(``learner.distributed.DataParallelTrainer.lead``: rank 0 shards the global batch and the real
samples, scatters them, every rank trains on its shard, DDP all-reduces the gradients), fed with
synthetic segments straight from memory, no actors. Weak scaling: every rank gets
``--segments-per-rank`` segments of ``--rollout-steps`` chunk-steps per update, so the global
batch grows with N. samples/s counts chunk-steps trained on; scaling efficiency =
samples/s(N) / (N * samples/s(1)).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch


def synthetic_batch(policy, num_segments: int, steps: int, image_size: int, device) -> dict:
    """A [T(+1), B] batch as the batcher builds it, with behaviour outputs from ``policy.sample``."""
    from common.segment import SegmentSpec
    from learner.batcher import Batcher

    spec = SegmentSpec(steps=steps, image_hw=(image_size, image_size), token_len=policy.token_len,
                       state_dim=policy.state_dim, num_denoise_steps=policy.num_denoise_steps,
                       chunk_size=policy.chunk_size)
    batcher = Batcher(num_segments, max_policy_lag=0, max_queued_segments=num_segments)
    rng = np.random.default_rng(0)
    tokens = policy.tokenize(["put the red cube in the bowl"]).numpy()
    for _ in range(num_segments):
        seg = spec.empty()
        seg["image"][:] = rng.integers(0, 256, seg["image"].shape, dtype=np.uint8)
        seg["tokens"][:] = tokens
        seg["state"][:] = rng.normal(size=seg["state"].shape)
        obs = {"image": torch.from_numpy(seg["image"][:steps]).to(device),
               "tokens": torch.from_numpy(seg["tokens"][:steps]).long().to(device),
               "state": torch.from_numpy(seg["state"][:steps]).to(device)}
        with torch.no_grad():
            out = policy.sample(obs)
        seg["chain"][:] = out.chain.cpu().numpy()
        seg["behaviour_logp"][:] = out.log_prob.cpu().numpy()
        seg["behaviour_value"][:] = out.value.cpu().numpy()
        seg["reward"][:] = rng.normal(size=steps)
        seg["done"][:] = rng.random(steps) < 0.1
        batcher.add(seg, policy_version=0, current_version=0)
    return batcher.next_batch(current_version=0)


class SyntheticReplay:
    """Random real samples in ``RealReplay.sample``'s layout."""

    def __init__(self, image_size: int, state_dim: int):
        self.image_size, self.state_dim = image_size, state_dim
        self.rng = np.random.default_rng(1)

    def sample(self, batch_size, chunk_size, generator=None):
        r = self.rng
        return {"image": r.integers(0, 256, (batch_size, self.image_size, self.image_size, 3), dtype=np.uint8),
                "state": r.normal(size=(batch_size, self.state_dim)).astype(np.float32),
                "actions": r.normal(size=(batch_size, chunk_size, 7)).astype(np.float32),
                "action_pad": np.zeros((batch_size, chunk_size), bool), "task": ["put the red cube in the bowl"] * batch_size}

    def size(self):
        return {"frames": 1, "episodes": 1}


def worker(args) -> None:
    """One rank, under torchrun."""
    from common.config import load_config
    from common.policy import make_policy
    from learner import distributed
    from learner.cotrain import make_optimizer

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config("config", [f"policy={args.preset}", f"device={args.device}",
                                 f"learner.distributed.strategy={args.strategy}",
                                 f"learner.global_batch_size={args.segments_per_rank * world}",
                                 f"learner.micro_batch_size={args.micro_batch_size or args.segments_per_rank}",
                                 f"learner.real_batch_size={args.real_per_rank * world}",
                                 f"learner.use_real_data_co_training={str(args.real_per_rank > 0).lower()}"])
    if args.device == "cpu":
        torch.set_num_threads(args.threads_per_rank)
    ctx = distributed.init(cfg.learner.distributed, args.device)
    torch.manual_seed(0)
    policy = make_policy(cfg.policy).to(ctx.device)
    trainer = distributed.DataParallelTrainer(policy, lambda p: make_optimizer(p, cfg.learner), cfg.learner, ctx)
    co_train = args.real_per_rank > 0
    if ctx.rank == 0:
        batch = synthetic_batch(policy, cfg.learner.global_batch_size, args.rollout_steps, args.image_size, ctx.device)
        batch = {k: v.cpu() for k, v in batch.items()}
        replay, rng = SyntheticReplay(args.image_size, policy.state_dim), np.random.default_rng(0)
        for _ in range(args.warmup):
            trainer.lead(batch, co_train, replay, rng)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            stats = trainer.lead(batch, co_train, replay, rng)  # ends in a stats all-reduce: synchronous
        elapsed = time.perf_counter() - t0
        trainer.stop_followers()
        samples = args.steps * cfg.learner.global_batch_size * args.rollout_steps
        result = {"ranks": world, "device": str(ctx.device.type), "preset": args.preset, "strategy": args.strategy,
                  "global_batch_segments": cfg.learner.global_batch_size, "updates_per_s": args.steps / elapsed,
                  "samples_per_s": samples / elapsed, "real_per_s": args.steps * stats["train/real_samples"] / elapsed,
                  "parameters": sum(p.numel() for p in policy.parameters())}
        Path(args.out).write_text(json.dumps(result))
    else:
        trainer.follow()
    distributed.shutdown(ctx, trainer)


def launch(args, nproc: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_ddp_")) / "result.json"
    forwarded = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                 if name not in ("nproc", "worker", "out")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--out", str(out), *forwarded]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads_per_rank)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="ranks per run (one run each)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--segments-per-rank", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=0, help="0: the whole shard in one forward")
    p.add_argument("--real-per-rank", type=int, default=8, help="real (SFT) samples per rank per update; 0: PPO only")
    p.add_argument("--rollout-steps", type=int, default=8, help="T chunk-steps per segment")
    p.add_argument("--image-size", type=int, default=64, help="segment image side (the policy resizes)")
    p.add_argument("--steps", type=int, default=20, help="timed updates")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads-per-rank", type=int, default=1, help="CPU only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    rows = [launch(args, n) for n in args.nproc]
    base = next((r["samples_per_s"] for r in rows if r["ranks"] == 1), None)
    print(f"\n{args.preset} preset ({rows[0]['parameters'] / 1e6:.2f} M parameters), {args.device}, {args.strategy}, "
          f"{args.segments_per_rank} segments x {args.rollout_steps} steps + {args.real_per_rank} real samples per rank")
    print(f"{'ranks':>5} {'global batch':>12} {'updates/s':>10} {'samples/s':>10} {'real/s':>8} {'efficiency':>10}")
    for r in rows:
        eff = f"{r['samples_per_s'] / (r['ranks'] * base):.2f}" if base else "-"
        print(f"{r['ranks']:>5} {r['global_batch_segments']:>12} {r['updates_per_s']:>10.2f} "
              f"{r['samples_per_s']:>10.1f} {r['real_per_s']:>8.1f} {eff:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
