"""Stage I: supervised fine-tuning of the policy on LeRobot demonstrations (``tandem-sft``).

The flow-matching SFT loss (``policy.sft_loss``) on action chunks drawn from one or more LeRobot
datasets (twin demos and real episodes), mixed by weight through ``learner.real_replay.RealReplay``.
The policy is created with the datasets' pooled action/state statistics as its normaliser, so the
saved policy carries them into Stage II (``learner.model_path=${run_dir}/policy``), the actors and
the deployer.

Outputs under ``run_dir``:
  policy/            latest weights (``policy.save``), loadable with ``common.policy.load_policy``
  sft_state/         resumable training state: policy/, optimizer.pt, rng.pt, state.json
  tb/                TensorBoard: sft/loss, sft/lr, sft/grad_norm, eval/sim_success, eval/real_proxy_success
  sft_summary.json   steps, initial and final loss, evaluation history

Both directories are written under a temporary name and renamed into place, so an interruption
mid-save leaves the previous complete copy. Re-running the same command resumes from
``sft_state`` (the policy config and statistics saved there win over the command line's).

  tandem-sft run_dir=runs/sft 'sft.datasets=[{repo_id: tandem/twin_demos, root: data/twin_demos}]'
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from common.config import run_with_config
from common.evaluation import evaluate_policy
from common.policy import load_policy, make_policy
from learner.cotrain import make_optimizer, sft_inputs
from learner.metrics import MetricsWriter
from learner.real_replay import RealReplay

log = logging.getLogger(__name__)

EVAL_ENVS = {"sim": False, "real_proxy": True}  # logged name -> real_proxy flag of the twin


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def learning_rate(step: int, cfg) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        decay_steps = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"sft.lr_schedule must be constant or cosine, got {cfg.lr_schedule!r}")


# ----- resumable training state ---------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    initial_loss: Optional[float] = None  # mean loss over the first log interval
    last_loss: Optional[float] = None  # mean loss over the latest log interval
    eval_history: list = field(default_factory=list)  # {env, success, episodes, mean_length, update}


def replace_dir(write, final: Path) -> None:
    """Run ``write(tmp_dir)``, then swap ``tmp_dir`` into ``final``: readers see a complete copy."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def rng_states(rng: np.random.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(rng: np.random.Generator, saved: dict) -> None:
    rng.bit_generator.state = saved["numpy"]
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def save_training(cfg, policy, optimizer, state: TrainState, rng: np.random.Generator) -> None:
    """The deployable policy at ``sft.policy_dir`` and the resumable state at ``sft.state_dir``."""
    def write_state(d: Path):
        policy.save(str(d / "policy"))
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        torch.save(rng_states(rng), d / "rng.pt")
        (d / "state.json").write_text(json.dumps(asdict(state), indent=1))

    replace_dir(write_state, Path(cfg.state_dir))
    replace_dir(lambda d: policy.save(str(d)), Path(cfg.policy_dir))


def load_training(cfg, device: torch.device, rng: np.random.Generator):
    """(policy, optimizer, TrainState) from ``sft.state_dir``, or None when there is no saved state."""
    d = Path(cfg.state_dir)
    if not (d / "state.json").exists():
        return None
    policy = load_policy(str(d / "policy"), map_location=str(device))
    optimizer = make_optimizer(policy, cfg)
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    restore_rng_states(rng, torch.load(d / "rng.pt", weights_only=True))
    state = TrainState(**json.loads((d / "state.json").read_text()))
    return policy, optimizer, state


# ----- evaluation -----------------------------------------------------------------------------
class Evaluator:
    """Deterministic episodes on the twin and the real proxy; each env is built once and reused."""

    def __init__(self, env_cfg, episodes: int, seed: int):
        self.env_cfg, self.episodes, self.seed = env_cfg, episodes, seed
        self.envs: dict = {}

    def __call__(self, policy, step: int) -> list[dict]:
        from common.twin import make_env

        results = []
        for name, real_proxy in EVAL_ENVS.items():
            if name not in self.envs:
                self.envs[name] = make_env(self.env_cfg, real_proxy=real_proxy, obs_mode="rgb")
            r = evaluate_policy(policy, self.env_cfg, real_proxy=real_proxy, episodes=self.episodes,
                                seed=self.seed, env=self.envs[name])
            results.append({"env": name, "success": r["success_rate"], "episodes": r["episodes"],
                            "mean_length": r["mean_length"], "update": step})
        return results

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def warn_if_image_sizes_differ(env_cfg, replay: RealReplay) -> None:
    from common.twin.task import to_dict

    camera = to_dict(env_cfg)["camera"]
    env_hw = (int(camera["height"]), int(camera["width"]))
    data_hw = next((tuple(s.image.shape[1:3]) for s in replay.sources if s.num_frames), None)
    if data_hw is not None and data_hw != env_hw:
        log.warning("evaluation renders %s images but the datasets hold %s: set env.image_size to match",
                    env_hw, data_hw)


# ----- stop on SIGINT/SIGTERM, after saving ------------------------------------------------------
class StopFlag:
    def __init__(self):
        self.set = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.request)

    def request(self, signum, frame):
        log.warning("signal %d: stopping after this step (policy and state are saved)", signum)
        self.set = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----- training ---------------------------------------------------------------------------------
def train(cfg) -> int:
    threads = torch.get_num_threads()
    if cfg.sft.torch_threads > 0:
        torch.set_num_threads(cfg.sft.torch_threads)
    try:
        return run_sft(cfg)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


def run_sft(cfg) -> int:
    sft = cfg.sft
    if not sft.datasets:
        raise ValueError("sft.datasets is empty: give at least one LeRobot dataset "
                         "(e.g. 'sft.datasets=[{repo_id: tandem/twin_demos, root: data/twin_demos}]')")
    device = resolve_device(sft.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    datasets = OmegaConf.to_container(sft.datasets, resolve=True)
    replay = RealReplay(datasets=datasets, live=None, seed=cfg.seed)
    stats = replay.dataset_stats()
    log.info("SFT data: %s", replay.size())

    resumed = load_training(sft, device, rng)
    if resumed is None:
        policy = make_policy(cfg.policy, stats=stats).to(device)
        optimizer = make_optimizer(policy, sft)
        state = TrainState()
    else:
        policy, optimizer, state = resumed
        log.info("resumed from %s at step %d", sft.state_dir, state.step)
    start_step = state.step
    evaluate = Evaluator(cfg.env, sft.eval_episodes, sft.eval_seed) if sft.eval_episodes > 0 else None
    if evaluate is not None:
        warn_if_image_sizes_differ(cfg.env, replay)
    metrics = MetricsWriter(sft.log_dir)
    stop = StopFlag()
    t_start = time.time()

    def run_eval():
        results = evaluate(policy, state.step)
        state.eval_history.extend(results)
        metrics.log({f"eval/{r['env']}_success": r["success"] for r in results}, state.step)
        log.info("step %d eval: %s", state.step, {r["env"]: r["success"] for r in results})

    bar = tqdm(total=sft.steps, initial=state.step, desc="sft", unit="step", dynamic_ncols=True)
    loss_sum, grad_norm_sum, interval_steps = torch.zeros((), device=device), torch.zeros((), device=device), 0
    try:
        policy.train()
        while state.step < sft.steps and not stop.set:
            lr = learning_rate(state.step, sft)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = replay.sample(sft.batch_size, policy.chunk_size, rng)
            loss = policy.sft_loss(*sft_inputs(policy, batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), sft.clip_grad)
            optimizer.step()
            state.step += 1
            bar.update(1)
            loss_sum += loss.detach()
            grad_norm_sum += grad_norm.detach()
            interval_steps += 1

            if state.step % sft.log_interval == 0 or state.step == sft.steps:
                state.last_loss = loss_sum.item() / interval_steps  # one device sync per interval
                if state.initial_loss is None:
                    state.initial_loss = state.last_loss
                metrics.log({"sft/loss": state.last_loss, "sft/lr": lr,
                             "sft/grad_norm": grad_norm_sum.item() / interval_steps}, state.step)
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                grad_norm_sum.zero_()
                interval_steps = 0
            if evaluate is not None and sft.eval_interval > 0 and state.step % sft.eval_interval == 0:
                run_eval()
            if sft.checkpoint_interval > 0 and state.step % sft.checkpoint_interval == 0:
                save_training(sft, policy, optimizer, state, rng)
        bar.close()

        finished = state.step >= sft.steps and not stop.set
        evaluated_now = any(e["update"] == state.step for e in state.eval_history)
        if finished and evaluate is not None and not evaluated_now:
            run_eval()
        save_training(sft, policy, optimizer, state, rng)
        write_summary(cfg, state, start_step, finished, time.time() - t_start, replay)
        log.info("SFT %s at step %d: policy in %s", "done" if finished else "stopped", state.step, sft.policy_dir)
    finally:
        bar.close()
        stop.restore()
        metrics.close()
        if evaluate is not None:
            evaluate.close()
    return 0


def write_summary(cfg, state: TrainState, start_step: int, finished: bool, duration_s: float,
                  replay: RealReplay) -> None:
    def last(env):
        runs = [e for e in state.eval_history if e["env"] == env]
        return runs[-1] if runs else None

    summary = {"steps": state.step, "target_steps": int(cfg.sft.steps), "resumed_from": start_step,
               "finished": finished, "initial_loss": state.initial_loss, "final_loss": state.last_loss,
               "eval": {env: e["success"] for env in EVAL_ENVS if (e := last(env)) is not None},  # latest rates
               "eval_sim": last("sim"), "eval_real_proxy": last("real_proxy"),
               "eval_history": state.eval_history, "duration_s": round(duration_s, 1),
               "data": replay.size(), "policy_dir": str(Path(cfg.sft.policy_dir).resolve()),
               "tensorboard": str(Path(cfg.sft.log_dir).resolve())}
    path = Path(cfg.sft.summary_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_with_config(train, config_name="sft", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
