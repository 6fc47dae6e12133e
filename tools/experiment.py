"""`tandem-experiment`: co-training against plain PPO against no Stage II, from one Stage I.

    tandem-experiment                 # CPU scale (configs/size/cpu.yaml)
    tandem-experiment size=gpu        # one-GPU scale (configs/size/gpu.yaml)

Per seed, Stage II runs with co-training (``use_real_data_co_training=true``) and as plain PPO
(``false``), ``experiment.concurrent`` runs at a time (each its own tandem-run on its own sockets).
Every condition, Stage I's policy included, is then scored by one parallel deterministic
evaluation (``tandem-eval``'s workers) on the same held-out episode seeds of the twin and the real
proxy: the final policy of each run on ``eval_episodes``, its intermediate checkpoints on the
first ``curve_episodes`` of them. The success-against-env-steps curve scores every point (Stage I
and the final policy included) on those same first seeds, so that its points differ by training
only. A re-run continues: finished Stage II runs and evaluated policies are kept; with
``experiment.continue_runs=true`` a run that stopped on its time limit before
``pipeline.stage2_updates`` resumes from its last checkpoint for another ``pipeline.stage2_max_duration_s``
(more env steps across device calls).

Besides success, two measures that move before success does: the mean episode return on each env,
and the flow-matching (SFT) loss on held-out real-proxy demonstrations, i.e. how much of what the
real data taught is kept. Writes ``experiment.json``, ``experiment.md``, the plots
``success_vs_env_steps.png`` and ``heldout_sft_loss.png``, the TensorBoard report of the Stage II
runs, and ``stage2_cotrain/`` (the co-trained policy of the first seed, with its env overrides).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.config import run_with_config
from common.evaluation import ENV_OVERRIDES_FILE, evaluate_parallel
from tools.pipeline import PY, Pipeline, run_stage
from common.policy import load_policy
from learner.checkpoint import list_checkpoints
from learner.cotrain import sft_inputs
from learner.real_replay import RealReplay

ENVS = ("twin", "real_proxy")
CONDITION_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")  # in condition order


@torch.no_grad()
def heldout_sft_loss(policy, replay: RealReplay, cfg: DictConfig) -> float:
    """Mean SFT loss on fixed batches of held-out real demos (same batches and noise for every policy)."""
    rng, gen = np.random.default_rng(0), torch.Generator(device=policy.device).manual_seed(0)
    losses = []
    for _ in range(int(cfg.experiment.heldout_batches)):
        obs, actions, pad = sft_inputs(policy, replay.sample(int(cfg.experiment.heldout_batch_size),
                                                             policy.chunk_size, rng), policy.device)
        losses.append(float(policy.sft_loss(obs, actions, pad, generator=gen)))
    return float(np.mean(losses))


def stage2_runs(cfg: DictConfig, pipe: Pipeline) -> dict[tuple[str, int], Path]:
    known = cfg.experiment.condition_overrides
    unknown = [c for c in cfg.experiment.conditions if c != "sft" and c not in known]
    if unknown:
        raise ValueError(f"experiment.conditions {unknown}: no experiment.condition_overrides entry "
                         f"(known: {sorted(known)} and sft)")
    return {(cond, int(seed)): pipe.run / f"seed{seed}" / cond
            for seed in cfg.experiment.seeds for cond in cfg.experiment.conditions if cond != "sft"}


def needs_stage2(run_dir: Path, target_updates: int, continue_runs: bool) -> bool:
    """A run without a summary has not run (or died); one that stopped short of ``target_updates``
    (its time limit) is continued only when asked, since continuing changes its result."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        return True
    return continue_runs and json.loads(summary.read_text())["updates"] < target_updates


def run_stage2_all(cfg: DictConfig, pipe: Pipeline, runs: dict[tuple[str, int], Path]) -> None:
    """Every Stage II run still to do, ``experiment.concurrent`` at a time; each logs to ``RUN.log``
    (appended to when a run is continued)."""
    todo = [(key, d) for key, d in runs.items()
            if needs_stage2(d, int(cfg.pipeline.stage2_updates), bool(cfg.experiment.continue_runs))]
    concurrent = max(1, int(cfg.experiment.concurrent))
    for start in range(0, len(todo), concurrent):
        group, procs, t0 = todo[start:start + concurrent], [], time.time()
        print(f"\n=== Stage II: {', '.join(f'{c} seed {s}' for (c, s), _ in group)} at once", flush=True)
        for (cond, seed), run_dir in group:
            run_dir.mkdir(parents=True, exist_ok=True)
            # each run_dir has its own private ipc socket directory (transport.ipc_dir)
            cmd = pipe.stage2_command(run_dir, [f"seed={seed}", *cfg.experiment.condition_overrides[cond]])
            print("$", " ".join(cmd), flush=True)
            log = open(run_dir.with_suffix(".log"), "a")
            procs.append((cond, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        failed = []
        for cond, seed, proc, log in procs:
            if proc.wait() != 0:
                failed.append(f"{cond} seed {seed} (exit {proc.returncode}, log {runs[(cond, seed)].with_suffix('.log')})")
            log.close()
        if failed:
            raise SystemExit(f"[tandem-experiment] Stage II failed: {', '.join(failed)}")
        print(f"=== Stage II group done in {time.time() - t0:.0f} s", flush=True)


def run_points(run_dir: Path, exec_horizon: int) -> list[dict]:
    """The checkpoints of a Stage II run as curve points: policy dir, updates, env steps trained on."""
    points = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        counters = json.loads((ckpt / "meta.json").read_text())["counters"]
        points.append({"policy": str(ckpt / "policy"), "updates": counters["updates"],
                       "sim_chunk_steps": counters["sim_samples"], "env_steps": counters["sim_samples"] * exec_horizon,
                       "real_samples": counters["real_samples"]})
    if not points:
        raise FileNotFoundError(f"{run_dir} has no checkpoint")
    return points


def evaluate_all(cfg: DictConfig, pipe: Pipeline, points: dict[tuple[str, int], list[dict]],
                 env_overrides: list[str]) -> dict:
    """One parallel evaluation of every policy not yet in ``eval.json``: Stage I and each run's last
    checkpoint on ``eval_episodes`` seeds, the other checkpoints on the first ``curve_episodes``."""
    e = cfg.experiment
    seeds = list(range(int(e.eval_seed), int(e.eval_seed) + int(e.eval_episodes)))
    curve_seeds = seeds[:int(e.curve_episodes)]
    jobs = {str(pipe.stage1_policy): seeds}
    for curve in points.values():
        for pt in curve:
            jobs[pt["policy"]] = seeds if pt is curve[-1] else curve_seeds
    out_file = pipe.run / "eval.json"
    done = json.loads(out_file.read_text()) if out_file.exists() else {}
    todo = [(d, list(ENVS), s) for d, s in jobs.items()
            if d not in done or any(done[d]["summary"][env]["episodes"] != len(s) for env in ENVS)]
    if todo:
        t0 = time.time()
        done.update(evaluate_parallel(todo, int(e.eval_workers), str(e.eval_device), env_overrides, threads=1))
        print(f"[tandem-experiment] {sum(len(s) * len(ENVS) for _, _, s in todo)} evaluation episodes in "
              f"{time.time() - t0:.0f} s", flush=True)
        out_file.write_text(json.dumps(done))
    return done


def collect_results(cfg: DictConfig, pipe: Pipeline, runs: dict, points: dict, evals: dict,
                    heldout: RealReplay) -> dict:
    """Per condition and seed: final success/return per env, held-out real SFT loss, and the curve."""
    device = str(cfg.experiment.eval_device)
    first = int(cfg.experiment.eval_seed)
    curve_seeds = set(range(first, first + int(cfg.experiment.curve_episodes)))
    losses: dict[str, float] = {}

    def point(policy_dir: str, extra: dict) -> dict:
        if policy_dir not in losses:
            losses[policy_dir] = heldout_sft_loss(load_policy(policy_dir, map_location=device), heldout, cfg)
        s = evals[policy_dir]["summary"]
        out = dict(extra, heldout_real_sft_loss=losses[policy_dir])
        for env in ENVS:
            out.update({env: s[env]["success"], f"{env}_ci95": s[env]["ci95"], f"{env}_episodes": s[env]["episodes"],
                        f"{env}_return": s[env]["mean_return"], f"{env}_held_at_end": s[env]["held_at_end"],
                        f"{env}_curve": success_on(evals[policy_dir]["episodes"], env, curve_seeds)})
        return out

    stage1 = point(str(pipe.stage1_policy), {"updates": 0, "env_steps": 0})
    results: dict[str, dict] = {"sft": {int(seed): stage1 for seed in cfg.experiment.seeds}}
    for (cond, seed), run_dir in runs.items():
        curve = [stage1] + [point(pt["policy"], pt) for pt in points[(cond, seed)]]
        summary = json.loads((run_dir / "summary.json").read_text())
        results.setdefault(cond, {})[seed] = dict(curve[-1], curve=curve, duration_s=summary["duration_s"],
                                                  dropped_segments=summary["dropped"])
    return results


def success_on(episodes: list[dict], env: str, seeds: set) -> float:
    """Success rate of the evaluated ``episodes`` of ``env`` whose seed is in ``seeds``."""
    hits = [bool(e["success"]) for e in episodes if e["env"] == env and e["seed"] in seeds]
    if not hits:
        raise ValueError(f"no evaluated {env} episode on the curve seeds {min(seeds)}..{max(seeds)}")
    return float(np.mean(hits))


def paired_change(evals: dict, stage1_dir: str, final_dirs: list[str], env: str, seeds: list[int],
                  resamples: int = 10_000) -> dict:
    """Each final policy against Stage I on the same deterministic episodes: the mean change in success
    (averaged over runs) with a bootstrap 95 % interval over episode seeds, and per run how many
    episodes it newly solves / newly fails. Pairing removes the seeds' own difficulty from the noise."""
    def outcomes(policy_dir: str) -> np.ndarray:
        by_seed = {e["seed"]: bool(e["success"]) for e in evals[policy_dir]["episodes"] if e["env"] == env}
        return np.array([by_seed[s] for s in seeds], dtype=float)

    base = outcomes(stage1_dir)
    runs = np.stack([outcomes(d) for d in final_dirs])
    diff = runs.mean(axis=0) - base
    rng = np.random.default_rng(0)
    boot = diff[rng.integers(0, len(seeds), size=(resamples, len(seeds)))].mean(axis=1)
    return {"change": float(diff.mean()), "ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])],
            "gained": [int(((r == 1) & (base == 0)).sum()) for r in runs],
            "lost": [int(((r == 0) & (base == 1)).sum()) for r in runs], "episodes": len(seeds)}


def paired_summary(cfg: DictConfig, pipe: Pipeline, points: dict, evals: dict) -> dict:
    """``paired_change`` per condition (over its seeds) and env, on the ``eval_episodes`` seeds."""
    first = int(cfg.experiment.eval_seed)
    seeds = list(range(first, first + int(cfg.experiment.eval_episodes)))
    finals: dict[str, list[str]] = {}
    for (cond, _), curve in sorted(points.items()):
        finals.setdefault(cond, []).append(curve[-1]["policy"])
    return {cond: {env: paired_change(evals, str(pipe.stage1_policy), dirs, env, seeds) for env in ENVS}
            for cond, dirs in finals.items()}


def paired_lines(paired: dict) -> list[str]:
    lines = ["| condition | env | change vs Stage I (95 % CI) | episodes newly solved / newly failed, per seed |",
             "|---|---|---|---|"]
    for cond, per_env in paired.items():
        for env, p in per_env.items():
            counts = ", ".join(f"{g} / {lo}" for g, lo in zip(p["gained"], p["lost"]))
            lines.append(f"| {cond} | {env} | {p['change']:+.3f} ({p['ci95'][0]:+.3f} to {p['ci95'][1]:+.3f}) | {counts} |")
    return lines


def check_targets(results: dict, plain_counterpart: dict) -> list[str]:
    """The issue's targets, per co-training condition (a key of ``plain_counterpart``) and seed: twin >=
    Stage I + 15 points and real proxy >= Stage I - 3 points; its plain counterpart (the same RL without
    the SFT term) below it on real-proxy success or above it on held-out SFT loss."""
    lines = []
    stage1 = next(iter(results["sft"].values()))
    for cond, plain in plain_counterpart.items():
        for seed, r in sorted(results.get(cond, {}).items()):
            # success rates are episode fractions: round away the float error (0.36 - 0.39 < -0.03 in floats)
            twin, real = round(r["twin"] - stage1["twin"], 9), round(r["real_proxy"] - stage1["real_proxy"], 9)
            lines.append(f"- {cond}, seed {seed}: twin {twin:+.3f} vs Stage I (target >= +0.15: "
                         f"{'met' if twin >= 0.15 else 'not met'}), real proxy {real:+.3f} (target >= -0.03: "
                         f"{'met' if real >= -0.03 else 'not met'})")
            other = results.get(plain, {}).get(seed)
            if other:
                shows = (other["real_proxy"] < r["real_proxy"]
                         or other["heldout_real_sft_loss"] > r["heldout_real_sft_loss"])
                lines.append(f"  {plain} (no SFT term): real proxy {other['real_proxy']:.3f} vs {r['real_proxy']:.3f}, "
                             f"held-out real SFT loss {other['heldout_real_sft_loss']:.3f} vs "
                             f"{r['heldout_real_sft_loss']:.3f} ({'shows' if shows else 'does not show'} what "
                             "co-training prevents)")
    return lines


def write_table(cfg: DictConfig, pipe: Pipeline, results: dict, paired: dict) -> None:
    p = cfg.pipeline
    e = cfg.experiment
    stage1 = f"checkpoint `{p.stage1_checkpoint}`" if p.stage1_checkpoint else \
        f"{p.sim_demos} twin + {p.real_demos} real-proxy demos, {p.sft_steps} SFT steps"
    lines = ["# Co-training experiment", "",
             f"Scale: `{cfg.get('size_name', 'custom')}`; Stage I: {stage1}; env overrides {pipe.env}; Stage II "
             f"{p.stage2_updates} updates (at most {p.stage2_max_duration_s} s) x {cfg.learner.global_batch_size} "
             f"segments of {cfg.actor.rollout_steps} chunk-steps, {p.num_actors} actor(s) x {cfg.actor.num_envs} env(s), "
             f"reward `{cfg.env.reward_mode}`, {e.concurrent} run(s) at once; evaluation: {e.eval_episodes} "
             f"deterministic episodes per env and policy (seeds {e.eval_seed}.., the same for every condition "
             f"and seed), curve points {e.curve_episodes}; training seeds {list(e.seeds)}.", "",
             "| condition | twin success | real-proxy success | twin return | real-proxy return | "
             "twin episodes ending with the object held | held-out real SFT loss | env steps |",
             "|---|---|---|---|---|---|---|---|"]
    for cond, per_seed in results.items():
        cells = []
        for key in ("twin", "real_proxy", "twin_return", "real_proxy_return", "twin_held_at_end", "heldout_real_sft_loss",
                    "env_steps"):
            v = np.array([r[key] for r in per_seed.values()], dtype=float)
            cells.append(f"{v.mean():.3f} +- {v.std():.3f}" if key != "env_steps" else f"{v.mean():.0f}")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines += ["", "Mean +- std over seeds (Stage I is one policy: its std is 0). Per seed:", "",
              "| condition | seed | twin (95% CI) | real proxy (95% CI) | held-out SFT loss | updates | env steps |",
              "|---|---|---|---|---|---|---|"]
    for cond, per_seed in results.items():
        for seed, r in sorted(per_seed.items()):
            lines.append(f"| {cond} | {seed} | {r['twin']:.3f} ({r['twin_ci95'][0]:.2f}-{r['twin_ci95'][1]:.2f}) | "
                         f"{r['real_proxy']:.3f} ({r['real_proxy_ci95'][0]:.2f}-{r['real_proxy_ci95'][1]:.2f}) | "
                         f"{r['heldout_real_sft_loss']:.3f} | {r['updates']} | {r['env_steps']} |")
    lines += ["", f"Paired against Stage I on the same {cfg.experiment.eval_episodes} episodes per env "
              "(mean over seeds; bootstrap over episode seeds):", "", *paired_lines(paired)]
    lines += ["", "Targets:", "", *check_targets(results, dict(cfg.experiment.plain_counterpart)), "",
              "Plots: `success_vs_env_steps.png`, `heldout_sft_loss.png`; training curves: `report/report.md`."]
    (pipe.run / "experiment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def plot_curves(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip([c for c in results if c != "sft"], CONDITION_COLORS))
    stage1 = next(iter(results["sft"].values()))
    panels = [("twin", "twin success"), ("real_proxy", "real-proxy success")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (env, title) in zip(axes, panels):
        ax.axhline(stage1[f"{env}_curve"], color="gray", ls="--", label="Stage I (curve seeds)")
        ax.axhline(stage1[env], color="gray", ls=":", label=f"Stage I ({stage1[f'{env}_episodes']} episodes)")
        for cond, per_seed in results.items():
            for i, (seed, r) in enumerate(sorted(per_seed.items())):
                if "curve" not in r:
                    continue
                ax.plot([p["env_steps"] for p in r["curve"]], [p[f"{env}_curve"] for p in r["curve"]], "o-",
                        color=colors.get(cond), alpha=0.85, label=f"{cond} (curve seeds)" if i == 0 else None)
                ax.plot([r["env_steps"]], [r[env]], "*", ms=12, color=colors.get(cond), alpha=0.85,
                        label=f"{cond} final ({r[f'{env}_episodes']} episodes)" if i == 0 else None)
        ax.set(title=title, xlabel="env steps trained on", ylabel="success (held-out seeds)", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "success_vs_env_steps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axhline(stage1["heldout_real_sft_loss"], color="gray", ls="--", label="Stage I")
    for cond, per_seed in results.items():
        for i, (seed, r) in enumerate(sorted(per_seed.items())):
            if "curve" in r:
                ax.plot([p["env_steps"] for p in r["curve"]], [p["heldout_real_sft_loss"] for p in r["curve"]], "o-",
                        color=colors.get(cond), alpha=0.85, label=cond if i == 0 else None)
    ax.set(title="held-out real-proxy SFT loss (what the real data taught)", xlabel="env steps trained on",
           ylabel="flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "heldout_sft_loss.png", dpi=110)
    plt.close(fig)


def ship_cotrained(pipe: Pipeline, points: dict, env_overrides: list[str], condition: str) -> None:
    """The final policy of ``condition``'s first seed as ``stage2_cotrain/`` (a checkpoints/stage1-style folder)."""
    key = next((k for k in points if k[0] == condition), None)
    if key is None:
        return
    src = Path(points[key][-1]["policy"])
    dst = pipe.run / "stage2_cotrain"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / ENV_OVERRIDES_FILE).write_text(json.dumps(env_overrides))


def heldout_replay(cfg: DictConfig, pipe: Pipeline) -> RealReplay:
    heldout_dir = pipe.run / "data" / "real_heldout"
    if not any(heldout_dir.glob("**/meta/info.json")):
        run_stage("held-out real-proxy demonstrations (never trained on)",
                  [PY, "-m", "common.twin.demos", f"out={heldout_dir}", f"episodes={cfg.experiment.heldout_episodes}",
                   f"workers={cfg.experiment.heldout_workers}", "env=real_proxy", *pipe.env,
                   "repo_id=local/real_heldout", f"seed={cfg.experiment.heldout_seed}"])
    return RealReplay([{"repo_id": "local/real_heldout", "root": str(heldout_dir)}])


def experiment(cfg: DictConfig, overrides: list[str]) -> int:
    pipe = Pipeline(cfg, overrides)
    pipe.demos()
    if pipe.checkpoint is None:
        pipe.stage1()
    heldout = heldout_replay(cfg, pipe)
    # the env every policy is scored on: the Stage I checkpoint's render settings over this config's
    env_overrides = list(dict.fromkeys(o for o in pipe.env if o.startswith("env.")))
    runs = stage2_runs(cfg, pipe)
    run_stage2_all(cfg, pipe, runs)
    exec_horizon = load_policy(str(pipe.stage1_policy)).exec_horizon  # env steps per chunk-step
    points = {key: run_points(run_dir, exec_horizon) for key, run_dir in runs.items()}
    evals = evaluate_all(cfg, pipe, points, env_overrides)
    if not runs:  # experiment.seeds=[]: only the shared part (held-out demos, Stage I's evaluation), cached
        stage1 = evals[str(pipe.stage1_policy)]["summary"]
        print("[tandem-experiment] Stage I: " + ", ".join(f"{env} {stage1[env]['success']:.3f}" for env in ENVS))
        return 0
    results = collect_results(cfg, pipe, runs, points, evals, heldout)
    paired = paired_summary(cfg, pipe, points, evals)
    (pipe.run / "experiment.json").write_text(json.dumps({"results": results, "paired": paired}, indent=1))
    write_table(cfg, pipe, results, paired)
    plot_curves(results, pipe.run)
    ship_cotrained(pipe, points, env_overrides, cfg.experiment.ship_condition)
    if runs:
        pipe.report(list(runs.values()), pipe.run / "report")
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_with_config(lambda cfg: experiment(cfg, [a for a in args if a != "--cfg"]),
                           config_name="cotrain_experiment", argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
