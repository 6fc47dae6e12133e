"""How much of the co-training anchor is left in one optimiser step? (issue #17)

    python -m benchmarks.sft_gradient_noise --policy checkpoints/stage1_low_data --real REAL_DEMOS \
        --twin TWIN_FRAMES [--noise-from STAGE2_POLICY] [--sizes 16 64 256 1024] [--draws 6] [--out DIR]

Stage II's step is ``grad(L_RL) + beta * grad(L_SFT)`` over the parameters it trains (the encoder frozen).
Per real batch size N (``learner.real_batch_size``: real samples per optimiser step), ``--draws``
independent estimates of ``beta * grad(L_SFT)`` on the real demos give:

- the mean cosine between two estimates: 0 when each is all noise, 1 when there is none (for a
  gradient of signal s and per-sample noise sigma it is about s^2 / (s^2 + sigma^2 / N));
- the norm of one estimate and of its signal (sqrt of the mean pairwise dot product: unbiased for the
  squared norm of the expectation);

against the RL term of one step: the policy gradient of ``--ppo-samples`` chunk samples on the twin
frames with advantages of unit variance (random +-1, as after PPO's advantage normalisation; a real step
carries 10-15 % signal, docs/stage2.md), i.e. the gradient of ``-mean(A * ratio)`` at ratio 1. Its norm
sets the scale the anchor has to hold against. The policy samples its chain with Stage II's noise
settings (``--noise-from``: a Stage II policy whose config holds them).

Writes ``sft_gradient_noise.json``, ``.md`` and ``.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.random_direction import noise_gradient_direction
from common.policy import load_policy
from learner.cotrain import sft_inputs
from learner.real_replay import RealReplay


def trainable(policy) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters Stage II trains (learner.freeze_encoder: all but the encoder's)."""
    policy.encoder.requires_grad_(False)
    return [(n, p) for n, p in policy.named_parameters() if p.requires_grad]


def flat(grads: dict, params: list) -> torch.Tensor:
    return torch.cat([grads[n].flatten() if n in grads else torch.zeros(p.numel()) for n, p in params])


def sft_gradient(policy, replay: RealReplay, n: int, beta: float, seed: int, batch: int = 64) -> dict:
    """``beta * grad L_SFT`` of one n-sample real batch (accumulated in micro-batches of ``batch``)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the flow-matching loss draws its times and noise from the global generator
    policy.train()
    policy.zero_grad()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        obs, actions, pad = sft_inputs(policy, replay.sample(b, policy.chunk_size, rng), "cpu")
        (policy.sft_loss(obs, actions, pad) * (beta * b / n)).backward()
    return {n_: p.grad.detach().clone() for n_, p in policy.named_parameters() if p.grad is not None}


def pairwise(vectors: list[torch.Tensor]) -> tuple[float, float]:
    """(mean cosine, mean dot product) over the pairs of independent estimates."""
    pairs = list(itertools.combinations(vectors, 2))
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs]
    dot = [float(a @ b) for a, b in pairs]
    return float(np.mean(cos)), float(np.mean(dot))


def plot(rows: list[dict], ppo_norm: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["real_samples"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.semilogx(sizes, [r["cosine_between_draws"] for r in rows], "o-")
    a.set(xlabel="real samples per optimiser step", ylabel="cosine of two independent estimates",
          title="SFT-term gradient: signal share", ylim=(0, 1))
    a.grid(alpha=0.3)
    b.loglog(sizes, [r["norm"] for r in rows], "o-", label="|beta g_SFT| (one estimate)")
    b.loglog(sizes, [max(r["signal_norm"], 1e-12) for r in rows], "s--", label="|beta E g_SFT| (signal)")
    b.axhline(ppo_norm, color="grey", ls=":", label="|g_RL| of one step")
    b.set(xlabel="real samples per optimiser step", ylabel="gradient norm", title="anchor against the RL term")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="the policy to measure at (e.g. Stage I)")
    ap.add_argument("--real", required=True, help="a LeRobot dataset of the real(-proxy) demos the SFT term uses")
    ap.add_argument("--twin", required=True, help="a LeRobot dataset of twin frames for the RL term")
    ap.add_argument("--noise-from", default=None, help="a Stage II policy: its chain noise settings are used")
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 256, 1024])
    ap.add_argument("--draws", type=int, default=6, help="independent estimates per size")
    ap.add_argument("--ppo-samples", type=int, default=1024, help="chunk samples of the RL term's step")
    ap.add_argument("--sft-loss-weight", type=float, default=0.2)
    ap.add_argument("--out", default="runs/sft_gradient_noise")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    noise = None
    if a.noise_from:
        noise = {"noise": json.loads((Path(a.noise_from) / "config.json").read_text())["noise"]}
    policy = load_policy(a.policy, overrides=noise)
    params = trainable(policy)
    real = RealReplay([{"repo_id": "local/real", "root": a.real}])

    ppo = [flat(noise_gradient_direction(load_policy(a.policy, overrides=noise), a.twin, a.ppo_samples, seed), params)
           / a.ppo_samples for seed in range(2)]
    ppo_norm = float(np.mean([float(g.norm()) for g in ppo]))
    rows = []
    for n in a.sizes:
        draws = [flat(sft_gradient(policy, real, n, a.sft_loss_weight, 1000 * n + k), params) for k in range(a.draws)]
        cos, dot = pairwise(draws)
        norm = float(np.mean([float(g.norm()) for g in draws]))
        signal = float(np.sqrt(max(dot, 0.0)))
        rows.append({"real_samples": n, "cosine_between_draws": cos, "norm": norm,
                     "signal_norm": signal, "signal_to_rl": signal / ppo_norm, "norm_to_rl": norm / ppo_norm,
                     "cosine_with_rl": float(np.mean([float(torch.nn.functional.cosine_similarity(g, p, dim=0))
                                                      for g in draws for p in ppo]))})
        print(rows[-1], flush=True)
    lines = ["# The co-training anchor in one optimiser step\n",
             f"policy `{a.policy}` (chain noise from `{a.noise_from}`), beta {a.sft_loss_weight}, {len(params)} trained "
             f"tensors ({sum(p.numel() for _, p in params):,} weights, encoder frozen); RL term: {a.ppo_samples} chunk "
             f"samples on `{a.twin}` with unit-variance advantages, |g_RL| = {ppo_norm:.4g}; {a.draws} draws per size.\n",
             "| real samples per step | cosine of two estimates | abs(beta g_SFT) | abs(beta E g_SFT) (signal) "
             "| signal / abs(g_RL) | one estimate / abs(g_RL) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['real_samples']} | {r['cosine_between_draws']:.3f} | {r['norm']:.4g} | {r['signal_norm']:.4g} | "
              f"{r['signal_to_rl']:.3f} | {r['norm_to_rl']:.3f} |" for r in rows]
    (out / "sft_gradient_noise.md").write_text("\n".join(lines) + "\n")
    (out / "sft_gradient_noise.json").write_text(json.dumps({"args": vars(a), "rl_norm": ppo_norm, "rows": rows},
                                                            indent=1))
    plot(rows, ppo_norm, out / "sft_gradient_noise.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
