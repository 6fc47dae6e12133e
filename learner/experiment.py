"""`tandem-experiment`: co-training against plain PPO against no Stage II, from one Stage I.

    tandem-experiment                 # CPU scale (configs/size/cpu.yaml)
    tandem-experiment size=gpu        # one-GPU scale

Per seed, Stage II runs with co-training (``use_real_data_co_training=true``) and as plain PPO
(``false``); every condition, Stage I's checkpoint included, gets the same final deterministic
evaluation on the twin and on the real proxy (paired episode seeds). Writes ``experiment.md``
(mean +- std over seeds) and ``experiment.json``, and plots the Stage II runs with tandem-report.

Besides success, two measures that move before success does: the mean episode return on each
env (``env.reward_mode``, dense at the CPU scale), and the flow-matching (SFT) loss on held-out
real-proxy demonstrations, i.e. how much of what the real data taught is kept.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.config import load_config, run_with_config
from common.evaluation import evaluate_policy
from common.pipeline import PY, Pipeline, run_stage
from common.policy import load_policy
from learner.cotrain import sft_inputs
from learner.real_replay import RealReplay

STAGE2 = {"cotrain": ["learner.use_real_data_co_training=true"],
          "ppo": ["learner.use_real_data_co_training=false"]}


def final_policy_dir(cond: str, pipe: Pipeline, run_dir: Path) -> Path:
    if cond == "sft":
        return pipe.stage1_policy
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir} has no checkpoint")
    return ckpts[-1] / "policy"


@torch.no_grad()
def heldout_sft_loss(policy, replay: RealReplay, cfg: DictConfig) -> float:
    """Mean SFT loss on fixed batches of held-out real demos (same batches and noise for every policy)."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(int(cfg.experiment.heldout_batches)):
        obs, actions, pad = sft_inputs(policy, replay.sample(int(cfg.experiment.heldout_batch_size),
                                                             policy.chunk_size, rng), policy.device)
        losses.append(float(policy.sft_loss(obs, actions, pad, generator=gen)))
    return float(np.mean(losses))


def evaluate(cfg: DictConfig, env_cfg, policy_dir: Path, seed: int, heldout: RealReplay) -> dict:
    policy = load_policy(str(policy_dir))
    out = {"heldout_real_sft_loss": heldout_sft_loss(policy, heldout, cfg)}
    for name, proxy in (("twin", False), ("real_proxy", True)):
        r = evaluate_policy(policy, env_cfg, real_proxy=proxy, episodes=int(cfg.experiment.eval_episodes),
                            seed=int(cfg.experiment.eval_seed) + 1000 * seed, progress=True)
        out[name] = r["success_rate"]
        out[f"{name}_return"] = r["mean_return"]
    return out


def experiment(cfg: DictConfig, overrides: list[str]) -> int:
    pipe = Pipeline(cfg, overrides)
    pipe.demos()
    pipe.stage1()
    heldout_dir = pipe.run / "data" / "real_heldout"
    if not (heldout_dir / "meta" / "info.json").exists():
        run_stage("held-out real-proxy demonstrations (never trained on)",
                  [PY, "-m", "common.twin.demos", f"out={heldout_dir}", f"episodes={cfg.experiment.heldout_episodes}",
                   "env=real_proxy", *pipe.env, "repo_id=local/real_heldout",
                   f"seed={cfg.experiment.heldout_seed}"])
    heldout = RealReplay([{"repo_id": "local/real_heldout", "root": str(heldout_dir)}])
    # the env every condition is scored on: this config plus the Stage I checkpoint's render settings
    env_cfg = load_config("config", [o for o in pipe.env if o.startswith("env.")]).env
    results: dict[str, dict[int, dict]] = {c: {} for c in cfg.experiment.conditions}
    stage2_runs = []
    out_file = pipe.run / "experiment.json"
    if out_file.exists():  # a re-run continues: finished (condition, seed) pairs are kept
        for c, per_seed in json.loads(out_file.read_text())["results"].items():
            results.setdefault(c, {}).update({int(s): v for s, v in per_seed.items()})
    for seed in cfg.experiment.seeds:
        for cond in cfg.experiment.conditions:
            run_dir = pipe.run / f"seed{seed}" / cond
            if cond != "sft":
                stage2_runs.append(run_dir)
            if seed in results[cond]:
                continue
            if cond != "sft":
                pipe.stage2(run_dir, [f"seed={seed}", *STAGE2[cond]], title=f"Stage II [{cond}, seed {seed}]")
            results[cond][seed] = evaluate(cfg, env_cfg, final_policy_dir(cond, pipe, run_dir), seed, heldout)
            out_file.write_text(json.dumps({"results": results}, indent=1))
            print(f"[tandem-experiment] {cond} seed {seed}: {results[cond][seed]}", flush=True)
    pipe.report(stage2_runs, pipe.run / "report")
    write_table(cfg, pipe, results)
    return 0


def write_table(cfg: DictConfig, pipe: Pipeline, results: dict) -> None:
    p = cfg.pipeline
    lines = ["# Co-training experiment", "",
             f"Scale: `{cfg.get('size_name', 'custom')}`; policy `{cfg.policy.get('preset', cfg.policy.name)}`, "
             f"images {cfg.env.image_size}, {p.sim_demos} twin + {p.real_demos} real-proxy demos, "
             f"Stage I {p.sft_steps} steps, Stage II {p.stage2_updates} updates x {cfg.learner.global_batch_size} "
             f"segments with {p.num_actors} actors, reward `{cfg.env.reward_mode}`; final evaluation "
             f"{cfg.experiment.eval_episodes} episodes per env, condition and seed "
             f"(seeds {list(cfg.experiment.seeds)}).", "",
             "| condition | twin success | real-proxy success | twin return | real-proxy return | held-out real SFT loss |",
             "|---|---|---|---|---|---|"]
    keys = ("twin", "real_proxy", "twin_return", "real_proxy_return", "heldout_real_sft_loss")
    for cond, per_seed in results.items():
        if not per_seed:
            continue
        cells = []
        for key in keys:
            v = np.array([r[key] for r in per_seed.values() if key in r])
            cells.append(f"{v.mean():.3f} +- {v.std():.3f}" if v.size else "-")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines += ["", "Mean +- std over seeds; per seed in `experiment.json`."]
    lines += ["", f"Curves: [report]({pipe.run / 'report' / 'report.md'})"]
    (pipe.run / "experiment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_with_config(lambda cfg: experiment(cfg, [a for a in args if a != "--cfg"]),
                           config_name="cotrain_experiment", argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
