"""Stage I on one GPU host: demos -> SFT variants -> parallel evaluation -> tables and plots (issue #16).

  python -m benchmarks.stage1_experiment --work /tmp/s1 --out OUT [--phases demos throughput train eval report]

Phases (each resumable: a phase whose output exists in --work is skipped):
  demos       twin demos (scripted expert, --twin-workers processes) and real-proxy demos at once
  throughput  Stage I samples/s, each run alone on the GPU: today's recipe (base ViT, fp32, batch 64,
              inline batches) against the new loop (bf16 autocast, batch 256, prefetch) for base and keypoint
  train       the SFT variants (--variants) as concurrent tandem-sft processes on the one GPU
  eval        tandem-eval's workers over every variant's final policy (held-out seeds, twin + real
              proxy), the main variant on its training seeds and its snapshots (success against steps)
  report      results.json, stage1.md (tables), success-vs-demos and success-vs-steps plots; the main
              policy packed as stage1_policy.tar (a checkpoints/stage1 folder) and the rest as results.tar
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PY = sys.executable
HELD_OUT_SEED = 100_000  # demos use seeds below 100,000 (twin from 0, real proxy from REAL_SEED)
REAL_SEED = 50_000

# name -> (twin demos used (None: all), policy input size, extra overrides); all use every real-proxy
# demo. Demos are rendered at --image-size; a policy with a smaller input resizes inside the model, so
# every variant is evaluated on the same renders it was trained on (env_overrides.json).
VARIANTS = {
    "main": (None, 128, ["policy.augment.shift_pad=8"]),
    "main64": (None, 64, []),
    "noaux": (None, 128, ["policy.augment.shift_pad=8", "policy.aux.weight=0"]),
    "d500": (500, 128, ["policy.augment.shift_pad=8"]),
    "d100": (100, 128, ["policy.augment.shift_pad=8"]),
}
ABLATIONS = {"noaux"}  # left out of the success-against-demos curve


def sh(cmd: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
    print("$", " ".join(cmd), flush=True)
    out = open(log, "w") if log else None
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, **kw)


def wait_all(procs: list[subprocess.Popen], what: str) -> None:
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{what} failed: exit codes {codes}")


def phase_demos(a, w: Path) -> None:
    jobs = []
    for name, env, n, workers, seed in (("twin", "twin", a.twin_demos, a.twin_workers, 0),
                                        ("real", "real_proxy", a.real_demos, a.real_workers, REAL_SEED)):
        if (w / name).exists():
            continue
        jobs.append(sh([PY, "-m", "common.twin.demos", f"out={w / name}", f"episodes={n}", f"workers={workers}",
                        f"env={env}", f"image_size={a.image_size}", f"seed={seed}", f"repo_id=local/{name}"]))
    t0 = time.time()
    wait_all(jobs, "demos")
    print(f"demos: {time.time() - t0:.0f} s", flush=True)


def datasets_arg(w: Path, twin_episodes) -> str:
    cap = f", max_episodes: {twin_episodes}" if twin_episodes else ""
    return (f"sft.datasets=[{{repo_id: local/twin, root: '{w / 'twin'}', weight: 0.75{cap}}}, "
            f"{{repo_id: local/real, root: '{w / 'real'}', weight: 0.25}}]")


def sft_cmd(a, w: Path, run: Path, policy: str, extra: list[str], twin_episodes=None, input_size=None) -> list[str]:
    size = [f"policy.image_size={input_size}"] if input_size else []
    return [PY, "-m", "learner.sft", f"run_dir={run}", f"policy={policy}", *size, f"env.image_size={a.image_size}",
            f"device={a.device}", "sft.eval_episodes=0", datasets_arg(w, twin_episodes), *extra]


def phase_throughput(a, w: Path) -> None:
    out = w / "throughput.json"
    if out.exists():
        return
    today = ["sft.batch_size=64", "sft.amp=none", "sft.prefetch=0", "sft.diag_frames=0", "sft.val_fraction=0"]
    new = ["sft.batch_size=256", "sft.amp=bf16", "sft.prefetch=2", "sft.diag_frames=0", "sft.val_fraction=0"]
    steps = dict(zip(("base_today", "base_new", "keypoint_new"), a.throughput_steps))
    runs = {"base_today": ("base", today, steps["base_today"]), "base_new": ("base", new, steps["base_new"]),
            "keypoint_new": ("keypoint", [*new, "policy.image_size=128"], steps["keypoint_new"])}
    result = {}
    for name, (policy, extra, steps) in runs.items():
        run = w / "throughput" / name
        p = sh(sft_cmd(a, w, run, policy, [*extra, f"sft.steps={steps}", "sft.checkpoint_interval=0"],
                       twin_episodes=200), log=w / f"throughput_{name}.log")  # a part of the data: quick to load
        wait_all([p], f"throughput {name}")
        s = json.loads((run / "sft_summary.json").read_text())
        result[name] = {"policy": policy, "overrides": extra, "steps": steps,
                        "samples_per_s": s["train_samples_per_s"]}
        print(name, result[name], flush=True)
    base = result["base_today"]["samples_per_s"]
    for r in result.values():
        r["x_vs_base_today"] = round(r["samples_per_s"] / base, 2) if base and r["samples_per_s"] else None
    out.write_text(json.dumps(result, indent=1))


def planned_steps(a, w: Path) -> int:
    """--steps, cut to what fits in the time budget at the measured single-run rate when several
    runs share the GPU (assumed to get half that rate each: they overlap CPU-side work)."""
    t = w / "throughput.json"
    if not t.exists():
        return a.steps
    measured = json.loads(t.read_text())["keypoint_new"]["samples_per_s"]
    if not measured:
        return a.steps
    rate = measured / a.batch_size  # steps/s alone at this batch size
    fit = int(0.5 * rate * a.train_budget_s * 0.9) // 100 * 100
    return max(1000, min(a.steps, fit))


def train_overrides(a, steps: int) -> list[str]:
    # lr schedule, warm-up, weight decay and EMA: configs/sft.yaml's defaults (the recipe)
    return [f"sft.steps={steps}", f"sft.batch_size={a.batch_size}", "sft.amp=bf16",
            f"sft.checkpoint_interval={steps // 4}", f"sft.diag_interval={steps // 4}", "sft.diag_frames=512",
            f"sft.max_duration_s={a.train_budget_s}", f"sft.torch_threads={a.threads}"]


def phase_train(a, w: Path) -> None:
    procs, steps = [], planned_steps(a, w)
    print(f"train: {steps} steps per variant", flush=True)
    for name in a.variants:
        run = w / "runs" / name
        if (run / "sft_summary.json").exists() and json.loads((run / "sft_summary.json").read_text())["finished"]:
            continue
        twin_episodes, input_size, extra = VARIANTS[name]
        procs.append(sh(sft_cmd(a, w, run, "keypoint", [*train_overrides(a, steps), f"sft.snapshot_dir={run / 'snapshots'}",
                                                         *extra], twin_episodes, input_size), log=w / f"train_{name}.log"))
    t0 = time.time()
    wait_all(procs, "train")
    print(f"train: {time.time() - t0:.0f} s", flush=True)


def write_env_overrides(policy_dir: Path, image_size: int) -> None:
    (policy_dir / "env_overrides.json").write_text(json.dumps([f"env.image_size={image_size}"]))


def phase_eval(a, w: Path) -> None:
    from common.evaluation import evaluate_parallel

    out = w / "eval.json"
    if out.exists():
        return
    held = list(range(HELD_OUT_SEED, HELD_OUT_SEED + a.eval_episodes))
    jobs = []
    for name in a.variants:
        policy = w / "runs" / name / "policy"
        write_env_overrides(policy, a.image_size)
        jobs.append((str(policy), ["twin", "real_proxy"], held if name == "main" else held[:a.curve_episodes]))
    main = w / "runs" / "main"
    if "main" in a.variants:
        # its own training layouts: twin worker 0's seeds and real-proxy worker 0's (the first demos of each)
        train_copy = main / "policy_train_seeds"
        if not train_copy.exists():
            shutil.copytree(main / "policy", train_copy)
        jobs.append((str(train_copy), ["twin"], list(range(0, a.train_seed_episodes))))
        jobs.append((str(train_copy), ["real_proxy"], list(range(REAL_SEED, REAL_SEED + a.train_seed_episodes))))
        for snap in sorted((main / "snapshots").glob("step_*"))[:-1]:  # the last one is the final policy
            write_env_overrides(snap, a.image_size)
            jobs.append((str(snap), ["twin", "real_proxy"], held[:a.curve_episodes]))
    t0 = time.time()
    results = evaluate_parallel(jobs, a.eval_workers, a.eval_device, threads=1)
    print(f"eval: {sum(len(r['episodes']) for r in results.values())} episodes in {time.time() - t0:.0f} s", flush=True)
    out.write_text(json.dumps(results, indent=1))


def phase_report(a, w: Path, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.evaluation import format_table

    evals = json.loads((w / "eval.json").read_text())
    throughput = json.loads((w / "throughput.json").read_text()) if (w / "throughput.json").exists() else {}
    runs = {}
    for name in a.variants:
        run = w / "runs" / name
        s = json.loads((run / "sft_summary.json").read_text())
        runs[name] = {"twin_demos": VARIANTS[name][0] or a.twin_demos, "input_size": VARIANTS[name][1],
                      "overrides": VARIANTS[name][2],
                      "steps": s["steps"], "final_loss": s["final_loss"], "train_samples_per_s": s["train_samples_per_s"],
                      "diagnostics": s["diagnostics"], "data": s["data"],
                      "eval": evals[str(run / "policy")]["summary"]}
    main = w / "runs" / "main"
    steps_curve = []
    for d, r in evals.items():
        if "/snapshots/step_" in d:
            steps_curve.append({"step": int(d.rsplit("_", 1)[1]), **{e: v["success"] for e, v in r["summary"].items()}})
    if "main" in runs:
        steps_curve.append({"step": runs["main"]["steps"], **{e: v["success"] for e, v in runs["main"]["eval"].items()}})
    steps_curve.sort(key=lambda r: r["step"])
    train_seeds = evals.get(str(main / "policy_train_seeds"), {}).get("summary")
    result = {"args": vars(a), "runs": runs, "throughput": throughput, "success_vs_steps": steps_curve,
              "main_on_training_seeds": train_seeds}
    (w / "results.json").write_text(json.dumps(result, indent=1))

    lines = ["# Stage I results", "", f"Held-out seeds from {HELD_OUT_SEED}; twin demos from seed 0, real-proxy demos "
             f"from {REAL_SEED}; image {a.image_size}x{a.image_size}.", "",
             "| variant | input | twin demos | real demos | steps | final SFT loss | twin success | real-proxy success | val loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ev = r["eval"]
        lines.append(f"| {name} | {r['input_size']} | {r['twin_demos']} | {a.real_demos} | {r['steps']} | {r['final_loss']:.3f} | "
                     f"{ev['twin']['success']:.3f} ({ev['twin']['episodes']}) | "
                     f"{ev['real_proxy']['success']:.3f} ({ev['real_proxy']['episodes']}) | "
                     f"{(r['diagnostics'] or {}).get('val_loss', float('nan')):.3f} |")
    for name, r in runs.items():
        lines += ["", f"## {name}", "", format_table(r["eval"])]
    if train_seeds:
        lines += ["", "## main on its own training seeds", "", format_table(train_seeds)]
    if throughput:
        lines += ["", "## Stage I throughput (each run alone on the GPU)", "", "| run | samples/s | x vs base today |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['samples_per_s']} | {v['x_vs_base_today']} |" for k, v in throughput.items()]
    (w / "stage1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    demo_runs = sorted(((r["twin_demos"], r) for n, r in runs.items() if n not in ABLATIONS and r["input_size"] == 128),
                       key=lambda x: x[0])
    for env in ("twin", "real_proxy"):
        axes[0].plot([d for d, _ in demo_runs], [r["eval"][env]["success"] for _, r in demo_runs], "o-", label=env)
        axes[1].plot([p["step"] for p in steps_curve], [p.get(env, float("nan")) for p in steps_curve], "o-", label=env)
    axes[0].set(xscale="log", xlabel="twin demos (+ real-proxy demos)", ylabel="success (held-out seeds)",
                title="Stage I success against demos", ylim=(0, 1))
    axes[1].set(xlabel="SFT steps (main)", ylabel="success (held-out seeds)", title="Stage I success against steps",
                ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(w / "stage1_success.png", dpi=110)

    out_dir.mkdir(parents=True, exist_ok=True)
    if "main" in runs:
        with tarfile.open(out_dir / "stage1_policy.tar", "w") as tar:
            tar.add(main / "policy", arcname="stage1")
    with tarfile.open(out_dir / "results.tar", "w") as tar:
        for f in ["results.json", "stage1.md", "stage1_success.png", "eval.json", *[p.name for p in w.glob("*.log")]]:
            if (w / f).exists():
                tar.add(w / f, arcname=f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", nargs="+", default=["demos", "throughput", "train", "eval", "report"])
    ap.add_argument("--variants", nargs="+", default=["main", "d500", "d100"], choices=list(VARIANTS))
    ap.add_argument("--twin-demos", type=int, default=1500)
    ap.add_argument("--real-demos", type=int, default=100)
    ap.add_argument("--twin-workers", type=int, default=13)
    ap.add_argument("--real-workers", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128, help="demo and evaluation render size")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--throughput-steps", type=int, nargs=3, default=[300, 150, 600],
                    help="steps of the base_today, base_new and keypoint_new throughput runs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per SFT process")
    ap.add_argument("--train-budget-s", type=int, default=300, help="each SFT run stops (saved) after this")
    ap.add_argument("--eval-episodes", type=int, default=100, help="held-out episodes per env for the main variant")
    ap.add_argument("--curve-episodes", type=int, default=40, help="per env for the other variants and snapshots")
    ap.add_argument("--train-seed-episodes", type=int, default=20)
    ap.add_argument("--eval-workers", type=int, default=16)
    ap.add_argument("--eval-device", default="cuda")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(a.work)
    w.mkdir(parents=True, exist_ok=True)
    phases = {"demos": phase_demos, "throughput": phase_throughput, "train": phase_train, "eval": phase_eval}
    for phase in a.phases:
        t0 = time.time()
        if phase == "report":
            phase_report(a, w, Path(a.out))
        else:
            phases[phase](a, w)
        print(f"[stage1] phase {phase} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
