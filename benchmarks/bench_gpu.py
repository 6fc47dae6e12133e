"""GPU benchmark of the actor's batched inference server and the learner (issue #12).

    python benchmarks/bench_gpu.py --out DIR [--envs 1 4 8 16] [--duration 20] [--policy base]
                                   [--image 128] [--phases scale lockstep learner async] [--env twin|fake]
                                   [--cuda-graphs] [key=value Hydra overrides]
    python benchmarks/bench_gpu.py --compare A/results.json B/results.json --out DIR   (DIR/gpu_scaling.png)

Phases (each prints as it goes and all land in DIR/results.json, DIR/results.md, DIR/*.png):
  scale    ``actors/inference_server.py`` driving N twin env processes (physx_cpu, GPU rendering,
           RGB image x image) with the ``--policy`` compact VLA on the GPU: env-steps/s, scaling
           against N=1, inference batch sizes reached, GPU utilisation (NVML) over the window.
  lockstep the existing lockstep path (EnvPool + policy.sample on the stacked batch) at the
           largest N, for comparison.
  learner  learner update throughput (``learner.cotrain.train_step``, V-trace PPO, no SFT) on
           synthetic segments of the same shapes: samples (chunk-steps)/s and env-steps/s equivalent.
  async    the same code as a synchronous PPO loop (collect a batch with the server, pause it, train,
           resume) against the asynchronous one (a learner thread trains while the server keeps
           serving; each update's weights go to the server between batches), same number of updates:
           wall-clock ratio and policy lag of the trained segments.
``--env fake`` swaps the twin for ``FakeTwinEnv`` (CPU smoke test of this script).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.inference_server import InferenceServer  # noqa: E402
from common.config import load_config  # noqa: E402
from common.policy import make_policy  # noqa: E402

FAKE = "actors.inference_server:FakeTwinEnv"


class GpuMonitor(threading.Thread):
    """NVML utilisation and memory, sampled every 0.2 s while ``window`` is open."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.recording, self.stop = [], False, threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nvml = None

    def run(self):
        while self.nvml is not None and not self.stop.is_set():
            if self.recording:
                u = self.nvml.nvmlDeviceGetUtilizationRates(self.h)
                m = self.nvml.nvmlDeviceGetMemoryInfo(self.h)
                self.samples.append((u.gpu, m.used / 2**20))
            time.sleep(0.2)

    def begin(self):
        self.samples, self.recording = [], True

    def end(self) -> dict:
        self.recording = False
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_mib": None}
        a = np.asarray(self.samples)
        return {"gpu_util_mean": float(a[:, 0].mean()), "gpu_util_max": float(a[:, 0].max()),
                "gpu_mem_mib": float(a[:, 1].max())}


def config(args, extra=()):
    ov = [f"policy={args.policy}", f"env.image_size={args.image}", f"actor.rollout_steps={args.rollout_steps}",
          "learner.use_real_data_co_training=false", *args.overrides, *extra]
    return load_config("config", ov)


def make_server(args, cfg, policy, n, **kw):
    env_cfg = cfg.env if args.env == "twin" else {"image_size": args.image, "max_episode_steps": 100,
                                                   "step_cost_s": args.fake_step_cost}
    return InferenceServer(policy, env_cfg, n, rollout_steps=cfg.actor.rollout_steps, gamma=cfg.learner.gamma,
                           seed=1000 * n, generator_seed=n, batch_wait_ms=args.batch_wait_ms,
                           env_factory=None if args.env == "twin" else FAKE, cuda_graphs=args.cuda_graphs, **kw)


def drain(srv):
    while srv.get_segment(timeout=0) is not None:
        pass


def phase_scale(args, cfg, policy, mon, results):
    rows = []
    for n in args.envs:
        t0 = time.time()
        srv = make_server(args, cfg, policy, n)
        start_s = time.time() - t0
        try:
            srv.start()
            time.sleep(args.warmup)
            drain(srv)
            s0 = copy.deepcopy(srv.stats)
            mon.begin()
            t0 = time.perf_counter()
            time.sleep(args.duration)
            while srv.get_segment(timeout=0) is not None:  # keep the queue short
                pass
            dt = time.perf_counter() - t0
            g = mon.end()
            s1 = copy.deepcopy(srv.stats)
        finally:
            srv.close()
        sizes = np.asarray(s1.batch_sizes[len(s0.batch_sizes):] or [0])
        batches = s1.batches - s0.batches
        row = dict(envs=n, start_s=round(start_s, 1), seconds=round(dt, 2),
                   env_steps_per_s=(s1.env_steps - s0.env_steps) / dt,
                   chunks_per_s=(s1.requests - s0.requests - (s1.value_requests - s0.value_requests)) / dt,
                   batch_mean=float(sizes.mean()), batch_p50=float(np.median(sizes)), batch_max=int(sizes.max()),
                   infer_ms_per_batch=1000 * (s1.infer_s - s0.infer_s) / max(batches, 1),
                   server_busy=(s1.infer_s - s0.infer_s) / dt, errors=len(srv.errors), **g)
        rows.append(row)
        print(f"[scale] {json.dumps(row)}", flush=True)
    base = rows[0]["env_steps_per_s"] if rows else 1.0
    for r in rows:
        r["speedup_vs_1"] = r["env_steps_per_s"] / max(base, 1e-9)
        r["efficiency"] = r["speedup_vs_1"] / r["envs"] * rows[0]["envs"]
    results["scale"] = rows


def phase_lockstep(args, cfg, policy, mon, results):
    from actors.env_pool import EnvPool

    n = max(args.envs)
    if args.env != "twin":
        print("[lockstep] skipped (twin only)")
        return
    t0 = time.time()
    pool = EnvPool(cfg.env, n, seed=7)
    try:
        first = pool.reset()
        start_s = time.time() - t0
        obs, instr = [o for o, _ in first], [s for _, s in first]
        dev, k, gen = policy.device, policy.exec_horizon, torch.Generator(device=policy.device).manual_seed(0)
        cache = {}

        def tok(s):
            if s not in cache:
                cache[s] = policy.tokenize([s])[0]
            return cache[s]

        def one():
            o = {"image": torch.from_numpy(np.stack([x["image"] for x in obs])).to(dev),
                 "state": torch.from_numpy(np.stack([x["state"] for x in obs])).to(dev),
                 "tokens": torch.stack([tok(s) for s in instr]).to(dev)}
            with torch.no_grad():
                out = policy.sample(o, generator=gen)
            res = pool.run_chunks(out.actions[:, :k].float().cpu().numpy())
            for i, r in enumerate(res):
                obs[i], instr[i] = r.obs, r.instruction
            return sum(r.env_steps for r in res)

        t_end = time.time() + args.warmup / 2
        while time.time() < t_end:
            one()
        mon.begin()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.duration:
            steps += one()
        dt = time.perf_counter() - t0
        row = dict(envs=n, start_s=round(start_s, 1), env_steps_per_s=steps / dt, batch=n, **mon.end())
    finally:
        pool.close()
    print(f"[lockstep] {json.dumps(row)}", flush=True)
    results["lockstep"] = row


def synthetic_segments(spec, n, seed=0):
    from tools.synthetic import fill_segment

    out = []
    for i in range(n):
        a = spec.empty()
        fill_segment(a, 0, seed + i)
        a["chain"] *= 0.2
        a["tokens"] %= 200
        out.append(a)
    return out


def learner_parts(cfg, policy, device):
    from learner.batcher import Batcher
    from learner.cotrain import make_optimizer

    lp = copy.deepcopy(policy).to(device)
    return lp, make_optimizer(lp, cfg.learner), Batcher


def phase_learner(args, cfg, policy, mon, results):
    from common.segment import SegmentSpec
    from learner.cotrain import train_step
    from omegaconf import OmegaConf

    dev = policy.device
    spec = SegmentSpec(steps=cfg.actor.rollout_steps, image_hw=(args.image, args.image), token_len=policy.token_len,
                       state_dim=8, chunk_size=policy.chunk_size, num_denoise_steps=policy.num_denoise_steps)
    rows = []
    for B, micro in args.learner_batches:
        lcfg = OmegaConf.merge(cfg.learner, {"global_batch_size": B, "micro_batch_size": micro,
                                             "max_queued_segments": max(B, 64)})
        lp, opt, Batcher = learner_parts(cfg, policy, dev)
        segs = synthetic_segments(spec, B)
        batcher = Batcher.from_config(lcfg, dev)

        def batch():
            for s in segs:
                batcher.add(s, 0, 0)
            return batcher.next_batch(0)

        for _ in range(2):
            train_step(lp, opt, batch(), lcfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        mon.begin()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.learner_duration:
            stats = train_step(lp, opt, batch(), lcfg)
            n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        T = spec.steps
        row = dict(segments_per_batch=B, micro_batch=micro, T=T, updates=n, update_s=dt / n,
                   samples_per_s=n * B * T / dt, env_steps_per_s_equiv=n * B * T * policy.exec_horizon / dt,
                   ppo_loss=stats.get("train/ppo_loss"), **mon.end(),
                   torch_peak_mib=(torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None))
        rows.append(row)
        print(f"[learner] {json.dumps(row)}", flush=True)
        del lp, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    results["learner"] = rows


def phase_async(args, cfg, policy, mon, results):
    """Synchronous PPO (collect, then train) vs asynchronous (train while collecting), same code."""
    from learner.cotrain import train_step
    from omegaconf import OmegaConf

    n, B, U = max(args.envs), args.async_batch, args.async_updates
    lcfg = OmegaConf.merge(cfg.learner, {"global_batch_size": B, "micro_batch_size": min(B, args.async_micro),
                                         "max_queued_segments": max(4 * B, 64)})
    dev = policy.device
    out = {}
    for mode in ("sync", "async"):
        lp, opt, Batcher = learner_parts(cfg, policy, dev)
        batcher = Batcher.from_config(lcfg, dev)
        srv = make_server(args, cfg, copy.deepcopy(policy), n)
        srv.set_version(0)
        version, lags, train_s = 0, [], 0.0
        try:
            srv.start()
            # warm-up: every env stepping and one segment each, not timed
            got = 0
            while got < n:
                got += srv.get_segment(timeout=60) is not None
            drain(srv)
            mon.begin()
            t0 = time.perf_counter()
            env0 = srv.stats.env_steps
            if mode == "sync":
                for _ in range(U):
                    while not batcher.ready(version):
                        item = srv.get_segment(timeout=60)
                        arrays, meta = item
                        batcher.add(arrays, meta["version"], version)
                    srv.pause()  # envs wait while the learner trains: a synchronous loop
                    b = batcher.next_batch(version)
                    lags += batcher.last_batch_lags.tolist()
                    t1 = time.perf_counter()
                    train_step(lp, opt, b, lcfg)
                    version += 1
                    srv.submit_weights(lp.get_weights(), version)
                    train_s += time.perf_counter() - t1
                    drain(srv)  # segments finished during the update are from the old policy: discard
                    batcher._queue.clear()
                    srv.start()
            else:
                for _ in range(U):
                    while not batcher.ready(version):
                        item = srv.get_segment(timeout=60)
                        arrays, meta = item
                        batcher.add(arrays, meta["version"], version)
                    b = batcher.next_batch(version)
                    lags += batcher.last_batch_lags.tolist()
                    t1 = time.perf_counter()
                    train_step(lp, opt, b, lcfg)
                    version += 1
                    srv.submit_weights(lp.get_weights(), version)
                    train_s += time.perf_counter() - t1
            dt = time.perf_counter() - t0
            env_steps = srv.stats.env_steps - env0
            g = mon.end()
            bs = srv.stats.summary()
        finally:
            srv.close()
        lag = np.asarray(lags)
        out[mode] = dict(envs=n, segments_per_batch=B, updates=U, wall_s=dt, train_s=train_s,
                         env_steps_per_s=env_steps / dt, samples_trained_per_s=U * B * cfg.actor.rollout_steps / dt,
                         lag_mean=float(lag.mean()), lag_max=int(lag.max()),
                         lag_hist=np.bincount(lag, minlength=lcfg.max_policy_lag + 1).tolist(),
                         dropped_stale=batcher.dropped_stale, batch_mean=bs["batch_mean"], **g)
        print(f"[async] {mode}: {json.dumps(out[mode])}", flush=True)
        del lp, opt
    out["speedup_async_vs_sync"] = out["sync"]["wall_s"] / out["async"]["wall_s"]
    print(f"[async] wall-clock sync/async = {out['speedup_async_vs_sync']:.2f}", flush=True)
    results["async"] = out


def write_report(results, out: Path):
    lines = [f"# bench_gpu results ({results['meta']['device_name']}, policy {results['meta']['policy']}, "
             f"{results['meta']['image']}x{results['meta']['image']} RGB)", ""]
    if "scale" in results:
        lines += ["| env processes | env-steps/s | x vs 1 | efficiency | batch mean / p50 / max | infer ms/batch "
                  "| server busy | GPU util mean / max % | GPU mem MiB | start s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["scale"]:
            lines.append(f"| {r['envs']} | {r['env_steps_per_s']:.0f} | {r['speedup_vs_1']:.2f} | {r['efficiency']:.2f} "
                         f"| {r['batch_mean']:.1f} / {r['batch_p50']:.0f} / {r['batch_max']} | {r['infer_ms_per_batch']:.1f} "
                         f"| {r['server_busy']:.2f} | {r['gpu_util_mean'] or 0:.0f} / {r['gpu_util_max'] or 0:.0f} "
                         f"| {r['gpu_mem_mib'] or 0:.0f} | {r['start_s']} |")
        lines.append("")
    if "lockstep" in results:
        r = results["lockstep"]
        lines += [f"Lockstep EnvPool path, {r['envs']} envs: {r['env_steps_per_s']:.0f} env-steps/s "
                  f"(GPU util mean {r['gpu_util_mean'] or 0:.0f} %).", ""]
    if "learner" in results:
        lines += ["| segments/batch (T chunk-steps each) | micro | update s | samples/s | env-steps/s equiv. "
                  "| GPU util mean % | torch peak MiB |", "|---|---|---|---|---|---|---|"]
        for r in results["learner"]:
            lines.append(f"| {r['segments_per_batch']} (T={r['T']}) | {r['micro_batch']} | {r['update_s']:.3f} "
                         f"| {r['samples_per_s']:.0f} | {r['env_steps_per_s_equiv']:.0f} | {r['gpu_util_mean'] or 0:.0f} "
                         f"| {r['torch_peak_mib'] or 0:.0f} |")
        lines.append("")
    if "async" in results:
        a = results["async"]
        lines += ["| loop | updates | wall s | of it training s | env-steps/s | trained samples/s | lag mean / max "
                  "| lag histogram | GPU util mean % |", "|---|---|---|---|---|---|---|---|---|"]
        for m in ("sync", "async"):
            r = a[m]
            lines.append(f"| {m} | {r['updates']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['env_steps_per_s']:.0f} "
                         f"| {r['samples_trained_per_s']:.0f} | {r['lag_mean']:.2f} / {r['lag_max']} | {r['lag_hist']} "
                         f"| {r['gpu_util_mean'] or 0:.0f} |")
        lines += ["", f"Asynchronous vs synchronous wall clock for the same updates: "
                      f"{a['speedup_async_vs_sync']:.2f}x faster.", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def plot(results, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if "scale" not in results:
        return
    rows = results["scale"]
    n = [r["envs"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(n, [r["env_steps_per_s"] for r in rows], "o-", label="inference server")
    ax[0].plot(n, [rows[0]["env_steps_per_s"] * x / n[0] for x in n], "--", color="grey", label="linear")
    if "lockstep" in results:
        ax[0].plot([results["lockstep"]["envs"]], [results["lockstep"]["env_steps_per_s"]], "s", label="lockstep")
    ax[0].set_xlabel("env processes")
    ax[0].set_ylabel("env steps / s")
    ax[0].set_title(f"{results['meta']['image']}x{results['meta']['image']} RGB, {results['meta']['policy']} policy")
    ax[0].legend()
    ax[1].plot(n, [r["batch_mean"] for r in rows], "o-", label="mean inference batch")
    ax[1].plot(n, [r["gpu_util_mean"] or 0 for r in rows], "s-", label="GPU util % (mean)")
    ax[1].set_xlabel("env processes")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "gpu_scaling.png", dpi=110)


def plot_compare(files: list[Path], out: Path):
    """docs/gpu_scaling.png: env-steps/s against env processes for several results.json files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for j, f in enumerate(files):
        res = json.loads(Path(f).read_text())
        c = f"C{2 * j}"
        rows, m = res["scale"], res["meta"]
        label = "server, CUDA graphs" if m.get("cuda_graphs") else "server, eager"
        n = [r["envs"] for r in rows]
        ax[0].plot(n, [r["env_steps_per_s"] for r in rows], "o-", color=c, label=label)
        ax[1].plot(n, [r["infer_ms_per_batch"] for r in rows], "o-", color=c, label=f"{label}: ms per batch")
        if "lockstep" in res:
            ax[0].plot([res["lockstep"]["envs"]], [res["lockstep"]["env_steps_per_s"]], "s", color="C1", label="lockstep, eager")
    base = rows[0]["env_steps_per_s"]
    ax[0].plot(n, [base * x / n[0] for x in n], "--", color="grey", label="linear from 1 (graphs)")
    ax[0].set_xlabel("env processes (physx_cpu + GPU rendering)")
    ax[0].set_ylabel("env steps / s")
    ax[0].set_title(f"{m['device_name']}: {m['image']}x{m['image']} RGB, {m['policy']} policy")
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("env processes")
    ax[1].set_ylabel("inference ms per batch")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gpu_scaling.png", dpi=110)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--compare":  # --compare A.json B.json --out DIR
        a = sys.argv[2:]
        i = a.index("--out")
        plot_compare([Path(x) for x in a[:i]], Path(a[i + 1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phases", nargs="+", default=["scale", "lockstep", "learner", "async"])
    p.add_argument("--envs", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--env", choices=["twin", "fake"], default="twin")
    p.add_argument("--fake-step-cost", type=float, default=0.005)
    p.add_argument("--policy", default="base")
    p.add_argument("--image", type=int, default=128)
    p.add_argument("--rollout-steps", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--batch-wait-ms", type=float, default=1.0)
    p.add_argument("--cuda-graphs", action="store_true", help="server samples through CUDA graphs")
    p.add_argument("--learner-duration", type=float, default=10.0)
    p.add_argument("--learner-batches", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                   default=[(16, 16), (64, 32)], help="segments x micro-batch, e.g. 16x16 64x32")
    p.add_argument("--async-batch", type=int, default=16)
    p.add_argument("--async-micro", type=int, default=16)
    p.add_argument("--async-updates", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = config(args)
    torch.manual_seed(0)
    policy = make_policy(cfg.policy).to(dev).eval()
    results = {"meta": dict(policy=args.policy, image=args.image, device=str(dev), env=args.env,
                            device_name=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                            cpus=os.cpu_count(), torch=torch.__version__, params=policy.num_parameters(),
                            rollout_steps=args.rollout_steps, exec_horizon=policy.exec_horizon,
                            batch_wait_ms=args.batch_wait_ms, cuda_graphs=args.cuda_graphs, time=time.strftime("%Y-%m-%d %H:%M:%S"))}
    print(f"[bench_gpu] {results['meta']}", flush=True)
    mon = GpuMonitor()
    mon.start()
    phases = {"scale": phase_scale, "lockstep": phase_lockstep, "learner": phase_learner, "async": phase_async}
    for name in args.phases:
        t0 = time.time()
        try:
            phases[name](args, cfg, policy, mon, results)
        except Exception as e:  # keep what the other phases measured
            import traceback
            traceback.print_exc()
            results.setdefault("errors", {})[name] = repr(e)
        results.setdefault("phase_s", {})[name] = round(time.time() - t0, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.out)
    plot(results, args.out)
    mon.stop.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
