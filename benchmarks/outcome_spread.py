"""How much of a policy's success is decided by the layout, and how much by the rollout's noise.

Stage II's signal comes from stochastic rollouts: PPO's sparse advantages and filtered BC's kept
episodes both need a layout on which the policy sometimes succeeds and sometimes fails. This runs
``--repeats`` stochastic episodes (``policy.sample``, the actors' RL-time noise) and one
deterministic episode on each of ``--seeds`` held-out layouts, and reports:

- success of the deterministic and of the stochastic policy on the same layouts;
- ``layout_share``: the share of the stochastic outcome's variance that lies between layouts
  (1: every layout always or never succeeds, so the noise never changes an outcome; 0: the layout
  does not matter), with the finite-repeat bias removed (``between_layout_share``);
- how many layouts never / always / sometimes succeed: only the "sometimes" ones give an outcome-based
  learner a contrast to learn from.

    python -m benchmarks.outcome_spread --policy checkpoints/stage1_low_data --seeds 40 --repeats 4 \
        --workers 2 --out docs/stage2/outcome_spread
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.evaluation import ENV_NAMES, run_episodes

EVAL_SEED = 100000  # the held-out seeds every Stage II evaluation uses


def between_layout_share(outcomes: np.ndarray) -> float:
    """outcomes [layouts, repeats] in {0, 1} -> the share of their variance that lies between layouts.
    Var(per-layout mean) holds the between-layout variance plus the repeats' sampling noise
    p_s (1 - p_s) / R; its unbiased estimate, mean(p_s (1 - p_s)) / (R - 1), is removed (ANOVA's
    intraclass correlation for binary outcomes). nan when every outcome is equal."""
    layouts, repeats = outcomes.shape
    if repeats < 2:
        raise ValueError("between_layout_share needs >= 2 repeats per layout")
    per_layout = outcomes.mean(1)
    p = outcomes.mean()
    total = p * (1.0 - p)
    if total == 0.0:
        return float("nan")
    within = float(np.mean(per_layout * (1.0 - per_layout))) * repeats / (repeats - 1)  # unbiased per-layout variance
    between = float(per_layout.var()) - within / repeats
    return between / total


def summarize(episodes: list[dict], repeats: int) -> dict:
    seeds = sorted({e["seed"] for e in episodes})
    det = {e["seed"]: e["success"] for e in episodes if e["sample_seed"] is None}
    stoch = np.array([[next(e["success"] for e in episodes if e["seed"] == s and e["sample_seed"] == sample)
                       for sample in range(s * repeats, (s + 1) * repeats)] for s in seeds], dtype=float)
    per_layout = stoch.mean(1)
    det_ok = np.array([det[s] for s in seeds], bool)
    return {"layouts": len(seeds), "repeats": repeats,
            "deterministic_success": float(det_ok.mean()), "stochastic_success": float(stoch.mean()),
            "between_layout_share": between_layout_share(stoch),
            "layouts_never": int((per_layout == 0).sum()), "layouts_always": int((per_layout == 1).sum()),
            "layouts_sometimes": int(((per_layout > 0) & (per_layout < 1)).sum()),
            "stochastic_success_where_deterministic_succeeds": float(stoch[det_ok].mean()) if det_ok.any() else None,
            "stochastic_success_where_deterministic_fails": float(stoch[~det_ok].mean()) if (~det_ok).any() else None,
            "per_layout": {str(s): {"deterministic": bool(det[s]), "stochastic": stoch[i].tolist()}
                           for i, s in enumerate(seeds)}}


def plot(summaries: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 3.6), squeeze=False)
    for ax, (env, s) in zip(axes[0], summaries.items()):
        rates = [np.mean(v["stochastic"]) for v in s["per_layout"].values()]
        dets = [v["deterministic"] for v in s["per_layout"].values()]
        bins = (np.arange(s["repeats"] + 2) - 0.5) / s["repeats"]  # one bin per possible count of successes
        ax.hist([[r for r, d in zip(rates, dets) if not d], [r for r, d in zip(rates, dets) if d]], bins=bins,
                stacked=True, label=["deterministic fails", "deterministic succeeds"])
        ax.set(title=f"{env}: layout share {s['between_layout_share']:.2f}",
               xlabel=f"stochastic success over {s['repeats']} rollouts of one layout", ylabel="layouts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "outcome_spread.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="a policy.save directory (with env_overrides.json)")
    ap.add_argument("--envs", nargs="+", default=["twin"], choices=sorted(ENV_NAMES))
    ap.add_argument("--seeds", type=int, default=40, help="held-out layouts, seeds from 100000")
    ap.add_argument("--repeats", type=int, default=4, help="stochastic rollouts per layout")
    ap.add_argument("--stochastic-steps", default=None, choices=["all", "last"],
                    help="which Euler steps are noisy (learner.policy_noise.stochastic_steps; default: the saved config's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--override", nargs="*", default=[], help="env overrides, e.g. env.max_episode_steps=100")
    ap.add_argument("--out", type=Path, default=Path("runs/outcome_spread"))
    args = ap.parse_args(argv)
    if args.repeats < 2:
        ap.error("--repeats must be >= 2")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = range(EVAL_SEED, EVAL_SEED + args.seeds)
    tasks = [(args.policy, env, s) for env in args.envs for s in seeds]
    tasks += [(args.policy, env, s, s * args.repeats + r) for env in args.envs for s in seeds for r in range(args.repeats)]
    noise = {"noise": {"stochastic_steps": args.stochastic_steps}} if args.stochastic_steps else None
    episodes = run_episodes(tasks, args.workers, args.device, args.override, policy_overrides=noise)
    summaries = {env: summarize([e for e in episodes if e["env"] == env], args.repeats) for env in args.envs}
    (args.out / "outcome_spread.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              "summary": summaries}, indent=1))
    plot(summaries, args.out)
    for env, s in summaries.items():
        print(f"{env}: deterministic {s['deterministic_success']:.3f}, stochastic {s['stochastic_success']:.3f}; "
              f"between-layout share {s['between_layout_share']:.2f}; layouts never / sometimes / always "
              f"{s['layouts_never']} / {s['layouts_sometimes']} / {s['layouts_always']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
