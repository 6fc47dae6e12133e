"""`tandem-pipeline`: demos -> Stage I SFT -> Stage II co-training -> report, one command.

Each stage is the same command a user would run by hand (`python -m ...` with Hydra overrides),
started as its own process; a stage whose output is already in ``run_dir`` is skipped, so a
re-run continues where an interrupted one stopped.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.config import run_with_config


def _run(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"[tandem-pipeline] {title} failed (exit {rc})")
    print(f"=== {title}: done in {time.time() - t0:.0f} s", flush=True)


def _dataset_list(*entries: tuple[str, Path, float]) -> str:
    items = ", ".join(f"{{repo_id: {r}, root: '{p}', weight: {w}}}" for r, p, w in entries)
    return f"[{items}]"


def pipeline(cfg: DictConfig, overrides: list[str]) -> int:
    p, py = cfg.pipeline, sys.executable
    run = Path(cfg.run_dir).resolve()
    # overrides for every stage: the user's, minus the pipeline's own block and run_dir
    shared = [o for o in overrides if not o.lstrip("+~").startswith(("pipeline.", "run_dir="))]
    env = [f"env.image_size={cfg.env.image_size}", f"env.max_episode_steps={cfg.env.max_episode_steps}"]
    sim_demos, real_demos = run / "data" / "sim_demos", run / "data" / "real_demos"
    stage1, stage2 = run / "stage1", run / "stage2"

    def done(path: Path) -> bool:
        return bool(p.skip_existing) and path.exists()

    if not done(sim_demos / "meta" / "info.json"):
        _run("expert demonstrations in the twin",
             [py, "-m", "common.twin.demos", f"out={sim_demos}", f"episodes={p.sim_demos}", "env=twin",
              f"image_size={cfg.env.image_size}", "repo_id=local/sim_demos"])
    if not done(real_demos / "meta" / "info.json"):
        _run("collector demonstrations on the real proxy (simulated robot, scripted teleop)",
             [py, "-m", "realrobot.collector", f"run_dir={run / 'collect'}", *env, *shared, "teleop=scripted",
              "collect.prompt.type=auto", f"collect.num_episodes={p.real_demos}", "collect.push=false",
              f"collect.root={real_demos}", "robot.pace=false"])
    if not done(stage1 / "policy"):
        _run("Stage I: SFT on sim + real demonstrations",
             [py, "-m", "learner.sft", f"run_dir={stage1}", *env, *shared, f"sft.steps={p.sft_steps}",
              f"sft.eval_episodes={p.sft_eval_episodes}",
              "sft.datasets=" + _dataset_list(("local/sim_demos", sim_demos, p.sim_weight),
                                              ("local/tandem_real_demos", real_demos, p.real_weight))])
    _run("Stage II: co-training (learner + actors as separate processes)",
         [py, "-m", "common.launch", f"run_dir={stage2}", *env, *shared, f"learner.model_path={stage1 / 'policy'}",
          "learner.real_datasets=" + _dataset_list(("local/tandem_real_demos", real_demos, 1.0)),
          f"learner.total_updates={p.stage2_updates}", f"learner.max_duration_s={p.stage2_max_duration_s}",
          f"launch.num_actors={p.num_actors}", *p.stage2_overrides])
    _run("report", [py, "-m", "learner.report", str(stage1), str(stage2), "--out", str(run / "report")])

    summary = json.loads((stage2 / "summary.json").read_text())
    sft = json.loads((stage1 / "sft_summary.json").read_text()) if (stage1 / "sft_summary.json").exists() else {}
    print("\n=== Tandem pipeline summary")
    print(f"TensorBoard:   tensorboard --logdir {run}")
    print(f"Report:        {run / 'report' / 'report.md'}")
    print(f"Stage I:       {json.dumps(sft.get('eval', sft.get('final_eval', {})))}")
    for key in ("eval_sim", "eval_real_proxy"):
        e = summary.get(key)
        print(f"Stage II {key[5:]:10s}: " + (f"success {e['success']:.2f} over {e['episodes']} episodes "
                                              f"(policy version {e['policy_version']})" if e else "no evaluation finished"))
    print(f"Stage II:      {summary['updates']} updates, {summary['sim_samples']} sim chunk-steps, "
          f"{summary['real_samples']} real samples, {summary['duration_s']} s")
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_with_config(lambda cfg: pipeline(cfg, [a for a in args if a != "--cfg"]), config_name="pipeline",
                           argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
