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

from omegaconf import DictConfig

from common.config import CONFIG_DIR, run_with_config

PY = sys.executable
REPO = CONFIG_DIR.parent


def run_stage(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"[tandem] {title} failed (exit {rc})")
    print(f"=== {title}: done in {time.time() - t0:.0f} s", flush=True)


def dataset_list(*entries: tuple[str, Path, float]) -> str:
    """A Hydra list of {repo_id, root, weight} for learner.real_datasets / sft.datasets."""
    items = ", ".join(f"{{repo_id: {r}, root: '{p}', weight: {w}}}" for r, p, w in entries)
    return f"[{items}]"


class Pipeline:
    """The stages, each a separate process; ``shared`` are the user's overrides for every stage."""

    def __init__(self, cfg: DictConfig, overrides: list[str]):
        self.cfg, self.p = cfg, cfg.pipeline
        self.run = Path(cfg.run_dir).resolve()
        own = ("pipeline.", "experiment.", "run_dir=", "size=")
        self.shared = [o for o in overrides if not o.lstrip("+~").startswith(own)]
        # what this root config sets for every stage; a size preset (configs/size/) travels whole
        self.env = [f"env.image_size={cfg.env.image_size}", f"env.max_episode_steps={cfg.env.max_episode_steps}",
                    f"env.reward_mode={cfg.env.reward_mode}"]
        if cfg.get("size_name"):
            self.env.insert(0, f"+size={cfg.size_name}")
        self.sim_demos = self.run / "data" / "sim_demos"
        # an existing real(-proxy) LeRobot dataset, or the collector's episodes in run_dir
        self.real_demos = Path(self.p.real_dataset).resolve() if self.p.get("real_dataset") else \
            self.run / "data" / "real_demos"
        self.stage1_dir = self.run / "stage1"
        self.checkpoint = None  # the shipped Stage I policy, when Stage II starts from it
        if self.p.stage1_checkpoint:
            from common.evaluation import policy_env_overrides

            path = Path(self.p.stage1_checkpoint)
            self.checkpoint = path if path.is_absolute() else REPO / path
            if not (self.checkpoint / "config.json").exists():
                raise SystemExit(f"[tandem] no Stage I checkpoint at {self.checkpoint} "
                                 "(pipeline.stage1_checkpoint=null trains Stage I from scratch)")
            # the renders the checkpoint was trained on (e.g. env.image_size=128) win over this config's
            self.env += policy_env_overrides(str(self.checkpoint))
        self.stage1_policy = self.checkpoint or self.stage1_dir / "policy"

    def _done(self, path: Path) -> bool:
        return bool(self.p.skip_existing) and path.exists()

    def demos(self) -> None:
        if self.checkpoint is None and not self._done(self.sim_demos / "meta" / "info.json"):
            run_stage("expert demonstrations in the twin",
                      [PY, "-m", "common.twin.demos", f"out={self.sim_demos}", f"episodes={self.p.sim_demos}",
                       "env=twin", *self.env, "repo_id=local/sim_demos"])
        if self.p.get("real_dataset"):
            if not any(self.real_demos.glob("**/meta/info.json")):
                raise SystemExit(f"[tandem] pipeline.real_dataset={self.p.real_dataset}: no LeRobot dataset there "
                                 "(meta/info.json, or part_XX/meta/info.json); null collects pipeline.real_demos")
        elif not self._done(self.real_demos / "meta" / "info.json"):
            run_stage("collector demonstrations on the real proxy (simulated robot, scripted teleop)",
                      [PY, "-m", "realrobot.collector", f"run_dir={self.run / 'collect'}", *self.env, *self.shared,
                       "teleop=scripted", "collect.prompt.type=auto", f"collect.num_episodes={self.p.real_demos}",
                       "collect.push=false", f"collect.root={self.real_demos}",
                       # a simulated robot needs no real-time pacing
                       "robot.pace=false", f"robot.safety.max_rate_hz={self.p.sim_robot_max_rate_hz}"])

    def stage1(self) -> None:
        if self.checkpoint is not None:
            self.evaluate_checkpoint()
            return
        if self._done(self.stage1_dir / "policy"):
            return
        run_stage("Stage I: SFT on sim + real demonstrations",
                  [PY, "-m", "learner.sft", f"run_dir={self.stage1_dir}", *self.env, *self.shared,
                   f"sft.steps={self.p.sft_steps}", f"sft.eval_episodes={self.p.sft_eval_episodes}",
                   f"sft.warmup_steps={min(500, self.p.sft_steps // 10)}",
                   "sft.datasets=" + dataset_list(("local/sim_demos", self.sim_demos, self.p.sim_weight),
                                                  ("local/tandem_real_demos", self.real_demos, self.p.real_weight))])

    def evaluate_checkpoint(self) -> None:
        """Stage I = the shipped checkpoint: its success on held-out seeds, in the report's layout."""
        out = self.stage1_dir / "sft_summary.json"
        if self._done(out):
            return
        eval_file = self.stage1_dir / "eval.json"
        run_stage(f"Stage I: the shipped checkpoint {self.checkpoint.relative_to(REPO) if self.checkpoint.is_relative_to(REPO) else self.checkpoint}, evaluated",
                  [PY, "-m", "common.evaluation", "--policy", str(self.checkpoint), "--workers", str(self.p.num_actors),
                   "--seeds", f"{self.p.stage1_eval_seed}:{self.p.stage1_eval_seed + self.p.stage1_eval_episodes}",
                   "--out", str(eval_file), *[o for o in self.env if o.startswith("env.")]])
        summary = json.loads(eval_file.read_text())["summary"]
        history = [{"env": name, "success": summary[env]["success"], "episodes": summary[env]["episodes"],
                    "mean_length": summary[env]["mean_length"], "update": 0}
                   for name, env in (("sim", "twin"), ("real_proxy", "real_proxy"))]
        out.write_text(json.dumps({"checkpoint": str(self.checkpoint), "eval_history": history,
                                   "eval_sim": history[0], "eval_real_proxy": history[1]}, indent=1))

    def stage2_command(self, run_dir: Path, extra: list[str] = ()) -> list[str]:
        """tandem-run (learner + actors as separate processes) from the Stage I policy; ``extra`` last."""
        return [PY, "-m", "tools.launch", f"run_dir={run_dir}", *self.env, *self.shared,
                f"learner.model_path={self.stage1_policy}",
                "learner.real_datasets=" + dataset_list(("local/tandem_real_demos", self.real_demos, 1.0)),
                f"learner.total_updates={self.p.stage2_updates}",
                f"learner.max_duration_s={self.p.stage2_max_duration_s}",
                f"launch.num_actors={self.p.num_actors}", *self.p.stage2_overrides, *extra]

    def stage2(self, run_dir: Path, extra: list[str] = (), title: str = "Stage II: co-training") -> dict:
        run_stage(f"{title} (learner + actors as separate processes)", self.stage2_command(run_dir, extra))
        return json.loads((run_dir / "summary.json").read_text())

    def report(self, runs: list[Path], out: Path) -> None:
        run_stage("report", [PY, "-m", "tools.report", *map(str, runs), "--out", str(out)])


def pipeline(cfg: DictConfig, overrides: list[str]) -> int:
    pipe = Pipeline(cfg, overrides)
    pipe.demos()
    pipe.stage1()
    stage2 = pipe.run / "stage2"
    summary = pipe.stage2(stage2)
    pipe.report([pipe.stage1_dir, stage2], pipe.run / "report")

    sft_file = pipe.stage1_dir / "sft_summary.json"
    sft = json.loads(sft_file.read_text()) if sft_file.exists() else {}
    print("\n=== Tandem pipeline summary")
    print(f"TensorBoard:  tensorboard --logdir {pipe.run}")
    print(f"Report:       {pipe.run / 'report' / 'report.md'}")
    for stage, s in (("Stage I ", sft), ("Stage II", summary)):
        for key, name in (("eval_sim", "twin"), ("eval_real_proxy", "real proxy")):
            e = s.get(key)
            print(f"{stage} {name:10s} " + (f"success {e['success']:.2f} over {e['episodes']} episodes"
                                             if e else "no evaluation finished"))
    print(f"Stage II: {summary['updates']} updates, {summary['sim_samples']} sim chunk-steps, "
          f"{summary['real_samples']} real samples, {summary['duration_s']} s")
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_with_config(lambda cfg: pipeline(cfg, [a for a in args if a != "--cfg"]), config_name="pipeline",
                           argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
