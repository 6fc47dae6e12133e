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

import contextlib
import json
import logging
import queue
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

from common.device import resolve_device
from common.config import run_with_config
from common.evaluation import evaluate_policy
from common.policy import load_policy, make_policy
from learner.cotrain import make_optimizer, sft_inputs
from learner.diagnose import diagnose, flat_metrics
from learner.ema import as_ema, make_ema, update_ema
from learner.metrics import MetricsWriter
from learner.real_replay import RealReplay

log = logging.getLogger(__name__)

EVAL_ENVS = {"sim": False, "real_proxy": True}  # logged name -> real_proxy flag of the twin
WARMUP_STEPS_UNTIMED = 10  # excluded from train_samples_per_s (allocator warm-up, cuDNN autotuning)


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


class Prefetcher:
    """Samples and ships SFT batches to the device on a background thread (data loading off the
    training thread); ``get()`` returns the next (obs, actions, action_pad)."""

    def __init__(self, replay, policy, batch_size: int, rng: np.random.Generator, device, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.args = (replay, policy, batch_size, rng, device)
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="sft-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        replay, policy, batch_size, rng, device = self.args
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            while not self.stopped.is_set():
                batch = replay.sample(batch_size, policy.chunk_size, rng)
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    item = sft_inputs(policy, batch, device)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                while not self.stopped.is_set():
                    try:
                        self.queue.put((item, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced by get()
            self.error = e

    def get(self):
        while True:
            if self.error is not None:
                raise RuntimeError("SFT batch loading failed") from self.error
            try:
                item, event = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


# ----- resumable training state ---------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    initial_loss: Optional[float] = None  # mean loss over the first log interval
    last_loss: Optional[float] = None  # mean loss over the latest log interval
    eval_history: list = field(default_factory=list)  # {env, success, episodes, mean_length, update}
    diagnostics: list = field(default_factory=list)  # learner.diagnose reports, with "step"
    last_terms: dict = field(default_factory=dict)  # latest interval's loss parts (sft/flow_loss, sft/aux_loss)


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


def save_training(cfg, policy, optimizer, state: TrainState, rng: np.random.Generator, ema=None) -> None:
    """The deployable policy (the EMA weights when there are any) at ``sft.policy_dir`` and the
    resumable state at ``sft.state_dir``."""
    def write_state(d: Path):
        policy.save(str(d / "policy"))
        if ema is not None:
            ema.save(str(d / "ema"))
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        torch.save(rng_states(rng), d / "rng.pt")
        (d / "state.json").write_text(json.dumps(asdict(state), indent=1))

    replace_dir(write_state, Path(cfg.state_dir))
    replace_dir(lambda d: (ema if ema is not None else policy).save(str(d)), Path(cfg.policy_dir))


def load_training(cfg, device: torch.device, rng: np.random.Generator):
    """(policy, optimizer, TrainState, ema or None) from ``sft.state_dir``, or None when there is no saved state."""
    d = Path(cfg.state_dir)
    if not (d / "state.json").exists():
        return None
    policy = load_policy(str(d / "policy"), map_location=str(device))
    optimizer = make_optimizer(policy, cfg)
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    restore_rng_states(rng, torch.load(d / "rng.pt", weights_only=True))
    state = TrainState(**json.loads((d / "state.json").read_text()))
    ema = None
    if cfg.ema_decay > 0:
        ema = (as_ema(load_policy(str(d / "ema"), map_location=str(device)))
               if (d / "ema").exists() else make_ema(policy, cfg.ema_decay))
    return policy, optimizer, state, ema


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
    replay = RealReplay(datasets=datasets, live=None, seed=cfg.seed, fps=int(cfg.env.control_freq))
    stats = replay.dataset_stats()  # over every frame, so the normaliser does not depend on the split
    val_replay = replay.hold_out(sft.val_fraction, cfg.seed)
    log.info("SFT data: %s; held out for validation: %s", replay.size(), val_replay.size() if val_replay else None)

    resumed = load_training(sft, device, rng)
    if resumed is None:
        if sft.init_policy:
            # fine-tune a saved policy: its weights and its normaliser (the datasets' statistics are not
            # used, so actions keep the scale the policy was trained at)
            policy = load_policy(str(sft.init_policy), map_location=str(device))
            log.info("initialised from %s", sft.init_policy)
        else:
            policy = make_policy(cfg.policy, stats=stats).to(device)
        optimizer = make_optimizer(policy, sft)
        state = TrainState()
        ema = make_ema(policy, sft.ema_decay)
    else:
        policy, optimizer, state, ema = resumed
        log.info("resumed from %s at step %d", sft.state_dir, state.step)
    scored = ema if ema is not None else policy  # the weights that are evaluated and deployed
    amp = {"none": None, "bf16": torch.bfloat16}[sft.amp]
    log.info("policy: %d parameters; amp %s; EMA %s", policy.num_parameters(), sft.amp, sft.ema_decay)
    start_step = state.step
    evaluate = Evaluator(cfg.env, sft.eval_episodes, sft.eval_seed) if sft.eval_episodes > 0 else None
    if evaluate is not None:
        warn_if_image_sizes_differ(cfg.env, replay)
    metrics = MetricsWriter(sft.log_dir)
    stop = StopFlag()
    t_start = time.time()
    timed_from = None  # (step, time, paused) once the first steps (allocator, autotuning) are done

    paused = [0.0]  # seconds spent outside training steps (evaluation, diagnostics, saves)

    def run_eval():
        t0 = time.time()
        results = evaluate(scored, state.step)
        paused[0] += time.time() - t0
        state.eval_history.extend(results)
        metrics.log({f"eval/{r['env']}_success": r["success"] for r in results}, state.step)
        log.info("step %d eval: %s", state.step, {r["env"]: r["success"] for r in results})

    def run_diagnostics():
        t0 = time.time()
        report = diagnose(scored, replay, val_replay, sft.diag_frames, sft.batch_size, cfg.seed)
        paused[0] += time.time() - t0
        state.diagnostics.append({"step": state.step, **report})
        metrics.log(flat_metrics(report), state.step)
        log.info("step %d diagnostics: val loss %s, val gripper sign error %s", state.step, report.get("val_loss"),
                 report.get("val", {}).get("gripper_sign_error"))

    bar = tqdm(total=sft.steps, initial=state.step, desc="sft", unit="step", dynamic_ncols=True)
    loss_sum, grad_norm_sum, interval_steps = torch.zeros((), device=device), torch.zeros((), device=device), 0
    term_sums: dict = {}  # parts of the loss the policy reports (flow matching, auxiliary)
    batches = Prefetcher(replay, policy, sft.batch_size, rng, device, sft.prefetch) if sft.prefetch > 0 else None
    try:
        policy.train()
        while state.step < sft.steps and not stop.set:
            if sft.max_duration_s and time.time() - t_start > sft.max_duration_s:
                log.warning("sft.max_duration_s=%s reached at step %d: stopping (policy and state are saved; "
                            "re-run to continue)", sft.max_duration_s, state.step)
                break
            lr = learning_rate(state.step, sft)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = (batches.get() if batches is not None
                      else sft_inputs(policy, replay.sample(sft.batch_size, policy.chunk_size, rng), device))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = policy.sft_loss(*inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), sft.clip_grad)
            optimizer.step()
            if ema is not None:
                update_ema(ema, policy, sft.ema_decay, state.step)
            state.step += 1
            if state.step - start_step == WARMUP_STEPS_UNTIMED:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timed_from = (state.step, time.time(), paused[0])
            bar.update(1)
            loss_sum += loss.detach()
            for name, value in getattr(policy, "last_sft_terms", {}).items():
                term_sums[name] = term_sums.get(name, 0.0) + value
            grad_norm_sum += grad_norm.detach()
            interval_steps += 1

            if state.step % sft.log_interval == 0 or state.step == sft.steps:
                state.last_loss = loss_sum.item() / interval_steps  # one device sync per interval
                if state.initial_loss is None:
                    state.initial_loss = state.last_loss
                terms = {f"sft/{k}_loss": float(v) / interval_steps for k, v in term_sums.items()}
                state.last_terms = terms
                metrics.log({"sft/loss": state.last_loss, "sft/lr": lr,
                             "sft/grad_norm": grad_norm_sum.item() / interval_steps, **terms}, state.step)
                term_sums.clear()
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                grad_norm_sum.zero_()
                interval_steps = 0
            if sft.diag_interval > 0 and state.step % sft.diag_interval == 0:
                run_diagnostics()
            if evaluate is not None and sft.eval_interval > 0 and state.step % sft.eval_interval == 0:
                run_eval()
            if sft.checkpoint_interval > 0 and state.step % sft.checkpoint_interval == 0:
                save_training(sft, policy, optimizer, state, rng, ema)
                if sft.snapshot_dir:  # the deployable weights at this step, kept (success against steps)
                    scored.save(os.path.join(sft.snapshot_dir, f"step_{state.step:06d}"))
        bar.close()
        if batches is not None:
            batches.close()

        finished = state.step >= sft.steps and not stop.set  # a time-limited run resumes later
        if finished and sft.diag_frames > 0 and not any(d["step"] == state.step for d in state.diagnostics):
            run_diagnostics()
        evaluated_now = any(e["update"] == state.step for e in state.eval_history)
        if finished and evaluate is not None and not evaluated_now:
            run_eval()
        save_training(sft, policy, optimizer, state, rng, ema)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = None
        if timed_from is not None and state.step > timed_from[0]:
            busy = time.time() - timed_from[1] - (paused[0] - timed_from[2])
            rate = (state.step - timed_from[0]) * sft.batch_size / max(busy, 1e-9)
        write_summary(cfg, state, start_step, finished, time.time() - t_start, replay, rate)
        log.info("SFT %s at step %d: policy in %s", "done" if finished else "stopped", state.step, sft.policy_dir)
    finally:
        bar.close()
        if batches is not None:
            batches.close()
        stop.restore()
        metrics.close()
        if evaluate is not None:
            evaluate.close()
    return 0


def write_summary(cfg, state: TrainState, start_step: int, finished: bool, duration_s: float,
                  replay: RealReplay, samples_per_s: Optional[float] = None) -> None:
    def last(env):
        runs = [e for e in state.eval_history if e["env"] == env]
        return runs[-1] if runs else None

    summary = {"steps": state.step, "target_steps": int(cfg.sft.steps), "resumed_from": start_step,
               "finished": finished, "initial_loss": state.initial_loss, "final_loss": state.last_loss,
               "final_loss_terms": state.last_terms,
               "eval": {env: e["success"] for env in EVAL_ENVS if (e := last(env)) is not None},  # latest rates
               "eval_sim": last("sim"), "eval_real_proxy": last("real_proxy"),
               "eval_history": state.eval_history, "duration_s": round(duration_s, 1),
               "diagnostics": state.diagnostics[-1] if state.diagnostics else None,
               "train_samples_per_s": None if samples_per_s is None else round(samples_per_s, 1),  # after the first steps
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
