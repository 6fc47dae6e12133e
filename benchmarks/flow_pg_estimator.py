"""How well the learner's policy gradient points a Stage I flow policy toward a known better action,
for each way of scoring the denoising chain and each batch size (issue #17), without a simulator.

    python -m benchmarks.flow_pg_estimator --policy checkpoints/stage1_low_data --real DATASET \
        [--phases align learn] [--updates 40] [--seeds 0 1 2] [--out docs/stage2/estimator]

A contextual bandit on real(-proxy) frames: for frame i the target is the Stage I policy's own
deterministic executed actions plus a fixed offset ``--offset`` (normalised action units, one random
sign per action dimension), and the reward of a sampled chunk is minus the mean squared distance of
its executed actions to the target. Each update samples one chunk per frame with the current
policy, as an actor would, and trains on them with the learner's own update
(``learner.cotrain.train_step``: V-trace PPO with the value head as baseline, one-step episodes)
under the learner config plus ``--override``s. Reported per update: the remaining distance of the
deterministic policy to the target, as a fraction of the offset (1 at the start, 0 solved), the
reward of the sampled chunks, approx. KL, clip fraction and optimiser steps.

Phase ``align`` asks the same question without training: at the Stage I weights, the cosine
between the on-policy policy-gradient estimate from n chunk samples (the PPO surrogate's gradient
at ratio 1, advantages normalised over each batch of ``--frames``) and the exact gradient of the
deterministic policy's distance to the target (back-propagated through its ODE), for n from one
batch to ``--align-batches`` batches; and the cosine between two independent estimates of the
same size. An estimate whose cosine is near 0 moves the weights in a random direction.

Conditions (``policy.noise``, common/policy/flow.py): ``all/chunk`` (every step noisy, every term
scored: Tandem's behaviour up to issue #17's third experiment), ``all/executed`` (the last step's
unexecuted positions left out of log p: the same expected gradient with less variance) and
``last/executed`` (only the last Euler step noisy and scored, over the executed actions: 28 of 224
terms for the keypoint policy).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from common.config import load_config
from common.policy import load_policy
from common.segment import SegmentSpec
from learner.batcher import Batcher
from learner.cotrain import make_optimizer, sft_inputs, train_step
from learner.real_replay import RealReplay

CONDITIONS = {"all/chunk": ("all", "chunk"), "all/executed": ("all", "executed"),
              "last/executed": ("last", "executed")}
# the GPU experiment's Stage II settings (configs/size/gpu.yaml plus issue #17's third run)
LEARNER = ["learner.use_real_data_co_training=false", "learner.lr=1e-5", "learner.value_lr=1e-3",
           "learner.update_epoch=2", "learner.num_minibatches=4", "learner.target_kl=0.03",
           "learner.micro_batch_size=16"]


def normalised_actions(policy, obs: dict) -> torch.Tensor:
    """The deterministic policy's executed actions in normalised units [B, k, 7]."""
    return policy.normalizer.normalize("action", policy.act(obs))[:, :policy.exec_horizon]


@torch.no_grad()
def bandit_batch(policy, obs: dict, target: torch.Tensor, generator: torch.Generator) -> tuple[dict, float]:
    """One chunk per frame sampled by ``policy``, as one-step segments in the learner's batch layout."""
    policy.eval()
    out = policy.sample(obs, generator=generator)
    executed = out.chain[:, -1, :policy.exec_horizon].clamp(-policy.action_clip, policy.action_clip)
    reward = -(executed - target).pow(2).mean((1, 2))
    B, (h, w) = reward.shape[0], obs["image"].shape[1:3]
    spec = SegmentSpec(steps=1, image_hw=(h, w), token_len=obs["tokens"].shape[1], state_dim=obs["state"].shape[1],
                       num_denoise_steps=policy.num_denoise_steps, chunk_size=policy.chunk_size)
    batcher = Batcher(B, max_policy_lag=0, max_queued_segments=B)
    for i in range(B):
        seg = spec.empty()
        for key in ("image", "tokens", "state"):
            seg[key][:] = obs[key][i].cpu().numpy()  # the bootstrap observation is unused: done
        seg["chain"][0], seg["behaviour_logp"][0] = out.chain[i].numpy(), out.log_prob[i].item()
        seg["behaviour_value"][0], seg["reward"][0], seg["done"][0] = out.value[i].item(), reward[i].item(), 1
        batcher.add(seg, policy_version=0, current_version=0)
    return batcher.next_batch(current_version=0), float(reward.mean())


def deterministic_executed(policy, obs: dict) -> torch.Tensor:
    """``policy.act``'s executed actions, normalised, with gradient: its ODE from x_0 = 0."""
    obs_emb = policy.encode(obs)
    x = policy.ode(obs_emb, torch.zeros(obs_emb.shape[0], policy.chunk_size, policy.action_dim))
    return x[:, :policy.exec_horizon].clamp(-policy.action_clip, policy.action_clip)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def align(args, condition: str, obs: dict, offset: torch.Tensor) -> list[dict]:
    steps, score = CONDITIONS[condition]
    policy = load_policy(args.policy, overrides={"noise": {"stochastic_steps": steps, "score": score}}).eval()
    policy.encoder.requires_grad_(False)  # Stage II's freeze_encoder
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        target = normalised_actions(policy, obs) + offset
    policy.zero_grad()
    (deterministic_executed(policy, obs) - target).pow(2).mean().backward()
    improve = -flat_grad(params)
    estimates = []
    for i in range(args.align_batches):
        with torch.no_grad():
            out = policy.sample(obs, generator=torch.Generator().manual_seed(1000 + i))
            executed = out.chain[:, -1, :policy.exec_horizon].clamp(-policy.action_clip, policy.action_clip)
            reward = -(executed - target).pow(2).mean((1, 2))
            advantage = (reward - reward.mean()) / (reward.std() + 1e-8)
        policy.zero_grad()
        log_prob = policy.evaluate(obs, out.chain).log_prob
        (advantage * log_prob).mean().backward()  # ascent direction of the surrogate at ratio 1
        estimates.append(flat_grad(params).clone())
    grads = torch.stack(estimates)
    cosine = torch.nn.functional.cosine_similarity
    rows, n = [], 1
    while 2 * n <= len(estimates):
        groups = grads[:len(estimates) // n * n].view(-1, n, grads.shape[1]).mean(1)
        rows.append({"condition": condition, "samples": n * obs["image"].shape[0],
                     "cos_to_improvement": float(cosine(groups, improve[None], dim=1).mean()),
                     "cos_to_improvement_se": float(cosine(groups, improve[None], dim=1).std() / max(1, len(groups) - 1) ** 0.5),
                     "cos_between_estimates": float(cosine(groups[0::2][:len(groups) // 2],
                                                           groups[1::2][:len(groups) // 2], dim=1).mean()),
                     "scored_terms": int(policy.chain_terms.sum()) * policy.action_dim})
        n *= 2
    return rows


def run(args, condition: str, seed: int, obs: dict, offset: torch.Tensor) -> list[dict]:
    steps, score = CONDITIONS[condition]
    policy = load_policy(args.policy, overrides={"noise": {"stochastic_steps": steps, "score": score}})
    cfg = load_config("config", [*LEARNER, f"learner.global_batch_size={obs['image'].shape[0]}", *args.override]).learner
    torch.manual_seed(seed)
    optimizer = make_optimizer(policy, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = normalised_actions(policy.eval(), obs) + offset
    scale = float(offset.pow(2).mean())
    rows = []
    for update in range(args.updates + 1):
        with torch.no_grad():
            distance = float((normalised_actions(policy.eval(), obs) - target).pow(2).mean()) / scale
        row = {"condition": condition, "seed": seed, "update": update, "distance": distance}
        if update < args.updates:
            batch, reward = bandit_batch(policy, obs, target, generator)
            stats = train_step(policy, optimizer, batch, cfg, critic_only=update < args.critic_warmup)
            row.update(sampled_reward=reward, approx_kl=stats["train/approx_kl"],
                       clip_fraction=stats["train/clip_fraction"], optimizer_steps=stats["train/optimizer_steps"],
                       explained_variance=stats["train/explained_variance"])
        rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for condition in CONDITIONS:
        mine = [r for r in rows if r["condition"] == condition]
        updates = sorted({r["update"] for r in mine})
        for ax, key in zip(axes, ("distance", "clip_fraction")):
            per_update = [[r[key] for r in mine if r["update"] == u and key in r] for u in updates]
            xs = [u for u, v in zip(updates, per_update) if v]
            mean = np.array([np.mean(v) for v in per_update if v])
            spread = np.array([np.std(v) for v in per_update if v])
            ax.plot(xs, mean, label=condition)
            ax.fill_between(xs, mean - spread, mean + spread, alpha=0.2)
    axes[0].set(xlabel="PPO update (64 chunk samples each)", ylabel="remaining distance to the target / offset",
                title="deterministic policy vs the better action")
    axes[1].set(xlabel="PPO update", ylabel="clip fraction", title="PPO clip fraction per update")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "flow_pg_estimator.png", dpi=110)


def plot_align(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for condition in CONDITIONS:
        mine = [r for r in rows if r["condition"] == condition]
        if not mine:
            continue
        xs = [r["samples"] for r in mine]
        axes[0].errorbar(xs, [r["cos_to_improvement"] for r in mine], yerr=[r["cos_to_improvement_se"] for r in mine],
                         marker="o", capsize=3, label=f"{condition} ({mine[0]['scored_terms']} terms)")
        axes[1].plot(xs, [r["cos_between_estimates"] for r in mine], marker="o", label=condition)
    for ax, title in zip(axes, ("cos(policy-gradient estimate, deterministic improvement)",
                                "cos between two independent estimates")):
        ax.set(xscale="log", xlabel="chunk samples per estimate", title=title)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "gradient_alignment.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--real", required=True, help="a real(-proxy) LeRobot dataset: the bandit's frames")
    ap.add_argument("--phases", nargs="+", default=["align", "learn"], choices=["align", "learn"])
    ap.add_argument("--frames", type=int, default=64, help="chunk samples per update (one per frame)")
    ap.add_argument("--align-batches", type=int, default=64, help="align: batches of --frames samples per condition")
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--critic-warmup", type=int, default=3, help="first updates train the value head only")
    ap.add_argument("--offset", type=float, default=0.3, help="target offset per action dimension (normalised)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--override", nargs="*", default=[], help="learner config overrides, e.g. learner.lr=3e-6")
    ap.add_argument("--out", default=None, help="directory for results.json and flow_pg_estimator.png")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    stage1 = load_policy(a.policy).eval()
    replay = RealReplay([{"repo_id": "local/real", "root": a.real}])
    with torch.no_grad():
        obs, _, _ = sft_inputs(stage1, replay.sample(a.frames, stage1.chunk_size, np.random.default_rng(0)), "cpu")
    signs = torch.from_numpy(np.random.default_rng(1).choice([-1.0, 1.0], size=7).astype(np.float32))
    offset = a.offset * signs[None, None, :]
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if "align" in a.phases:
        aligned = [r for condition in tqdm(a.conditions, desc="gradient alignment") for r in align(a, condition, obs, offset)]
        for r in aligned:
            print(json.dumps(r))
        if out:
            (out / "alignment.json").write_text(json.dumps({"args": vars(a), "rows": aligned}, indent=1))
            plot_align(aligned, out)
    if "learn" not in a.phases:
        return 0
    rows = []
    runs = [(c, s) for c in a.conditions for s in a.seeds]
    for condition, seed in tqdm(runs, desc="bandit runs"):
        rows += run(a, condition, seed, obs, offset)
        last = rows[-1]
        tqdm.write(f"{condition} seed {seed}: distance {last['distance']:.3f} after {a.updates} updates")
    summary = {}
    for condition in a.conditions:
        final = [r["distance"] for r in rows if r["condition"] == condition and r["update"] == a.updates]
        trained = [r for r in rows if r["condition"] == condition and "approx_kl" in r]
        summary[condition] = {"final_distance_mean": float(np.mean(final)), "final_distance_per_seed": final,
                              "approx_kl_mean": float(np.mean([r["approx_kl"] for r in trained])),
                              "clip_fraction_mean": float(np.mean([r["clip_fraction"] for r in trained])),
                              "optimizer_steps_mean": float(np.mean([r["optimizer_steps"] for r in trained]))}
    print(json.dumps(summary, indent=1))
    if out:
        learner = OmegaConf.to_container(load_config("config", [*LEARNER, *a.override]).learner, resolve=True)
        (out / "results.json").write_text(json.dumps({"args": vars(a), "learner_overrides": LEARNER + a.override,
                                                      "lr": learner["lr"], "summary": summary, "rows": rows}, indent=1))
        plot(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
