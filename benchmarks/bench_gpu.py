"""GPU benchmark of the actor's batched inference server and the learner (issue #12).

    python -m benchmarks.bench_gpu [key=value Hydra overrides] --out DIR [--envs 1 4 8 16] [--duration 20]
                                   [--policy base] [--image 128] [--env twin|fake] [--cuda-graphs]
                                   [--phases scale profile lockstep learner async]
                                   [--variant NAME [key=value ...]] ...
    python -m benchmarks.bench_gpu --compare A/results.json B/results.json --out DIR   (DIR/gpu_scaling.png)

Phases (each prints as it goes and all land in DIR/results.json, DIR/results.md, DIR/*.png):
  scale    ``actors/inference_server.py`` driving N twin env processes (physx_cpu, GPU rendering,
           RGB image x image) with the ``--policy`` compact VLA on the GPU: env-steps/s, scaling
           against N=1, inference batch sizes reached, GPU utilisation (NVML) over the window.
  profile  the same rows with ``actor.server.profile=true``: per env step, the milliseconds of each
           section of an env worker's loop (physics, evaluate, render, render_wait, readback, ...,
           wait_server) and the server's (batch sizes, ms per batch by size): benchmarks/gpu_profile.py.
  lockstep the existing lockstep path (EnvPool + policy.sample on the stacked batch) at the
           largest N, for comparison.
  learner  learner update throughput (``learner.cotrain.train_step``, V-trace PPO, no SFT) on
           synthetic segments of the same shapes: samples (chunk-steps)/s and env-steps/s equivalent.
  async    the same code as a synchronous PPO loop (collect a batch with the server, pause it, train,
           resume) against the asynchronous one (a learner thread trains while the server keeps
           serving; each update's weights go to the server between batches), same number of updates:
           wall-clock ratio and policy lag of the trained segments.
``--env fake`` swaps the twin for ``FakeTwinEnv`` (CPU smoke test of this script).
``--variant NAME key=value ...`` (repeatable): scale and profile measure every N for each variant,
a named set of Hydra overrides on top of the positional ones (e.g. ``--variant skip
env.observe_every_step=false``); without one, a single variant "default".
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from actors.inference_server import InferenceServer, server_options
from benchmarks.gpu_profile import plot_profile, profile_table, window_profile
from common.config import load_config
from common.device import autocast
from common.policy import make_policy

FAKE = "benchmarks.fake_env:FakeTwinEnv"


class GpuMonitor(threading.Thread):
    """NVML utilisation, memory and the number of processes holding a CUDA context (under MPS: its
    server and clients), sampled every 0.2 s while ``window`` is open."""

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
                self.samples.append((u.gpu, m.used / 2**20, self.cuda_procs()))
            time.sleep(0.2)

    def cuda_procs(self) -> int:
        try:
            return len(self.nvml.nvmlDeviceGetComputeRunningProcesses(self.h))
        except Exception:  # not every driver lets a container see them
            return -1

    def begin(self):
        self.samples, self.recording = [], True

    def end(self) -> dict:
        self.recording = False
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_mib": None, "cuda_procs_max": None}
        a = np.asarray(self.samples)
        return {"gpu_util_mean": float(a[:, 0].mean()), "gpu_util_max": float(a[:, 0].max()),
                "gpu_mem_mib": float(a[:, 1].max()), "cuda_procs_max": int(a[:, 2].max())}


def config(args, extra=()):
    ov = [f"policy={args.policy}", f"env.image_size={args.image}", f"actor.rollout_steps={args.rollout_steps}",
          "learner.use_real_data_co_training=false", *args.overrides, *extra]
    return load_config("config", ov)


def make_server(args, cfg, policy, n):
    env_cfg = cfg.env if args.env == "twin" else {"image_size": args.image, "max_episode_steps": 100,
                                                   "step_cost_s": args.fake_step_cost}
    opts = server_options(cfg.actor.server)
    if args.env != "twin":
        opts["env_factory"] = FAKE
    return InferenceServer(policy, env_cfg, n, rollout_steps=cfg.actor.rollout_steps, gamma=cfg.learner.gamma,
                           seed=1000 * n, generator_seed=n, **opts)


def drain(srv, keep: int = 0) -> list:
    """Empty the segment queue; returns the last ``keep`` segments."""
    tail = collections.deque(maxlen=keep)
    while (item := srv.get_segment(timeout=0)) is not None:
        tail.append(item)
    return list(tail)


@torch.no_grad()
def logp_gap(policy, segments: list, dtype) -> dict:
    """Max |behaviour log-prob - the learner's evaluate of the same chain| at the same weights, with a
    float32 learner and with one under the server's autocast: what PPO's ratio sees at zero lag."""
    out = {}
    for name, d in [("fp32", None)] + [("autocast", dtype)] * (dtype is not None):
        gaps = []
        for arrays, _ in segments:
            T = arrays["chain"].shape[0]
            obs = {k: torch.from_numpy(arrays[k][:T]).to(policy.device) for k in ("image", "state")}
            obs["tokens"] = torch.from_numpy(arrays["tokens"][:T]).long().to(policy.device)
            with autocast(policy.device, d):
                ev = policy.evaluate(obs, torch.from_numpy(arrays["chain"]).to(policy.device))
            gaps.append((ev.log_prob.float().cpu() - torch.from_numpy(arrays["behaviour_logp"])).abs().max().item())
        out[f"logp_gap_{name}"] = max(gaps) if gaps else None
    return out


def measure(args, cfg, policy, n, mon) -> dict:
    """One row: N env workers under ``cfg``, ``args.warmup`` s, then an ``args.duration`` s window."""
    t0 = time.time()
    srv = make_server(args, cfg, policy, n)
    start_s = time.time() - t0
    try:
        srv.start()
        time.sleep(args.warmup)
        drain(srv)
        s0, w0 = srv.stats.snapshot(), srv.worker_totals()
        mon.begin()
        t0 = time.perf_counter()
        time.sleep(args.duration)
        s1, w1 = srv.stats.snapshot(), srv.worker_totals()
        dt = time.perf_counter() - t0
        tail = drain(srv, keep=8)
        g = mon.end()
        cores = srv.worker_cores
    finally:
        srv.close()
    sizes = np.asarray(s1.window_batch_sizes(s0) or [0])
    batches = s1.batches - s0.batches
    row = dict(envs=n, start_s=round(start_s, 1), seconds=round(dt, 2),
               env_steps_per_s=(w1[0] - w0[0]) / dt,  # executed in the window (not shipped: exact)
               chunks_per_s=(s1.requests - s0.requests - (s1.value_requests - s0.value_requests)) / dt,
               batch_mean=float(sizes.mean()), batch_p50=float(np.median(sizes)), batch_max=int(sizes.max()),
               infer_ms_per_batch=1000 * (s1.infer_s - s0.infer_s) / max(batches, 1),
               server_busy=(s1.infer_s - s0.infer_s) / dt, errors=len(srv.errors),
               pinned=any(c is not None and len(c) == 1 for c in cores), **g)
    row.update(logp_gap(policy, tail, srv.autocast_dtype))
    if w1[1]:
        row["profile"] = window_profile(w0, w1, s0, s1, sizes, n, dt)
    return row


def phase_scale(args, cfg, policy, mon, results, name="scale", extra=()):
    rows = []
    for variant, overrides in args.variants:
        vcfg = config(args, [*overrides, *extra])
        vrows = []
        for n in args.envs:
            try:
                row = dict(variant=variant, **measure(args, vcfg, policy, n, mon))
            except Exception as e:  # one variant that cannot run must not cost the others' rows
                import traceback
                traceback.print_exc()
                results.setdefault("errors", {})[f"{name} {variant} {n}"] = repr(e)
                continue
            vrows.append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)
        base = vrows[0]["env_steps_per_s"] if vrows else 1.0
        for r in vrows:
            r["speedup_vs_1"] = r["env_steps_per_s"] / max(base, 1e-9)
            r["efficiency"] = r["speedup_vs_1"] / r["envs"] * vrows[0]["envs"]
        rows += vrows
        results[name] = rows
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


def phase_profile(args, cfg, policy, mon, results):
    phase_scale(args, cfg, policy, mon, results, name="profile", extra=["actor.server.profile=true"])


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


def _g(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def write_report(results, out: Path):
    lines = [f"# bench_gpu results ({results['meta']['device_name']}, policy {results['meta']['policy']}, "
             f"{results['meta']['image']}x{results['meta']['image']} RGB)", ""]
    for phase in ("scale", "profile"):
        if phase not in results:
            continue
        lines += [f"{phase}:", "", "| variant | env processes | env-steps/s | x vs 1 | efficiency | batch mean / p50 / max "
                  "| infer ms/batch | server busy | GPU util mean / max % | GPU mem MiB | CUDA procs "
                  "| logp gap fp32 / autocast | start s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results[phase]:
            lines.append(f"| {r.get('variant', 'default')} | {r['envs']} | {r['env_steps_per_s']:.0f} | {r['speedup_vs_1']:.2f} "
                         f"| {r['efficiency']:.2f} | {r['batch_mean']:.1f} / {r['batch_p50']:.0f} / {r['batch_max']} "
                         f"| {r['infer_ms_per_batch']:.1f} | {r['server_busy']:.2f} | {r['gpu_util_mean'] or 0:.0f} / "
                         f"{r['gpu_util_max'] or 0:.0f} | {r['gpu_mem_mib'] or 0:.0f} | {r.get('cuda_procs_max')} "
                         f"| {_g(r.get('logp_gap_fp32'))} / {_g(r.get('logp_gap_autocast'))} | {r['start_s']} |")
        lines.append("")
    if "profile" in results:
        lines += profile_table(results["profile"])
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
    lines += [f"Error in {k}: {v}" for k, v in results.get("errors", {}).items()]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def plot(results, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if "profile" in results:
        plot_profile(results["profile"], out / "profile.png")
    rows = results.get("scale") or results.get("profile")
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for v in dict.fromkeys(r.get("variant", "default") for r in rows):
        vr = [r for r in rows if r.get("variant", "default") == v]
        ax[0].plot([r["envs"] for r in vr], [r["env_steps_per_s"] for r in vr], "o-", label=f"server: {v}")
    rows = [r for r in rows if r.get("variant", "default") == rows[0].get("variant", "default")]
    n = [r["envs"] for r in rows]
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
    p.add_argument("--batch-wait-ms", type=float, default=None, help="actor.server.batch_wait_ms")
    p.add_argument("--cuda-graphs", action="store_true", help="actor.server.cuda_graphs=true")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "OVERRIDE"),
                   help="a named set of Hydra overrides measured by scale/profile (repeatable)")
    p.add_argument("--learner-duration", type=float, default=10.0)
    p.add_argument("--learner-batches", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                   default=[(16, 16), (64, 32)], help="segments x micro-batch, e.g. 16x16 64x32")
    p.add_argument("--async-batch", type=int, default=16)
    p.add_argument("--async-micro", type=int, default=16)
    p.add_argument("--async-updates", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    args = p.parse_args(argv)
    args.overrides += [f"actor.server.batch_wait_ms={args.batch_wait_ms}"] * (args.batch_wait_ms is not None)
    args.overrides += ["actor.server.cuda_graphs=true"] * args.cuda_graphs
    args.variants = [(v[0], v[1:]) for v in args.variant or [["default"]]]
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
                            batch_wait_ms=cfg.actor.server.batch_wait_ms, cuda_graphs=args.cuda_graphs,
                            overrides=args.overrides, variants=dict(args.variants),
                            mps=os.environ.get("TANDEM_MPS") == "1",  # scripts/device/mps.sh
                            time=time.strftime("%Y-%m-%d %H:%M:%S"))}
    print(f"[bench_gpu] {results['meta']}", flush=True)
    mon = GpuMonitor()
    mon.start()
    phases = {"scale": phase_scale, "profile": phase_profile, "lockstep": phase_lockstep, "learner": phase_learner,
              "async": phase_async}
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
