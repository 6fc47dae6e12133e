"""Is a Stage II policy's change better than a random change of the same size? (issue #17)

    python -m benchmarks.random_direction --start checkpoints/stage1_low_data --trained RUN/stage2_cotrain \
        [--null gaussian noise_gradient --frames TWIN_DATASET] [--directions 2] [--envs real_proxy twin] \
        [--seeds 100000:100100] [--workers 2] [--out DIR]

Two null models, ``--directions`` policies each, every tensor the start's plus a direction scaled to
the norm of that tensor's actual change (start -> trained; unchanged tensors stay unchanged, so a
frozen encoder stays frozen):

- ``gaussian``: a Gaussian direction. Most of weight space barely moves the actions, so this tests
  whether the change's *size* alone explains what it did.
- ``noise_gradient`` (needs ``--frames``, a LeRobot dataset of the frames Stage II trained on): the
  policy gradient of ``--samples`` chunks sampled on those frames, with random +-1 advantages, i.e.
  a PPO step whose advantages carry no information about the task. It moves the actions as much as a
  real policy gradient does; if the trained change is no better than this, its updates carried no
  more about the task than noise.

The start, the trained policy and the null policies are evaluated deterministically on the same
held-out seeds (``common.evaluation``); per env the report gives success and the paired change
against the start (episodes newly solved / newly failed).

Writes ``random_direction.json`` and ``random_direction.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.evaluation import ENV_OVERRIDES_FILE, evaluate_parallel, parse_seeds
from common.policy import load_policy


def change_norms(start: dict, trained: dict) -> dict:
    """The norm of ``trained - start`` for every floating-point tensor that changed."""
    norms = {n: float((trained[n].float() - w.float()).norm()) for n, w in start.items() if w.is_floating_point()}
    return {n: v for n, v in norms.items() if v > 0.0}


def scaled_change(start: dict, trained: dict, direction: dict) -> tuple[dict, dict]:
    """start + ``direction`` with the per-tensor norms of ``trained - start``; and the norms applied.
    A tensor that did not change, or has no direction, stays as it was."""
    out, applied = {n: w.clone() for n, w in start.items()}, {}
    for name, norm in change_norms(start, trained).items():
        d = direction.get(name)
        if d is None or float(d.norm()) == 0.0:
            continue
        out[name] = (start[name].float() + d * (norm / float(d.norm()))).to(start[name].dtype)
        applied[name] = norm
    return out, applied


def gaussian_direction(start: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(w.shape, generator=generator) for n, w in start.items() if w.is_floating_point()}


def noise_gradient_direction(policy, frames: str, samples: int, seed: int, batch: int = 64) -> dict:
    """The on-policy policy gradient of ``samples`` chunks on ``frames`` with random +-1 advantages
    (the encoder frozen, as in Stage II)."""
    from learner.cotrain import sft_inputs
    from learner.real_replay import RealReplay

    replay = RealReplay([{"repo_id": "local/frames", "root": frames}])
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    policy.eval().encoder.requires_grad_(False)
    policy.zero_grad()
    for _ in range(0, samples, batch):
        with torch.no_grad():
            obs, _, _ = sft_inputs(policy, replay.sample(batch, policy.chunk_size, rng), "cpu")
            chain = policy.sample(obs, generator=generator).chain
            signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=batch).astype(np.float32))
        (signs * policy.evaluate(obs, chain).log_prob).sum().backward()
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}


def paired(start_eps: list[dict], eps: list[dict]) -> tuple[int, int]:
    """(newly solved, newly failed) against the start on the same (env, seed) episodes."""
    before = {(e["env"], e["seed"]): e["success"] for e in start_eps}
    solved = sum(1 for e in eps if e["success"] and not before[(e["env"], e["seed"])])
    failed = sum(1 for e in eps if not e["success"] and before[(e["env"], e["seed"])])
    return solved, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="the policy Stage II started from (Stage I)")
    ap.add_argument("--trained", required=True, help="the Stage II policy")
    ap.add_argument("--null", nargs="+", default=["gaussian"], choices=["gaussian", "noise_gradient"])
    ap.add_argument("--directions", type=int, default=2, help="policies per null model (one seed each)")
    ap.add_argument("--frames", default=None, help="noise_gradient: a LeRobot dataset of Stage II's (twin) frames")
    ap.add_argument("--samples", type=int, default=1024, help="noise_gradient: chunk samples in the gradient")
    ap.add_argument("--envs", nargs="+", default=["real_proxy", "twin"])
    ap.add_argument("--seeds", nargs="+", default=["100000:100100"], help="episode seeds (tandem-eval's syntax)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse", default=None, help="a previous random_direction.json of the same start, trained, envs "
                                                  "and seeds: its start and trained episodes are not run again")
    ap.add_argument("--out", default="runs/random_direction")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if "noise_gradient" in a.null and not a.frames:
        ap.error("--null noise_gradient needs --frames")
    torch.set_num_threads(2)
    trained_policy = load_policy(a.trained)
    start, trained = load_policy(a.start).state_dict(), trained_policy.state_dict()
    cfg = getattr(trained_policy, "cfg", {})
    noise = {"noise": cfg["noise"]} if "noise" in cfg else None  # the noise-gradient null samples Stage II's chain
    changed = change_norms(start, trained)
    work = Path(tempfile.mkdtemp(prefix="random_direction."))
    policies = {"start": a.start, "trained": a.trained}
    for null in a.null:
        for k in range(a.directions):
            direction = (gaussian_direction(start, k) if null == "gaussian" else
                         noise_gradient_direction(load_policy(a.start, overrides=noise), a.frames, a.samples, k))
            state, _ = scaled_change(start, trained, direction)
            policy = load_policy(a.start)
            policy.load_state_dict(state)
            path = work / f"{null}{k}"
            policy.save(str(path))
            shutil.copy(Path(a.trained) / ENV_OVERRIDES_FILE, path / ENV_OVERRIDES_FILE)
            policies[f"{null}{k}"] = str(path)
    seeds = parse_seeds(a.seeds)
    reused = {}
    if a.reuse:
        before = json.loads(Path(a.reuse).read_text())
        same = all(before["args"][k] == getattr(a, k) for k in ("start", "trained", "envs", "seeds"))
        if not same:
            raise SystemExit(f"--reuse {a.reuse}: it evaluated another start, trained policy, envs or seeds")
        reused = {policies[k]: {"episodes": before["episodes"][k]} for k in ("start", "trained")}
    results = evaluate_parallel([(p, a.envs, seeds) for p in policies.values() if p not in reused], a.workers, a.device)
    results.update(reused)
    rows = []
    for name, path in policies.items():
        for env in a.envs:
            eps = [e for e in results[path]["episodes"] if e["env"] == env]
            start_eps = [e for e in results[a.start]["episodes"] if e["env"] == env]
            solved, failed = paired(start_eps, eps)
            rows.append({"policy": name, "env": env, "success": sum(e["success"] for e in eps) / len(eps),
                         "episodes": len(eps), "newly_solved": solved, "newly_failed": failed})
    total_change = sum(n ** 2 for n in changed.values()) ** 0.5
    lines = [f"# Stage II change vs random changes of the same size\n",
             f"start `{a.start}`, trained `{a.trained}`; {len(changed)} tensors changed, total norm {total_change:.3f}; "
             f"{len(seeds)} deterministic episodes per env (seeds {a.seeds}).\n",
             "| policy | env | success | newly solved / newly failed vs start |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['env']} | {r['success']:.2f} | {r['newly_solved']} / {r['newly_failed']} |" for r in rows]
    (out / "random_direction.md").write_text("\n".join(lines) + "\n")
    (out / "random_direction.json").write_text(json.dumps({"args": vars(a), "change_norms": changed, "rows": rows,
                                                           "episodes": {k: results[p]["episodes"] for k, p in policies.items()}},
                                                          indent=1))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
